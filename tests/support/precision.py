"""Worker body for the bf16-mixed tests: the same few steps on launched ranks or in one process."""

from __future__ import annotations

import torch

import bitpipe_fx as bp
from bitpipe_fx.examples.models import gpt, lm_loss


def bf16_steps(schedule: str, devices: int, steps: int, precision: str = "bf16-mixed") -> dict[str, object]:
    """Train the examples' GPT ``steps`` steps under ``precision``; losses and what stayed fp32."""
    torch.manual_seed(0)
    model, example = gpt(vocab=64, seq=16, micro_batch=2, layers=4, dim=32, heads=2)
    tokens = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(1))
    pipe = bp.compile(model, example, lm_loss, schedule=schedule, devices=devices, microbatches=4,
                      precision=precision, optimizer=lambda ps: bp.optim.ScheduleFreeAdamW(ps, lr=3e-3))
    losses = [pipe.step(tokens[:, :-1], tokens[:, 1:]) for _ in range(steps)]
    state = [t for s in pipe.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return {"losses": losses, "param_dtypes": sorted({str(p.dtype) for p in pipe.named_parameters().values()}),
            "state_dtypes": sorted({str(t.dtype) for t in state if t.is_floating_point()})}
