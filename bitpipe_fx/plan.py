"""Plan: a model's partition, the schedule's placement and program, and the per-stage costs behind them.

A value: derived quantities (per-stage times, device loads, balance), the simulator's cost model, a text
``summary()``, and an exact JSON round-trip, so a plan can be computed once (``bitpipe-fx partition``) and
loaded on every rank. ``bitpipe_fx.compiler`` builds plans.

Times in the plan are seconds per micro-batch: forward = FLOPs / ``flop_rate`` (an assumed rate, default
1e12 FLOP/s) and backward = ``backward_factor`` x forward (2: the input and the weight gradient each cost
about one forward), unless the plan was profiled, in which case both are measured.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.matching import Origin
from bitpipe_fx.passes.cost import StageCost
from bitpipe_fx.ranking import Search
from bitpipe_fx.schedules.ir import Program
from bitpipe_fx.sim.cost import CostModel, PerStage
from bitpipe_fx.sim.engine import simulate
from bitpipe_fx.sim.memory import DeviceMemory, StageMemory, device_memory

DEFAULT_FLOP_RATE = 1e12
NETWORK_FIELDS = ("p2p_latency", "p2p_bandwidth", "allreduce_latency", "allreduce_bandwidth")  # of CostModel
ScheduleOptions = dict[str, object]  # keyword arguments of the schedule generator, passed through as given


@dataclass(frozen=True)
class Plan:
    """Everything needed to cut a model and run it under one schedule."""

    schedule: str
    devices: int
    microbatches: int
    program: Program
    cuts: tuple[int, ...]  # boundary positions in the captured graph's compute-node order
    stages: tuple[StageCost, ...]
    graph_hash: str  # fingerprint of the captured graph the cuts refer to
    model: str = ""  # the model's class name, for people reading the plan
    flop_rate: float = DEFAULT_FLOP_RATE
    backward_factor: float = 2.0
    forward_times: tuple[float, ...] | None = None  # measured seconds per stage (profile=True)
    backward_times: tuple[float, ...] | None = None
    schedule_options: ScheduleOptions = field(default_factory=dict)
    origin: Origin = field(default_factory=Origin)  # the model it was made for: a mismatch names what differs
    network: dict[str, float] = field(default_factory=dict)  # CostModel link fields (seconds, bytes/s); {} = free
    costed: bool = False  # the program was generated with costs=cost_model() (planning.costed_program)
    search: Search | None = None  # the ranking of a schedule="auto" search that chose this plan
    recompute: tuple[bool, ...] = ()  # per stage: its forward is recomputed at the backward (empty = none)

    # ---- derived quantities --------------------------------------------------------------------

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def forward(self) -> tuple[float, ...]:
        """Seconds of one forward per stage (measured, else FLOPs / flop_rate)."""
        if self.forward_times is not None:
            return self.forward_times
        return tuple(s.flops / self.flop_rate for s in self.stages)

    @property
    def backward(self) -> tuple[float, ...]:
        if self.backward_times is not None:
            return self.backward_times
        return tuple(f * self.backward_factor for f in self.forward)

    def stage_devices(self, stage: int) -> tuple[int, ...]:
        """The device of each pipe's copy of ``stage`` (one entry per pipe)."""
        return tuple(row[stage] for row in self.program.placement.table)

    def device_loads(self) -> tuple[float, ...]:
        """Compute seconds per step on each device: its chunks' forward+backward times x their pipe's micro-batches."""
        per_pipe = [self.program.pipe_of.count(p) for p in range(self.program.pipes)]
        loads = [0.0] * self.devices
        for p, row in enumerate(self.program.placement.table):
            for s, d in enumerate(row):
                loads[d] += per_pipe[p] * (self.forward[s] + self.backward[s])
        return tuple(loads)

    @property
    def balance(self) -> float:
        """max/mean device load (1.0 = perfectly balanced)."""
        loads = self.device_loads()
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean else 1.0

    def cost_model(self, **overrides: PerStage) -> CostModel:
        """The simulator's CostModel for this plan: its stage costs and ``network``, then ``overrides``."""
        fields_ = {
            "forward": self.forward,
            "backward": self.backward,
            "activation_bytes": tuple(float(s.bytes_sent) for s in self.stages),
            "param_bytes": tuple(float(s.param_bytes) for s in self.stages),
            **self.network,
        }
        if any(self.recompute):
            fields_["recompute"] = tuple(f if again else 0.0 for f, again in zip(self.forward, self.recompute))
        return CostModel(**(fields_ | overrides))

    def stage_memory(self) -> tuple[StageMemory, ...]:
        """Each stage's sizes for the memory model (sim/memory.py)."""
        return tuple(StageMemory(float(s.param_bytes), float(s.saved_bytes), float(s.bytes_sent), float(s.input_bytes),
                                 float(s.weight_grad_bytes)) for s in self.stages)

    def memory(self, state_copies: int = 2, lookahead: int = 4) -> tuple[DeviceMemory, ...]:
        """Predicted peak bytes per device, by kind, under this plan's recomputation (sim/memory.py)."""
        return device_memory(self.program, self.stage_memory(), self.recompute, state_copies=state_copies,
                             lookahead=lookahead)

    # ---- text ----------------------------------------------------------------------------------

    def summary(self) -> str:
        """Tables per stage and per device, and the balance ratio."""
        pipes = self.program.pipes
        lines = [
            f"Plan for {self.model or 'model'}: schedule {self.schedule}, D={self.devices} devices, "
            f"N={self.microbatches} micro-batches, S={self.num_stages} stages, {pipes} pipe(s)"
            + (", profiled times" if self.forward_times is not None else f", times at {self.flop_rate:.3g} FLOP/s"),
            "",
            f"{'stage':>5} {'nodes':>5} {'params':>9} {'param B':>9} {'FLOPs/mb':>10} {'act B/mb':>9} "
            f"{'sent B/mb':>9} {'fwd s':>9} {'bwd s':>9}  {'devices':<9} first .. last node",
        ]
        for s in self.stages:
            devs = ",".join(str(d) for d in self.stage_devices(s.index))
            lines.append(
                f"{s.index:>5} {s.nodes:>5} {_n(s.params):>9} {_n(s.param_bytes):>9} {_n(s.flops):>10} "
                f"{_n(s.activation_bytes):>9} {_n(s.bytes_sent):>9} {self.forward[s.index]:>9.3g} "
                f"{self.backward[s.index]:>9.3g}  {devs:<9} {s.first_node} .. {s.last_node}"
            )
        loads = self.device_loads()
        header = f"{'device':>6} {'chunks (pipe.stage)':<24} {'load s/step':>11} {'weights B':>10} {'act B/mb':>9}"
        lines += ["", header]
        for d in range(self.devices):
            chunks = self.program.placement.chunks(d)
            weights = sum(self.stages[s].param_bytes for _, s in chunks)
            acts = sum(self.stages[s].activation_bytes for _, s in chunks)
            names = " ".join(f"{p}.{s}" for p, s in chunks)
            lines.append(f"{d:>6} {names:<24} {loads[d]:>11.4g} {_n(weights):>10} {_n(acts):>9}")
        spread = max(loads) / min(loads) if min(loads) else float("inf")
        lines += ["", f"balance: max/mean device load = {self.balance:.4f}, max/min = {spread:.4f}"]
        if any(self.recompute):
            again = [str(s) for s, f in enumerate(self.recompute) if f]
            lines += [f"recompute: stages {', '.join(again)} ({len(again)} of {self.num_stages}) recompute their "
                      "forward at the backward"]
        peaks = self.memory()
        lines += [f"predicted peak memory per device: {' '.join(_n(m.total) + 'B' for m in peaks)}"]
        lines += self._simulated()
        if self.search is not None:
            lines += ["", *self.search.table()]
        return "\n".join(lines)

    def _simulated(self) -> list[str]:
        report = simulate(self.program, self.cost_model())
        links = "with the plan's link costs" if self.network else "no communication cost"
        generated = "program generated with these costs" if self.costed else "program generated with unit costs"
        return [
            f"simulated step ({links}; {generated}): makespan {report.makespan:.4g} s, "
            f"bubble {100 * report.bubble_ratio:.1f}% of the makespan"
        ]

    def __str__(self) -> str:
        return self.summary()

    # ---- JSON ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, object]:
        data = {k: v for k, v in asdict(self).items() if k not in ("program", "stages", "origin", "search")}
        data["origin"] = self.origin.to_dict()
        data["search"] = None if self.search is None else self.search.to_dict()
        data["program"] = self.program.to_dict()
        data["stages"] = [asdict(s) for s in self.stages]
        data["checksum"] = checksum(data)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Plan:
        """The plan ``to_dict`` wrote; ConfigError when it was edited since (its checksum) or is inconsistent."""
        if "checksum" in data and data["checksum"] != checksum(data):
            raise ConfigError(
                f"the plan was edited after it was written (its checksum {str(data['checksum'])[:16]}... does not "
                f"match its content, {checksum(data)[:16]}...): the program, cuts and costs must come from one "
                "partition; re-run `bitpipe-fx partition` (or Plan.save) instead of editing the numbers"
            )
        try:
            plan = cls(
                schedule=str(data["schedule"]),
                devices=int(data["devices"]),
                microbatches=int(data["microbatches"]),
                program=Program.from_dict(data["program"]),
                cuts=tuple(int(c) for c in data["cuts"]),
                stages=tuple(StageCost(**row) for row in data["stages"]),
                graph_hash=str(data["graph_hash"]),
                model=str(data.get("model", "")),
                flop_rate=float(data.get("flop_rate", DEFAULT_FLOP_RATE)),
                backward_factor=float(data.get("backward_factor", 2.0)),
                forward_times=_floats(data.get("forward_times")),
                backward_times=_floats(data.get("backward_times")),
                schedule_options=dict(data.get("schedule_options") or {}),
                origin=Origin.from_dict(data.get("origin")),
                network={str(k): float(v) for k, v in dict(data.get("network") or {}).items()},
                costed=bool(data.get("costed", False)),
                search=None if data.get("search") is None else Search.from_dict(data["search"]),
                recompute=tuple(bool(f) for f in data.get("recompute") or ()),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"not a bitpipe_fx plan: {exc!r}; write plans with Plan.save or `bitpipe-fx partition`"
            ) from exc
        _check_consistent(plan)
        return plan

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"plan is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"no plan file at {str(p)!r}; create one with `bitpipe-fx partition ... --out {p}`")
        try:
            return cls.from_json(p.read_text())
        except ConfigError as exc:
            raise ConfigError(f"plan file {str(p)!r}: {exc}") from exc


