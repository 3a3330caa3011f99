"""Schedule IR: actions, placements and per-device programs (pure Python, no torch).

Text form of an action: ``F0.3.5`` = kind F, pipe 0, stage 3, micro-batch 5 (all 0-based);
``SYNC1.4`` = start the replica all-reduce of this device's copy of (pipe 1, stage 4).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

from bitpipe_fx.errors import ScheduleError

COMPUTE_KINDS = ("F", "B", "I", "W")
KINDS = (*COMPUTE_KINDS, "SYNC")
_ACTION_RE = re.compile(r"^(SYNC|F|B|I|W)(\d+)\.(\d+)(?:\.(\d+))?$")


class _ActionFields(NamedTuple):
    kind: str
    pipe: int
    stage: int
    microbatch: int = -1


class Action(_ActionFields):
    """One unit of work on one device. ``microbatch`` is -1 for SYNC.

    A named tuple, so that hashing, equality and ordering (by kind, pipe, stage, micro-batch) run at C speed:
    the schedulers, validator and simulator look up and compare hundreds of thousands of actions.
    """

    __slots__ = ()

    def __new__(cls, kind: str, pipe: int, stage: int, microbatch: int = -1) -> Action:
        if kind not in KINDS:
            raise ScheduleError(f"unknown action kind {kind!r}; expected one of {KINDS}")
        if (kind == "SYNC") != (microbatch == -1):
            raise ScheduleError(
                f"{kind} action needs {'no' if kind == 'SYNC' else 'a'} micro-batch, got microbatch={microbatch}"
            )
        return tuple.__new__(cls, (kind, pipe, stage, microbatch))

    def __str__(self) -> str:
        base = f"{self.kind}{self.pipe}.{self.stage}"
        return base if self.kind == "SYNC" else f"{base}.{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Inverse of ``str(action)``."""
        m = _ACTION_RE.match(text.strip())
        if not m:
            raise ScheduleError(
                f"cannot parse action {text!r}; write KIND PIPE.STAGE.MICROBATCH like 'F0.3.5' "
                "or SYNC PIPE.STAGE like 'SYNC1.4'"
            )
        kind, pipe, stage, mb = m.groups()
        return cls(kind, int(pipe), int(stage), -1 if mb is None else int(mb))

    @property
    def chunk(self) -> tuple[int, int]:
        """(pipe, stage): the model chunk this action runs on."""
        return (self.pipe, self.stage)


@dataclass(frozen=True)
class Placement:
    """Where every (pipe, stage) chunk lives: ``table[pipe][stage] -> device``."""

    devices: int
    table: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if not self.table or len({len(row) for row in self.table}) != 1:
            raise ScheduleError(f"placement table must have one equal-length row per pipe, got {self.table}")
        for row in self.table:
            for d in row:
                if not 0 <= d < self.devices:
                    raise ScheduleError(f"placement names device {d}, outside 0..{self.devices - 1}")

    @property
    def pipes(self) -> int:
        return len(self.table)

    @property
    def stages(self) -> int:
        return len(self.table[0])

    def device(self, pipe: int, stage: int) -> int:
        return self.table[pipe][stage]

    def chunks(self, device: int) -> tuple[tuple[int, int], ...]:
        """The (pipe, stage) chunks held by ``device``, pipe-major order."""
        return tuple(
            (p, s) for p, row in enumerate(self.table) for s, d in enumerate(row) if d == device
        )

    def replica_devices(self, stage: int) -> tuple[int, ...]:
        """Sorted devices holding a copy of ``stage`` (one per pipe, deduplicated)."""
        return tuple(sorted({row[stage] for row in self.table}))


