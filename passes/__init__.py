"""Graph passes over torch.fx GraphModules: capture, cost, partition, split (bitpipe_fx.passes).

Importing this package imports torch; the passes never touch torch.distributed.
"""

from __future__ import annotations

import importlib

from bitpipe_fx.passes.capture import Captured, capture, compute_nodes
from bitpipe_fx.passes.split import split
from bitpipe_fx.passes.stages import SplitModel, StageSpec

_LAZY = {
    "CostTable": "bitpipe_fx.passes.cost",
    "NodeCost": "bitpipe_fx.passes.cost",
    "estimate_costs": "bitpipe_fx.passes.cost",
    "Partition": "bitpipe_fx.passes.partition",
    "partition": "bitpipe_fx.passes.partition",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'bitpipe_fx.passes' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = [
    "Captured",
    "CostTable",
    "NodeCost",
    "Partition",
    "SplitModel",
    "StageSpec",
    "capture",
    "compute_nodes",
    "estimate_costs",
    "partition",
    "split",
]
