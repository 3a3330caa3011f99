"""Check that a program is a correct, deadlock-free pipeline schedule.

Two passes: a structural one (every action once, on its owner, for its micro-batch's pipe, every chunk
synced after its last backward) and a symbolic execution of the lowered program (``comm.lower``) with
non-blocking sends and blocking receives, which finds dependency violations and deadlocks. Failures raise
ScheduleError with a device x step grid that marks the offending actions.
"""

from __future__ import annotations

from collections.abc import Iterable

from bitpipe_fx.errors import ScheduleError
from bitpipe_fx.schedules.comm import Comm, lower
from bitpipe_fx.schedules.deps import Key, describe, needs, provides
from bitpipe_fx.schedules.ir import Action, Program

Mark = tuple[int, int]  # (device, step); step == len(actions) means "missing, should be on this device"
_MAX_PROBLEMS = 8


def validate(program: Program) -> None:
    """Raise ScheduleError (with a marked device x step grid) unless ``program`` is a valid schedule."""
    problems = _structure_problems(program)
    if not problems:
        problems = _execution_problems(program)
    if problems:
        lines = [text for _, text in problems[:_MAX_PROBLEMS]]
        if len(problems) > _MAX_PROBLEMS:
            lines.append(f"... and {len(problems) - _MAX_PROBLEMS} more")
        marks = dict(problems[:_MAX_PROBLEMS])
        raise ScheduleError(
            f"invalid program {program.name!r} (D={program.devices}, N={program.microbatches}):\n  "
            + "\n  ".join(lines)
            + "\n"
            + format_grid(program, marks)
        )


# ---- structure ----------------------------------------------------------------------------------


def _structure_problems(program: Program) -> list[tuple[Mark, str]]:
    place, n = program.placement, program.microbatches
    problems: list[tuple[Mark, str]] = []
    bad_pipes = [m for m, p in enumerate(program.pipe_of) if not 0 <= p < program.pipes]
    if bad_pipes:
        problems.append(((0, 0), f"pipe_of names pipes outside 0..{program.pipes - 1} for micro-batches {bad_pipes}"))
        return problems
    seen: dict[Action, Mark] = {}
    for d, acts in enumerate(program.device_actions):
        for i, a in enumerate(acts):
            where = (d, i)
            if not (0 <= a.pipe < program.pipes and 0 <= a.stage < program.stages):
                problems.append((where, f"{a} on dev{d}: no chunk (pipe {a.pipe}, stage {a.stage}) in the placement"))
                continue
            if a.kind != "SYNC" and not 0 <= a.microbatch < n:
                problems.append((where, f"{a} on dev{d}: micro-batch {a.microbatch} outside 0..{n - 1}"))
                continue
            owner = place.device(a.pipe, a.stage)
            if owner != d:
                problems.append((where, f"{a} runs on dev{d} but chunk ({a.pipe}, {a.stage}) is placed on dev{owner}"))
            elif a.kind != "SYNC" and program.pipe_of[a.microbatch] != a.pipe:
                problems.append(
                    (where, f"{a} on dev{d}: micro-batch {a.microbatch} travels pipe {program.pipe_of[a.microbatch]}")
                )
            elif a in seen:
                problems.append((where, f"{a} on dev{d} step {i} duplicates step {seen[a][1]} of dev{seen[a][0]}"))
            else:
                seen[a] = where
    if problems:
        return problems
    for m, p in enumerate(program.pipe_of):
        for s in range(program.stages):
            problems += _missing(program, seen, p, s, m)
    for d in range(program.devices):
        for chunk in place.chunks(d):
            problems += _sync_problems(program, seen, d, chunk)
    return problems


