"""``recompute=``: which stages recompute their forward at the backward instead of storing activations.

"none" stores every stage's activations; "full" recomputes every stage (each keeps only its inputs from F
to its B or I); "auto" recomputes the fewest stages that bring every device's predicted peak (the memory
model, sim/memory.py) under ``memory_limit``, choosing the stages that save most bytes per second of forward
added. The choice is a per-stage tuple kept in the Plan, so every rank runs the same one.
"""

from __future__ import annotations

from dataclasses import replace

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.plan import Plan
from bitpipe_fx.sim.memory import RECOMPUTE_MODES as MODES
from bitpipe_fx.sim.memory import choose_recompute


def check_mode(value: object) -> str:
    """``value`` if it is a recompute mode, else ConfigError naming it and the modes."""
    if not isinstance(value, str) or value not in MODES:
        raise ConfigError(f"recompute must be one of {', '.join(repr(m) for m in MODES)}, got {value!r}")
    return value


def stage_flags(plan: Plan, mode: str, limit: float | None) -> tuple[bool, ...] | None:
    """Per stage, whether it recomputes under ``mode``; None when "auto" cannot fit ``limit`` at all. "auto"
    without a limit recomputes nothing (nothing to fit)."""
    if check_mode(mode) == "none" or (mode == "auto" and limit is None):
        return (False,) * plan.num_stages
    if mode == "full":
        return (True,) * plan.num_stages
    return choose_recompute(plan.program, plan.stage_memory(), limit, plan.forward)  # type: ignore[arg-type]


def with_recompute(plan: Plan, mode: str, limit: float | None) -> Plan:
    """``plan`` with the recomputation ``mode`` chooses; ConfigError when "auto" finds none that fits ``limit``."""
    if mode == "auto" and limit is None:
        raise ConfigError("recompute='auto' needs memory_limit (peak bytes per device, e.g. memory_limit='12GiB'); "
                          "give it, or use recompute='full' or 'none'")
    flags = stage_flags(plan, mode, limit)
    if flags is None:
        full = replace(plan, recompute=(True,) * plan.num_stages).memory()
        raise ConfigError(
            f"recompute='auto' cannot fit memory_limit={limit:.6g} bytes with schedule {plan.schedule}: even "
            f"recomputing every stage the predicted peak is {max(m.total for m in full):.6g} bytes; raise the "
            "limit, use more devices or another schedule (schedule='auto' searches them)"
        )
    return replace(plan, recompute=flags if any(flags) else ())
