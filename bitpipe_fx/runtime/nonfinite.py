"""Non-finite losses and gradients: found where they arise, decided for the whole step.

After each backward of a replica a device-side flag records whether the sum of each gradient buffer is
still finite (no host sync; one read of the buffers, ~10x cheaper than ``isfinite().all()``): NaN and inf
propagate into the sum, and a sum that merely overflowed is discarded at the end, where a finding needs a
parameter whose gradient really is non-finite. At the end of the step the first micro-batch whose loss is not
finite, and for each replica the first backward after which its gradients were not, become ``Finding`` s;
every rank then agrees on the same one (``earliest``), so all raise ``NonFiniteError`` or all skip the
update alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from bitpipe_fx.errors import NonFiniteError
from bitpipe_fx.runtime.chunk import StageReplica

POLICIES = ("raise", "skip")


@dataclass(frozen=True)
class Finding:
    """Where a step first became non-finite: global micro-batch, stage, what, and the first parameter."""

    microbatch: int
    stage: int
    what: str  # "loss" or "gradient"
    parameter: str | None = None

    def error(self, step: int) -> NonFiniteError:
        where = f"micro-batch {self.microbatch}, stage {self.stage}"
        of = f" of parameter {self.parameter!r}" if self.parameter else ""
        return NonFiniteError(
            f"step {step}: non-finite {self.what}{of} in {where}; no update was applied. Lower the learning "
            "rate, check the data (or the loss for log(0)), or compile(..., on_nonfinite='skip') "
            "(bitpipe-fx train --on-nonfinite skip) to drop such steps"
        )


class Watch:
    """This process's finiteness flags of one step."""

    def __init__(self) -> None:
        self.flags: list[tuple[StageReplica, int, torch.Tensor]] = []

    def begin(self) -> None:
        self.flags = []

    def after_backward(self, replica: StageReplica, microbatch: int) -> None:
        """Flag (on the device) whether ``replica``'s gradients are still finite after this backward."""
        if replica.flat_grads:
            finite = torch.stack([torch.isfinite(f.sum()) for f in replica.flat_grads]).all()
            self.flags.append((replica, microbatch, finite))

    def findings(self, losses: Mapping[int, torch.Tensor], last_stage: int, first: int) -> list[Finding]:
        """Non-finite losses (micro-batch m is global micro-batch first + m), and each replica's first
        non-finite backward (flagged with global micro-batches)."""
        out = [Finding(first + m, last_stage, "loss") for m, loss in losses.items() if not torch.isfinite(loss).all()]
        if not self.flags:
            return out
        finite = torch.stack([f for _, _, f in self.flags]).tolist()
        seen: set[int] = set()
        for (replica, m, _), ok in zip(self.flags, finite):
            if not ok and id(replica) not in seen:
                seen.add(id(replica))
                parameter = first_bad_parameter(replica)
                if parameter is not None:
                    out.append(Finding(m, replica.stage, "gradient", parameter))
        return out


def first_bad_parameter(replica: StageReplica) -> str | None:
    """The first parameter (in the model's order) whose gradient is not finite."""
    for name, p in replica.params.items():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return name
    return None


def earliest(findings: Iterable[Finding]) -> Finding | None:
    """The origin: the first global micro-batch; its loss before its gradients; among gradients the highest
    stage (a backward runs from the last stage down, so the lower stages only inherit it)."""
    return min(findings, key=lambda f: (f.microbatch, f.what != "loss", -f.stage), default=None)
