"""Numeric precision of a pipeline's compute and messages: "fp32" (as the model is) or "bf16-mixed".

bf16-mixed keeps the parameters, their gradients, the gradient reduction and the optimizer state in the
model's dtype (fp32 master weights) and runs each stage's forward, and the loss, under
``torch.autocast(dtype=torch.bfloat16)``; the floating values a stage sends on are cast to bf16, so
activations and their gradients cross the wire in bf16. Autograd returns the parameters' gradients in
their own dtype, so nothing downstream of the backward changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bitpipe_fx.errors import ConfigError

PRECISIONS = ("fp32", "bf16-mixed")
WIRE = torch.bfloat16  # the dtype of activations between stages under bf16-mixed


@dataclass(frozen=True)
class Precision:
    """One of PRECISIONS; ``compute`` is the forward's context, ``wire`` the cast of what a stage sends."""

    name: str = "fp32"

    @property
    def mixed(self) -> bool:
        return self.name == "bf16-mixed"

    def compute(self, device: torch.device) -> contextlib.AbstractContextManager[object]:
        """The context a stage forward (and the loss) runs in."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=WIRE)

    def wire(self, values: Sequence[object]) -> tuple:
        """``values`` as they travel to the next stage: floating tensors in bf16 under bf16-mixed."""
        if not self.mixed:
            return tuple(values)
        return tuple(v.to(WIRE) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in values)


FP32 = Precision()


def precision_of(value: object) -> Precision:
    """The Precision named by ``value``, or a ConfigError naming the choices."""
    if isinstance(value, Precision):
        return value
    if value not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {value!r}; "
                          "'bf16-mixed' keeps fp32 master weights and runs the stages in bf16")
    return Precision(str(value))
