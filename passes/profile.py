"""profile: measured forward and backward time of each stage on the device its tensors live on.

Measurements differ from run to run and rank to rank, so a profiled partition is not reproducible:
profile once (``bitpipe-fx partition --profile``), save the plan, and load it on every rank.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from bitpipe_fx.passes.stages import SplitModel


def measure_stages(
    split: SplitModel, flat_inputs: Sequence[torch.Tensor], *, repeats: int = 3
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(forward seconds, backward seconds) per stage for one micro-batch: the median of ``repeats`` runs."""
    model_inputs = dict(zip(split.input_names, flat_inputs))
    received: tuple = ()
    forward, backward = [], []
    for stage, spec in zip(split.stages, split.specs):
        args = [model_inputs[n] for n in spec.model_inputs] + [_leaf(t) for t in received]
        saved = {name: p.grad for name, p in stage.named_parameters()}  # the stage shares the model's tensors
        f_times, b_times = [], []
        for _ in range(repeats + 1):  # the first run warms up
            _sync(args)
            start = time.perf_counter()
            outputs = stage(*args)
            _sync(outputs)
            middle = time.perf_counter()
            grads = [t for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad]
            if grads:
                torch.autograd.backward(grads, [torch.ones_like(t) for t in grads])
                _sync(grads)
            f_times.append(middle - start)
            b_times.append(time.perf_counter() - middle)
            stage.zero_grad(set_to_none=True)
        for name, p in stage.named_parameters():
            p.grad = saved[name]
        forward.append(statistics.median(f_times[1:]))
        backward.append(statistics.median(b_times[1:]))
        received = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in outputs)
    return tuple(forward), tuple(backward)


def _leaf(t: object) -> object:
    """A received value as the next stage sees it: a fresh leaf that wants a gradient when it can carry one."""
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        return t.detach().requires_grad_(True)
    return t


def _sync(tensors: Sequence[object]) -> None:
    if any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors):
        torch.cuda.synchronize()
