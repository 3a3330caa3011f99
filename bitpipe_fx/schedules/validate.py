"""Check that a program is a correct, deadlock-free pipeline schedule.

Two passes: a structural one (every action once, on its owner, for its micro-batch's pipe, every chunk
synced after its last backward) and a symbolic execution of the program with its cross-device values
(``comm.handoffs``, in ``comm.lower``'s order) as non-blocking sends and blocking receives, which finds
dependency violations and deadlocks. Failures raise ScheduleError with a device x step grid that marks the
offending actions.
"""

from __future__ import annotations

from collections.abc import Iterable

from bitpipe_fx.errors import ScheduleError
from bitpipe_fx.schedules.comm import Handoff, Wired, handoffs, message_of
from bitpipe_fx.schedules.deps import Key, describe
from bitpipe_fx.schedules.ir import Action, Program

Mark = tuple[int, int]  # (device, step); step == len(actions) means "missing, should be on this device"
_MAX_PROBLEMS = 8


def validate(program: Program, execute: bool = True) -> None:
    """Raise ScheduleError (with a marked device x step grid) unless ``program`` is a valid schedule.

    ``execute=False`` checks the structure only: for a caller that replays the program itself (the
    simulator finds the same deadlocks) and calls ``validate`` again, in full, when that replay fails.
    """
    problems = _structure_problems(program)
    if not problems and execute:
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


Seen = dict[tuple[str, int, int, int], Mark]  # (kind, pipe, stage, micro-batch) of each action -> where it is


def _structure_problems(program: Program) -> list[tuple[Mark, str]]:
    table, pipe_of = program.placement.table, program.pipe_of
    n, pipes, stages = program.microbatches, program.pipes, program.stages
    problems: list[tuple[Mark, str]] = []
    bad_pipes = [m for m, p in enumerate(pipe_of) if not 0 <= p < pipes]
    if bad_pipes:
        problems.append(((0, 0), f"pipe_of names pipes outside 0..{pipes - 1} for micro-batches {bad_pipes}"))
        return problems
    seen: Seen = {}
    for d, acts in enumerate(program.device_actions):
        for i, a in enumerate(acts):
            kind, pipe, stage, mb = a
            if 0 <= pipe < pipes and 0 <= stage < stages and table[pipe][stage] == d and a not in seen and (
                kind == "SYNC" or (0 <= mb < n and pipe_of[mb] == pipe)
            ):
                seen[a] = (d, i)  # the common case: one test; the others name what is wrong
                continue
            where = (d, i)
            if not (0 <= pipe < pipes and 0 <= stage < stages):
                problems.append((where, f"{a} on dev{d}: no chunk (pipe {pipe}, stage {stage}) in the placement"))
                continue
            if kind != "SYNC" and not 0 <= mb < n:
                problems.append((where, f"{a} on dev{d}: micro-batch {mb} outside 0..{n - 1}"))
                continue
            owner = table[pipe][stage]
            if owner != d:
                problems.append((where, f"{a} runs on dev{d} but chunk ({pipe}, {stage}) is placed on dev{owner}"))
            elif kind != "SYNC" and pipe_of[mb] != pipe:
                problems.append((where, f"{a} on dev{d}: micro-batch {mb} travels pipe {pipe_of[mb]}"))
            else:
                problems.append((where, f"{a} on dev{d} step {i} duplicates step {seen[a][1]} of dev{seen[a][0]}"))
    if problems:
        return problems
    for m, p in enumerate(pipe_of):
        for s in range(stages):
            problems += _missing(program, seen, p, s, m)
    for d in range(program.devices):
        last = _last_backwards(program.actions(d))
        for chunk in program.placement.chunks(d):
            problems += _sync_problems(program, seen, d, chunk, last.get(chunk))
    return problems