def _missing(program: Program, seen: dict[Action, Mark], p: int, s: int, m: int) -> list[tuple[Mark, str]]:
    owner = program.placement.device(p, s)
    end = (owner, len(program.actions(owner)))
    out = []
    if Action("F", p, s, m) not in seen:
        out.append((end, f"F{p}.{s}.{m} is missing on dev{owner}"))
    has_b = Action("B", p, s, m) in seen
    split = [k for k in ("I", "W") if Action(k, p, s, m) in seen]
    if has_b and split:
        other = seen[Action(split[0], p, s, m)]
        out.append((other, f"micro-batch {m} of chunk ({p}, {s}) runs both B and {split[0]}: use B, or I and W"))
    elif not has_b and not split:
        out.append((end, f"backward of chunk ({p}, {s}) for micro-batch {m} is missing on dev{owner} (B, or I and W)"))
    elif len(split) == 1:
        lacking = "W" if split == ["I"] else "I"
        out.append((end, f"{lacking}{p}.{s}.{m} is missing on dev{owner} (its {split[0]} is present)"))
    return out


def _sync_problems(program: Program, seen: dict[Action, Mark], d: int, chunk: tuple[int, int]) -> list:
    p, s = chunk
    sync = seen.get(Action("SYNC", p, s))
    if sync is None:
        return [((d, len(program.actions(d))), f"SYNC{p}.{s} is missing on dev{d} (one per chunk, after its backward)")]
    acts = program.actions(d)
    late = [i for i, a in enumerate(acts) if a.chunk == chunk and a.kind in ("B", "W") and i > sync[1]]
    if late:
        return [(sync, f"SYNC{p}.{s} on dev{d} at step {sync[1]} comes before backward {acts[late[-1]]} (step "
                       f"{late[-1]}); move it after the chunk's last B/W")]
    return []


# ---- symbolic execution of the lowered program ---------------------------------------------------


def _execution_problems(program: Program) -> list[tuple[Mark, str]]:
    ops = lower(program)
    pos = [0] * program.devices  # next lowered op per device
    step = [0] * program.devices  # next program action per device
    sent: set = set()
    done: set[Key] = set()
    progress = True
    while progress:
        progress = False
        for d, dev_ops in enumerate(ops):
            while pos[d] < len(dev_ops):
                op = dev_ops[pos[d]]
                if isinstance(op, Comm):
                    if op.op == "RECV" and op.message not in sent:
                        break
                    sent.add(op.message)
                elif all(key in done for key in needs(op, program.stages)):
                    done.update(provides(op))
                    step[d] += 1
                else:
                    break
                pos[d] += 1
                progress = True
    return [
        ((d, step[d]), _stuck_reason(program, ops[d][pos[d]], d, done))
        for d in range(program.devices)
        if pos[d] < len(ops[d])
    ]


def _stuck_reason(program: Program, op: Action | Comm, d: int, done: set[Key]) -> str:
    if isinstance(op, Comm):
        msg = op.message
        return f"dev{d} blocks receiving {msg.kind}{msg.pipe}.{msg.stage}.{msg.microbatch} from dev{msg.src}"
    waiting = []
    for key in needs(op, program.stages):
        if key not in done:
            owner = program.placement.device(key[1], key[2])
            waiting.append(f"{describe(key)} (dev{owner}{', later on this device' if owner == d else ''})")
    return f"dev{d} cannot run {op}: it needs {', '.join(waiting)}"


# ---- the device x step grid -----------------------------------------------------------------------


def format_grid(program: Program, marks: dict[Mark, str] | Iterable[Mark], width: int = 20) -> str:
    """Render devices x steps around the marked cells; marked cells read ``!X!``, missing ones ``!?!``."""
    marked = set(marks)
    cols: set[int] = set()
    for _, i in marked:
        cols.update(range(max(0, i - 2), i + 2))
    if not cols:
        cols = set(range(4))
    shown = sorted(c for c in cols if c <= max(len(a) for a in program.device_actions))[:width]
    header = ["step"] + [str(c) for c in shown]
    rows = [header]
    for d, acts in enumerate(program.device_actions):
        row = [f"dev{d}"]
        for c in shown:
            cell = str(acts[c]) if c < len(acts) else "."
            if (d, c) in marked:
                cell = f"!{cell if c < len(acts) else '?'}!"
            row.append(cell)
        rows.append(row)
    widths = [max(len(r[k]) for r in rows) for k in range(len(header))]
    lines = []
    for r in rows:
        cells = []
        for k, cell in enumerate(r):
            gap = k > 1 and shown[k - 1] != shown[k - 2] + 1
            cells.append(("... " if gap else "") + cell.ljust(widths[k]))
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
