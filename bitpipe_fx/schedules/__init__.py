"""Schedule layer: IR, one generator module per family, validation. Pure Python, never imports torch."""

from bitpipe_fx.schedules.comm import (
    Comm,
    Message,
    consumed_message,
    consumed_value,
    lower,
    messages,
    produced_message,
    produced_value,
)
from bitpipe_fx.schedules.ir import Action, Placement, Program
from bitpipe_fx.schedules.registry import SCHEDULES, generate, register
from bitpipe_fx.schedules.validate import validate

# generator modules register themselves on import
from bitpipe_fx.schedules import (  # noqa: F401  isort: skip
    bitpipe,
    bitpipe_paper,
    chimera,
    dualpipev,
    gpipe,
    interleaved,
    one_f_one_b,
    zbv,
)

__all__ = [
    "SCHEDULES",
    "Action",
    "Comm",
    "Message",
    "Placement",
    "Program",
    "consumed_message",
    "consumed_value",
    "generate",
    "lower",
    "messages",
    "produced_message",
    "produced_value",
    "register",
    "validate",
]
