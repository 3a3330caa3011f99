"""Graph passes over torch.fx GraphModules: capture, cost, partition, split (bitpipe_fx.passes).

Importing this package imports torch; the passes never touch torch.distributed.
"""

from __future__ import annotations

from bitpipe_fx.passes.capture import Captured, capture, compute_nodes
from bitpipe_fx.passes.cost import CostTable, NodeCost, StageCost, estimate_costs
from bitpipe_fx.passes.partition import Partition, partition
from bitpipe_fx.passes.split import run_stages, split
from bitpipe_fx.passes.stages import SplitModel, StageSpec

__all__ = [
    "Captured",
    "CostTable",
    "NodeCost",
    "Partition",
    "SplitModel",
    "StageCost",
    "StageSpec",
    "capture",
    "compute_nodes",
    "estimate_costs",
    "partition",
    "run_stages",
    "split",
]
