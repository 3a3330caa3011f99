"""The record of a ``schedule="auto"`` search: every candidate's predicted step, bubble and peak memory,
the memory limit, the winner and why it won. A value with a text table and an exact JSON round-trip, kept
in the Plan so a saved plan shows (and reproduces) the choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """One searched schedule spec: ``status`` is "ok", "over memory" or "pruned" (its bound could not win)."""

    spec: str
    makespan: float  # predicted step in seconds (for "pruned": the lower bound that ruled it out)
    bubble: float  # mean idle / makespan (0 for "pruned")
    peak_bytes: tuple[float, ...]  # predicted peak memory per device (for "pruned": weights and state only)
    status: str = "ok"
    recomputed: tuple[int, ...] = ()  # stages that recompute their forward in this candidate

    @property
    def peak(self) -> float:
        return max(self.peak_bytes, default=0.0)

    def to_dict(self) -> dict[str, object]:
        return {"spec": self.spec, "makespan": self.makespan, "bubble": self.bubble,
                "peak_bytes": list(self.peak_bytes), "status": self.status, "recomputed": list(self.recomputed)}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Candidate:
        return cls(str(data["spec"]), float(data["makespan"]), float(data["bubble"]),
                   tuple(float(b) for b in data["peak_bytes"]), str(data["status"]),
                   tuple(int(s) for s in data.get("recomputed") or ()))


@dataclass(frozen=True)
class Search:
    """Candidates best first (fitting ones by predicted step, then the rest), the limit and the reason."""

    candidates: tuple[Candidate, ...]
    memory_limit: float | None
    reason: str

    @property
    def winner(self) -> Candidate:
        return self.candidates[0]

    def table(self) -> list[str]:
        """Lines of the ranking table for ``Plan.summary``."""
        limit = "no memory limit" if self.memory_limit is None else f"memory limit {_b(self.memory_limit)}"
        lines = [f"auto: {len(self.candidates)} candidates, {limit}; {self.reason}",
                 f"{'rank':>4} {'schedule':<32} {'step s':>10} {'bubble':>7} {'peak B':>8}  "
                 f"{'status':<11} {'recompute':<10} peak B per device"]
        for i, c in enumerate(self.candidates, 1):
            per_device = " ".join(_b(b) for b in c.peak_bytes)
            bubble = f"{100 * c.bubble:.1f}%" if c.status != "pruned" else "-"
            again = ",".join(str(s) for s in c.recomputed) or "-"
            lines.append(f"{i:>4} {c.spec:<32} {c.makespan:>10.4g} {bubble:>7} {_b(c.peak):>8}  "
                         f"{c.status:<11} {again:<10} {per_device}")
        return lines

    def to_dict(self) -> dict[str, object]:
        return {"candidates": [c.to_dict() for c in self.candidates], "memory_limit": self.memory_limit,
                "reason": self.reason}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Search:
        limit = data.get("memory_limit")
        return cls(tuple(Candidate.from_dict(c) for c in data["candidates"]),
                   None if limit is None else float(limit), str(data["reason"]))


def _b(x: float) -> str:
    """Bytes in binary units: 1536 -> 1.5Ki."""
    for unit, scale in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.0f}"
