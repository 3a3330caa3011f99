"""bitpipe_fx: a pipeline-parallel training compiler for PyTorch.

Importing the package stays light (no torch); the torch-facing API is loaded on first use.
"""

from __future__ import annotations

import importlib

from bitpipe_fx.errors import (
    BitPipeError,
    ConfigError,
    NonFiniteError,
    PartitionError,
    PipelineRuntimeError,
    ScheduleError,
    TraceError,
)

__version__ = "0.1.0"

_LAZY = {
    "compile": ("bitpipe_fx.api", "compile"),
    "CompiledPipeline": ("bitpipe_fx.api", "CompiledPipeline"),
    "inspect": ("bitpipe_fx.compiler", "inspect"),
    "Plan": ("bitpipe_fx.plan", "Plan"),
    "optim": ("bitpipe_fx.optim", None),
    "export": ("bitpipe_fx.export", None),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'bitpipe_fx' has no attribute {name!r}")
    module, attr = _LAZY[name]
    mod = importlib.import_module(module)
    return mod if attr is None else getattr(mod, attr)


__all__ = [
    "BitPipeError",
    "CompiledPipeline",
    "ConfigError",
    "NonFiniteError",
    "PartitionError",
    "PipelineRuntimeError",
    "Plan",
    "ScheduleError",
    "TraceError",
    "compile",
    "inspect",
    "optim",
]