def _missing(program: Program, seen: Seen, p: int, s: int, m: int) -> list[tuple[Mark, str]]:
    has = [(k, p, s, m) in seen for k in ("F", "B", "I", "W")]
    if has in ([True, True, False, False], [True, False, True, True]):
        return []  # F and B, or F, I and W: the common case, decided before any message is built
    owner = program.placement.device(p, s)
    end = (owner, len(program.actions(owner)))
    out = []
    if ("F", p, s, m) not in seen:
        out.append((end, f"F{p}.{s}.{m} is missing on dev{owner}"))
    has_b = ("B", p, s, m) in seen
    split = [k for k in ("I", "W") if (k, p, s, m) in seen]
    if has_b and split:
        other = seen[(split[0], p, s, m)]
        out.append((other, f"micro-batch {m} of chunk ({p}, {s}) runs both B and {split[0]}: use B, or I and W"))
    elif not has_b and not split:
        out.append((end, f"backward of chunk ({p}, {s}) for micro-batch {m} is missing on dev{owner} (B, or I and W)"))
    elif len(split) == 1:
        lacking = "W" if split == ["I"] else "I"
        out.append((end, f"{lacking}{p}.{s}.{m} is missing on dev{owner} (its {split[0]} is present)"))
    return out


def _last_backwards(acts: tuple[Action, ...]) -> dict[tuple[int, int], int]:
    """(pipe, stage) -> step of the chunk's last B or W on this device."""
    return {(a.pipe, a.stage): i for i, a in enumerate(acts) if a.kind in ("B", "W")}


def _sync_problems(program: Program, seen: Seen, d: int, chunk: tuple[int, int], last: int | None) -> list:
    p, s = chunk
    sync = seen.get(("SYNC", p, s, -1))
    if sync is None:
        return [((d, len(program.actions(d))), f"SYNC{p}.{s} is missing on dev{d} (one per chunk, after its backward)")]
    if last is not None and last > sync[1]:
        return [(sync, f"SYNC{p}.{s} on dev{d} at step {sync[1]} comes before backward {program.actions(d)[last]} "
                       f"(step {last}); move it after the chunk's last B/W")]
    return []


# ---- symbolic execution of the lowered program ---------------------------------------------------


def _execution_problems(program: Program) -> list[tuple[Mark, str]]:
    wiring = handoffs(program)
    step = [0] * program.devices  # next program action per device
    sent: set[Key] = set()  # results whose cross-device message has been sent
    done: set[Key] = set()
    waiting: dict[tuple[bool, Key], list[int]] = {}  # (a message?, result) -> devices blocked on it
    runnable = list(range(program.devices))
    while runnable:
        d = runnable.pop()
        row, i = wiring[d], step[d]
        while i < len(row):
            _, need, made, inbound, outbound = row[i]
            if inbound is not None and inbound[1] != inbound[2] and inbound[0] not in sent:
                waiting.setdefault((True, inbound[0]), []).append(d)
                break
            missing = None
            for key in need:
                if key not in done:
                    missing = key
                    break
            if missing is not None:
                waiting.setdefault((False, missing), []).append(d)
                break
            for key in made:
                done.add(key)
                if (False, key) in waiting:
                    runnable.extend(waiting.pop((False, key)))
            if outbound is not None and outbound[1] != outbound[2]:
                sent.add(outbound[0])
                if (True, outbound[0]) in waiting:
                    runnable.extend(waiting.pop((True, outbound[0])))
            i += 1
        step[d] = i
    return [
        ((d, step[d]), _stuck_reason(program, wiring[d][step[d]], d, done, sent))
        for d in range(program.devices)
        if step[d] < len(wiring[d])
    ]


def _crosses(handoff: Handoff | None) -> bool:
    return handoff is not None and handoff[1] != handoff[2]


def _stuck_reason(program: Program, wired: Wired, d: int, done: set[Key], sent: set[Key]) -> str:
    op, need, _, inbound, _ = wired
    if _crosses(inbound) and inbound[0] not in sent:
        msg = message_of(inbound)
        return f"dev{d} blocks receiving {msg.kind}{msg.pipe}.{msg.stage}.{msg.microbatch} from dev{msg.src}"
    waiting = []
    for key in need:
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
