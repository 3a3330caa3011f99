"""The memory model: each device's peak bytes in one step, by kind, from its program and per-stage sizes.

One rule, used by ``schedule="auto"``, ``recompute="auto"`` and the memory benchmark. Per device:

- **params, grads, optimizer**: every distinct stage the device holds (two chunks of one stage share a
  replica) counts its parameter bytes once as parameters, once as the flat gradient buffer and
  ``state_copies`` times as optimizer state (2: Schedule-Free AdamW's z and v, AdamW's m and v).
- **activations**, walked in the device's action order (each device runs its actions in order, so the
  order alone fixes what is alive): F of a stage keeps ``held`` = saved tensors + its outputs (the roots
  of its backward) until its B, or W when split; I adds the output gradients W needs (``weight_grads``).
  A recomputed stage keeps only its inputs from F; its B (or I) rebuilds the graph (``held`` is alive
  during B, and from I to W). Transient gradient tensors inside one backward are not counted.
- **comm**: the receive buffers the distributed runtime posts ahead, the next ``lookahead`` messages
  from each peer (runtime/p2p.py); a message, once received, is the consumer's input (an activation). Sent
  bundles are released as their sends complete and are not counted.

The peak is the largest params + grads + optimizer + activations + comm over the step; the report gives each
kind at that moment. Pure Python (no torch): sizes come from the plan's stage costs (passes/cost.py,
passes/saved.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.schedules.comm import consumed_value
from bitpipe_fx.schedules.ir import Program

KINDS = ("params", "grads", "optimizer", "activations", "comm")
RECOMPUTE_MODES = ("none", "full", "auto")  # compile(recompute=...): bitpipe_fx.recompute chooses the stages


@dataclass(frozen=True)
class StageMemory:
    """Bytes of one stage: its parameters, and per micro-batch what a forward stores."""

    params: float
    saved: float  # tensors autograd saves for the backward (weights excluded)
    outputs: float  # what it sends on (held as its backward's roots; the size of an activation message)
    inputs: float  # what it receives (all a recomputed stage keeps; the size of a gradient message)
    weight_grads: float  # output gradients an I keeps for its W

    @property
    def held(self) -> float:
        """Stored from F until the backward that frees it, without recomputation."""
        return self.saved + self.outputs


@dataclass(frozen=True)
class DeviceMemory:
    """One device's bytes by kind at its peak."""

    params: float
    grads: float
    optimizer: float
    activations: float
    comm: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.comm

    def to_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in KINDS} | {"total": self.total}


def device_memory(
    program: Program, stages: Sequence[StageMemory], recompute: Sequence[bool] = (), *, state_copies: int = 2,
    lookahead: int = 4,
) -> tuple[DeviceMemory, ...]:
    """Every device's peak (see the module docstring); ``recompute``: per stage (empty = none)."""
    if len(stages) != program.stages:
        raise ConfigError(f"the memory model got {len(stages)} stage sizes for a program of {program.stages} stages")
    flags = tuple(bool(f) for f in recompute) or (False,) * program.stages
    if len(flags) != program.stages:
        raise ConfigError(f"recompute has {len(flags)} entries but the program has {program.stages} stages; "
                          "give one flag per stage")
    out = []
    for d in range(program.devices):
        weights = sum(stages[s].params for s in sorted({s for _, s in program.placement.chunks(d)}))
        act, comm = _dynamic_peak(program, d, stages, flags, max(1, lookahead))
        out.append(DeviceMemory(weights, weights, state_copies * weights, act, comm))
    return tuple(out)


def _dynamic_peak(program: Program, device: int, stages: Sequence[StageMemory], flags: tuple[bool, ...],
                  lookahead: int) -> tuple[float, float]:
    """(activations, comm) at the moment their sum peaks on ``device``."""
    actions = program.actions(device)
    inbound = [consumed_value(program, a) if a.kind != "SYNC" else None for a in actions]
    queues: dict[int, list[float]] = {}
    for msg in (m for m in inbound if m is not None and m.src != m.dst):
        size = stages[msg.stage].outputs if msg.kind == "act" else stages[msg.stage].inputs
        queues.setdefault(msg.src, []).append(size)
    taken = dict.fromkeys(queues, 0)

    def posted() -> float:
        return sum(sum(q[taken[src]: taken[src] + lookahead]) for src, q in queues.items())

    act, best = 0.0, (0.0, posted())
    for a, msg in zip(actions, inbound):
        if msg is not None and msg.src != msg.dst:
            taken[msg.src] += 1
        if a.kind == "SYNC":
            continue
        st, again = stages[a.stage], flags[a.stage]
        keep, rebuilt = (st.inputs, st.held - st.inputs) if again else (st.held, 0.0)
        if a.kind == "F":
            act += keep
            during = act
        elif a.kind == "B":
            during = act + rebuilt
            act -= keep
        elif a.kind == "I":
            act += rebuilt + st.weight_grads
            during = act
        else:  # W
            during = act
            act -= st.held + st.weight_grads
        comm = posted()
        if during + comm > sum(best):
            best = (during, comm)
    return best


def choose_recompute(
    program: Program, stages: Sequence[StageMemory], limit: float, forward: Sequence[float], *, state_copies: int = 2,
    lookahead: int = 4,
) -> tuple[bool, ...] | None:
    """The least recomputation that fits ``limit`` on every device (None when even recomputing every stage does
    not): starting from none, recompute on the device furthest over the stage that saves most per second of
    forward it adds (ties: the lower stage), until every device fits."""
    flags = [False] * program.stages
    while True:
        peaks = device_memory(program, stages, flags, state_copies=state_copies, lookahead=lookahead)
        worst = max(range(program.devices), key=lambda d: (peaks[d].total, -d))
        if peaks[worst].total <= limit:
            return tuple(flags)
        options = [s for s in sorted({s for _, s in program.placement.chunks(worst)})
                   if not flags[s] and stages[s].held > stages[s].inputs]
        if not options:
            return None
        flags[max(options, key=lambda s: ((stages[s].held - stages[s].inputs) / max(forward[s], 1e-30), -s))] = True
