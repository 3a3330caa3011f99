"""The TraceError of a failed capture: each tracer's first line, the user's code that broke, and the fix; or,
when the model's own forward fails on the example inputs outside any tracer, that failure and where."""

from __future__ import annotations

import os
import traceback
from collections.abc import Sequence

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


_DATA_DEPENDENT = ("data-dependent", "data dependent", "control flow", "guardondatadependent", "symbolic boolean")


def is_data_dependent(exc: BaseException) -> bool:
    """Whether ``exc`` is a tracer stopping at Python control flow on a tensor's value."""
    text = f"{type(exc).__name__} {exc}".lower()
    return any(key in text for key in _DATA_DEPENDENT)


def failing_module(model: nn.Module, exc: BaseException) -> str | None:
    """FQN of the innermost module of ``model`` whose code raised ``exc`` ('' for ``model`` itself, None if none)."""
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = names[id(owner)]
        tb = tb.tb_next
    return found


def _data_dependent_fix(model: nn.Module, where: str | None) -> str:
    construct = (
        "Construct: data-dependent Python control flow (an `if`/`for`/`while`/`bool()` or `.item()` on a "
        "tensor's value)"
    )
    tensor_ops = "compute it with tensor ops (torch.where, torch.cond)"
    if where is None or where == "":
        return (
            f"{construct} in {type(model).__name__}.forward itself. Fix: {tensor_ops}, or move it into a submodule "
            "and keep that as one opaque call: leaf_modules=['path.to.submodule'] (capture and compile take it)."
        )
    cls = type(model.get_submodule(where)).__name__
    return (
        f"{construct} in {where} ({cls}). Fix: {tensor_ops}, or keep that module as one opaque call: "
        f"leaf_modules=['{where}'] (or leaf_modules=[{cls}] for every {cls}; capture and compile take it)."
    )


def trace_error(
    model: nn.Module, errors: list[tuple[str, BaseException]], leaves: Sequence[str | type] = ()
) -> TraceError:
    """One TraceError for every tracer that failed on ``model`` (with ``leaves`` kept opaque)."""
    name = type(model).__name__
    text = " ".join(str(e) for _, e in errors)
    opaque = [x if isinstance(x, str) else x.__name__ for x in leaves]
    lines = [f"could not capture {name} as a graph" + (f" (opaque: {', '.join(opaque)})." if opaque else ".")]
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
    dependent = [exc for _, exc in errors if is_data_dependent(exc)]
    if dependent:
        lines.append(_data_dependent_fix(model, failing_module(model, dependent[0])))
    elif len(lines) == 1 + len(errors):
        lines.append(
            "Fix: make forward traceable by torch.export (see the first error), or keep the offending submodule "
            "as one opaque call with leaf_modules=['path.to.submodule']."
        )
    return TraceError("\n".join(lines))


def own_failure(model: nn.Module, args: tuple, kwargs: dict) -> TraceError | None:
    """A TraceError when ``model(*args, **kwargs)`` itself raises (no tracer involved), naming the module whose
    code raised, the user's line and the exception; None when the plain call works."""
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as exc:
        where = failing_module(model, exc)
        module = f"{where} ({type(model.get_submodule(where)).__name__})" if where else f"{type(model).__name__} itself"
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        line = _user_frame(exc)
        return TraceError(
            f"{type(model).__name__}'s forward raised {type(exc).__name__}: {first} on the example inputs, in "
            f"{module}" + (f" at {line}" if line else "") + "; it fails without any tracer too (model(*example_inputs)"
            "): fix the model or pass example inputs it accepts"
        )
    return None
