"""Event simulator of schedule programs, Chrome-trace export and Gantt charts (pure Python, no torch)."""

from bitpipe_fx.sim.cost import CostModel
from bitpipe_fx.sim.engine import simulate
from bitpipe_fx.sim.report import SimReport
from bitpipe_fx.sim.trace import TraceEvent, chrome_trace, read_chrome_trace, write_chrome_trace

__all__ = [
    "CostModel",
    "SimReport",
    "TraceEvent",
    "chrome_trace",
    "read_chrome_trace",
    "simulate",
    "write_chrome_trace",
]
