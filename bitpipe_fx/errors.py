"""One exception hierarchy for everything bitpipe_fx refuses or fails at.

Every message names the offending value and says what to do instead.
"""

from __future__ import annotations


class BitPipeError(Exception):
    """Base class of every error bitpipe_fx raises on purpose."""


class ConfigError(BitPipeError, ValueError):
    """A user-supplied argument or combination of arguments is invalid."""


class TraceError(BitPipeError):
    """The model could not be captured as a graph."""


class PartitionError(BitPipeError):
    """The graph cannot be cut into the requested stages."""


class ScheduleError(BitPipeError):
    """A schedule cannot be generated for these settings, or a program is invalid."""


class PipelineRuntimeError(BitPipeError, RuntimeError):
    """Execution failed: a peer died, stalled, or sent something unexpected."""


class NonFiniteError(BitPipeError, ArithmeticError):
    """A step's loss or gradient was not finite (NaN or infinite); the update was not applied."""


class Terminated(KeyboardInterrupt):
    """The launcher got SIGTERM and stopped every rank (like Ctrl-C, not an error of the run)."""


__all__ = [
    "BitPipeError",
    "ConfigError",
    "NonFiniteError",
    "PartitionError",
    "PipelineRuntimeError",
    "ScheduleError",
    "Terminated",
    "TraceError",
]