def checksum(data: Mapping[str, object]) -> str:
    """SHA-256 of a plan's JSON form without its ``checksum`` field (keys sorted, as JSON reads them back)."""
    body = json.loads(json.dumps({k: v for k, v in data.items() if k != "checksum"}))
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _check_consistent(plan: Plan) -> None:
    """ConfigError when the plan's numbers disagree with its program (a plan edited by hand, checksum removed)."""
    program = plan.program
    for name, value, want in (("devices", plan.devices, program.devices),
                              ("microbatches", plan.microbatches, program.microbatches),
                              ("stages", plan.num_stages, program.stages),
                              ("cuts", len(plan.cuts), program.stages - 1)):
        if value != want:
            raise ConfigError(f"the plan's {name} is {value} but its program {program.name!r} has {want}; the plan "
                              "was edited or is damaged: re-run `bitpipe-fx partition`")
    if any(b <= a for a, b in zip(plan.cuts, plan.cuts[1:])) or any(c < 1 for c in plan.cuts):
        raise ConfigError(f"the plan's cuts {list(plan.cuts)} do not increase strictly from 1; the plan was edited "
                          "or is damaged: re-run `bitpipe-fx partition`")


def _floats(values: Iterable[float] | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


def _n(x: float) -> str:
    """Compact count: 1234567 -> 1.23M."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return str(int(x))
