"""The record of a ``schedule="auto"`` search and its ranking rule: every candidate's predicted step, bubble
and peak memory, the memory limit, the winner and why it won. A value with a text table and an exact JSON
round-trip, kept in the Plan so a saved plan shows (and reproduces) the choice; ``bitpipe-fx simulate
--schedule auto`` ranks with the same rule. Pure Python (no torch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.schedules.spec import ScheduleSpec, parse_spec

STATE_COPIES = 4  # parameter + gradient + two optimizer-state tensors per parameter byte


def candidate_specs(devices: int, microbatches: int) -> tuple[ScheduleSpec, ...]:
    """Every family with the options worth searching, in a fixed order (earlier wins a tie)."""
    texts = ["bitpipe:defer_w=true,inflight=1", "bitpipe:defer_w=true,inflight=2", "bitpipe:defer_w=false",
             "bitpipe-paper", "zbv", "zbv:defer_w=0", "dualpipev", "chimera", "1f1b", "gpipe",
             *(f"interleaved:chunks={v}" for v in (2, 4))]
    return tuple(parse_spec(t) for t in texts)


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
                 f"{'rank':>4} {'schedule':<32} {'step':>10} {'bubble':>7} {'peak B':>8}  "
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


def rank(rows: Sequence[tuple[Candidate, int]], limit: float | None, unit: str = "s") -> tuple[Search, int]:
    """The search record of ``rows`` (each a candidate and its place in the search order, which breaks ties)
    and the position in ``rows`` of the winner: fitting candidates by step, then over-memory ones by peak,
    then pruned ones. ConfigError when there is no candidate, or none fits ``limit`` (naming the smallest
    peak). ``unit`` names the time unit in the reason."""
    order = {"ok": 0, "over memory": 1, "pruned": 2}
    by_rank = sorted(range(len(rows)), key=lambda k: (
        order[rows[k][0].status], rows[k][0].peak if rows[k][0].status == "over memory" else rows[k][0].makespan,
        rows[k][0].makespan, rows[k][0].peak, rows[k][1]))
    ranked = tuple(rows[k][0] for k in by_rank)
    if not ranked:
        raise ConfigError("schedule='auto' found no schedule family that runs at these devices and micro-batches; "
                          "use an even number of devices and a multiple of devices as micro-batches")
    if ranked[0].status != "ok":
        smallest = min((c for c in ranked if c.status == "over memory"), key=lambda c: c.peak)
        raise ConfigError(
            f"no schedule fits memory_limit={limit:.6g} bytes: the smallest predicted peak is {smallest.peak:.6g} "
            f"bytes ({smallest.spec}); raise the limit, use more devices or fewer micro-batches in flight"
        )
    return Search(ranked, limit, _reason(ranked, unit)), by_rank[0]


def _reason(ranked: tuple[Candidate, ...], unit: str) -> str:
    win = ranked[0]
    reason = f"{win.spec} wins with the shortest predicted step ({win.makespan:.4g} {unit})"
    others = [c for c in ranked[1:] if c.status == "ok"]
    if others:
        reason += f", {100 * (others[0].makespan / win.makespan - 1):.1f}% ahead of {others[0].spec}"
    over = [c for c in ranked if c.status == "over memory"]
    if over:
        fastest = min(over, key=lambda c: c.makespan)
        reason += (f"; {len(over)} exceed the limit (the fastest of those, {fastest.spec} at {fastest.makespan:.4g}"
                   f" {unit}, peaks at {fastest.peak:.4g} B)")
    pruned = sum(c.status == "pruned" for c in ranked)
    if pruned:
        reason += f"; {pruned} pruned (their slowest device's compute alone exceeds a fitting candidate's step)"
    return reason


def _b(x: float) -> str:
    """Bytes in binary units: 1536 -> 1.5Ki."""
    for unit, scale in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.0f}"
