"""The TraceError of a failed capture: each tracer's first line, the user's code that broke, and the fix."""

from __future__ import annotations

import os
import traceback

import torch
from torch import nn

from bitpipe_fx.errors import TraceError

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.abspath(__file__))


def _user_frame(exc: BaseException) -> str:
    """'file:line in func: code' of the innermost frame of the user's code in ``exc``'s traceback."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith((_TORCH_DIR, _OWN_DIR, "<")) and "site-packages/torch" not in f.filename
    ]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def trace_error(model: nn.Module, errors: list[tuple[str, BaseException]]) -> TraceError:
    name = type(model).__name__
    text = " ".join(str(e) for _, e in errors)
    lines = [f"could not capture {name} as a graph."]
    for how, exc in errors:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        where = _user_frame(exc)
        lines.append(f"  {how} failed: {type(exc).__name__}: {first}" + (f"\n    at {where}" if where else ""))
    lowered = text.lower()
    config = getattr(model, "config", None)
    if "cache" in lowered or "past_key_values" in lowered or getattr(config, "use_cache", False):
        lines.append(
            "Construct: a key/value cache (Hugging Face `use_cache=True`). "
            "Fix: build the model with `config.use_cache = False` (training does not need the cache)."
        )
    if any(
        key in lowered
        for key in ("data-dependent", "data dependent", "control flow", "guardondatadependent", "symbolic boolean")
    ):
        lines.append(
            "Construct: data-dependent Python control flow (an `if`/`while`/`bool()` or `.item()` on a tensor's "
            "value). Fix: compute it with tensor ops (torch.where, torch.cond), or mark the submodule that holds it "
            "as a leaf: capture(model, inputs, leaf_modules=['path.to.submodule']) keeps it as one opaque call."
        )
    elif len(lines) == 1 + len(errors):
        lines.append(
            "Fix: make forward traceable by torch.export (see the first error), or mark the offending submodule "
            "as a leaf with leaf_modules=['path.to.submodule']."
        )
    return TraceError("\n".join(lines))