@dataclass(frozen=True)
class Program:
    """A schedule: one ordered action list per device, plus what it was generated for."""

    name: str
    placement: Placement
    pipe_of: tuple[int, ...]  # micro-batch -> pipe
    device_actions: tuple[tuple[Action, ...], ...]

    def __post_init__(self) -> None:
        if len(self.device_actions) != self.placement.devices:
            raise ScheduleError(
                f"program has {len(self.device_actions)} action lists for "
                f"{self.placement.devices} devices"
            )

    @property
    def devices(self) -> int:
        return self.placement.devices

    @property
    def stages(self) -> int:
        return self.placement.stages

    @property
    def pipes(self) -> int:
        return self.placement.pipes

    @property
    def microbatches(self) -> int:
        return len(self.pipe_of)

    def actions(self, device: int) -> tuple[Action, ...]:
        return self.device_actions[device]

    @cached_property
    def split_backward(self) -> bool:
        """True when backwards are split into I (input grad) and W (weight grad)."""
        return any(a.kind in ("I", "W") for acts in self.device_actions for a in acts)

    # ---- text / JSON / CSV ------------------------------------------------------------------

    def to_text(self) -> str:
        """One line per device: ``dev0: F0.0.0 F0.0.1 ...``."""
        return "\n".join(
            f"dev{d}: " + " ".join(str(a) for a in acts) for d, acts in enumerate(self.device_actions)
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "devices": self.devices,
            "placement": [list(row) for row in self.placement.table],
            "pipe_of": list(self.pipe_of),
            "actions": [[str(a) for a in acts] for acts in self.device_actions],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Program:
        try:
            placement = Placement(int(data["devices"]), tuple(tuple(int(d) for d in r) for r in data["placement"]))
            acts = tuple(tuple(Action.parse(a) for a in row) for row in data["actions"])
            return cls(str(data.get("name", "custom")), placement, tuple(int(p) for p in data["pipe_of"]), acts)
        except KeyError as exc:
            raise ScheduleError(
                f"program JSON lacks key {exc}; expected name, devices, placement, pipe_of, actions"
            ) from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Program:
        return cls.from_dict(json.loads(text))

    def to_csv(self) -> str:
        """Rows ``device,step,action``; placement and pipe_of go in '#' header lines."""
        out = io.StringIO()
        out.write(f"# name={self.name}\n# devices={self.devices}\n")
        out.write("# placement=" + ";".join(",".join(map(str, r)) for r in self.placement.table) + "\n")
        out.write("# pipe_of=" + ",".join(map(str, self.pipe_of)) + "\n")
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["device", "step", "action"])
        for d, acts in enumerate(self.device_actions):
            for i, a in enumerate(acts):
                w.writerow([d, i, str(a)])
        return out.getvalue()

    @classmethod
    def from_csv(cls, text: str) -> Program:
        meta: dict[str, str] = {}
        body = []
        for line in text.splitlines():
            if line.startswith("#"):
                key, _, value = line[1:].strip().partition("=")
                meta[key] = value
            elif line.strip():
                body.append(line)
        try:
            devices = int(meta["devices"])
            table = tuple(tuple(int(x) for x in r.split(",")) for r in meta["placement"].split(";"))
            pipe_of = tuple(int(x) for x in meta["pipe_of"].split(",")) if meta["pipe_of"] else ()
        except KeyError as exc:
            raise ScheduleError(f"program CSV lacks header line '# {exc.args[0]}=...'") from exc
        rows: list[list[tuple[int, Action]]] = [[] for _ in range(devices)]
        for rec in csv.DictReader(body):
            rows[int(rec["device"])].append((int(rec["step"]), Action.parse(rec["action"])))
        acts = tuple(tuple(a for _, a in sorted(r)) for r in rows)
        return cls(meta.get("name", "custom"), Placement(devices, table), pipe_of, acts)


# ---- placements of the schedule families (DESIGN.md, "Concepts") -------------------------------


def linear_placement(devices: int, chunks_per_device: int = 1) -> Placement:
    """gpipe / 1f1b (v=1) and interleaved (v>1): stage k on device k mod D."""
    return Placement(devices, (tuple(k % devices for k in range(devices * chunks_per_device)),))


def v_placement(devices: int) -> Placement:
    """V-shape (zbv, dualpipev): S = 2D, stage k on k for k < D, else 2D-1-k."""
    return Placement(devices, (_v_row(devices),))


def chimera_placement(devices: int) -> Placement:
    """Chimera: S = D; down k -> k, up k -> D-1-k."""
    return Placement(devices, (tuple(range(devices)), tuple(reversed(range(devices)))))


def bitpipe_placement(devices: int) -> Placement:
    """BitPipe: two V pipes, the up pipe the mirror of the down pipe (S = 2D)."""
    down = _v_row(devices)
    return Placement(devices, (down, tuple(devices - 1 - d for d in down)))


def _v_row(devices: int) -> tuple[int, ...]:
    return tuple(k if k < devices else 2 * devices - 1 - k for k in range(2 * devices))
