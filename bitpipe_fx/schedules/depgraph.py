"""The dependency rule (``deps``) precomputed once over every action of one placement and pipe map.

The list scheduler and the order replay walk the same graph many times (every candidate order of a
generator): here each action gets an integer id, in the order of the actions themselves (so comparing ids
compares actions), with its device, its needs and results, and each result the ids of the actions that need
it (the inverse of ``deps.needs``). Built once per (placement, pipe map, split) and shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from bitpipe_fx.schedules.deps import Key, needs, provides
from bitpipe_fx.schedules.ir import Action, Placement


@dataclass(frozen=True, eq=False)
class ActionGraph:
    """Every F and backward (B, or I and W) of every micro-batch, by id; ``index`` maps an action to its id."""

    actions: tuple[Action, ...]
    index: dict[Action, int]
    device: tuple[int, ...]
    needs: tuple[tuple[Key, ...], ...]
    provides: tuple[tuple[Key, ...], ...]
    dependents: dict[Key, tuple[int, ...]]  # a result -> the ids of the actions that need it
    roots: tuple[int, ...]  # ids of the actions that need nothing (each micro-batch's first forward), by micro-batch


def action_graph(placement: Placement, pipe_of: Sequence[int], split: bool) -> ActionGraph:
    """The graph of ``placement``'s actions for micro-batches travelling ``pipe_of`` (I and W when ``split``)."""
    return _graph(placement, tuple(pipe_of), split)


@lru_cache(maxsize=8)
def _graph(placement: Placement, pipe_of: tuple[int, ...], split: bool) -> ActionGraph:
    kinds = ("F", "I", "W") if split else ("B", "F")
    fields = sorted((k, p, s, m) for m, p in enumerate(pipe_of) for s in range(placement.stages) for k in kinds)
    actions = tuple(Action(*f) for f in fields)
    stages, table = placement.stages, placement.table
    need = tuple(needs(a, stages) for a in actions)
    dependents: dict[Key, list[int]] = {}
    for i, keys in enumerate(need):
        for key in keys:
            dependents.setdefault(key, []).append(i)
    index = {a: i for i, a in enumerate(actions)}
    roots = tuple(index[Action("F", p, 0, m)] for m, p in enumerate(pipe_of))
    return ActionGraph(
        actions=actions,
        index=index,
        device=tuple(table[a.pipe][a.stage] for a in actions),
        needs=need,
        provides=tuple(provides(a) for a in actions),
        dependents={key: tuple(ids) for key, ids in dependents.items()},
        roots=roots,
    )
