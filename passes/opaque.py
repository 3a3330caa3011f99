"""opaque calls: leaf modules and custom autograd Functions kept as one call each in the captured graph.

torch.export traces into every module (and stops at data-dependent Python control flow, such as a
mixture-of-experts loop over the experts that received tokens) and inlines the forward of every
``torch.autograd.Function`` (so a custom backward, e.g. a straight-through estimator, would be lost). Instead,
capture runs the model once eagerly (``record``: no grad, RNG state and buffers restored) to learn each opaque
call's input and output structure and shapes; under torch.export (``mark``) each call becomes one
``bitpipe_fx::opaque`` marker op whose fake outputs have those shapes; ``emit`` turns every marker into a
``call_module`` of the leaf (its parameters stay in the stage that runs it, under their FQNs) or a call of the
Function's ``apply``. At run time autograd therefore runs the leaf's own code and the Function's own backward.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from bitpipe_fx.errors import TraceError

_TENSOR = object()  # marks a tensor position in a flat argument list
_CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.layout, torch.memory_format)
_FUNCTION_APPLY = torch.autograd.Function.__dict__["apply"]  # the classmethod every Function inherits


@dataclass(frozen=True)
class _Meta:
    """Shape, dtype and device of one tensor an opaque call returned."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class OpaqueCall:
    """One call of a leaf module or of a custom autograd Function, as the eager run saw it."""

    target: str  # the leaf's FQN, or the Function's qualified class name
    function: type[torch.autograd.Function] | None  # None for a leaf module
    in_spec: pytree.TreeSpec  # structure of (args, kwargs)
    in_leaves: tuple[Any, ...]  # _TENSOR or the (specialised) non-tensor value, per flat input
    out_spec: pytree.TreeSpec
    out_leaves: tuple[Any, ...]  # (shape, dtype, device) per tensor output, else the constant value


class FunctionCall:
    """Graph target that applies one custom autograd Function (so its own backward runs)."""

    def __init__(self, function: type[torch.autograd.Function]) -> None:
        self.function = function
        self.__name__ = f"apply_{function.__name__}"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function.apply(*args, **kwargs)

    def __repr__(self) -> str:
        return f"FunctionCall({self.function.__qualname__})"


@functools.cache
def function_call(function: type[torch.autograd.Function]) -> FunctionCall:
    """The one graph target of ``function`` (cached, so graphs of the same model compare equal)."""
    return FunctionCall(function)


def tensor_leaves(value: Any) -> list[torch.Tensor]:
    """The tensors of an opaque call's output, in pytree order (what the marker op returned)."""
    return [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]


def is_custom(function: type) -> bool:
    """A Function written outside torch: its backward is the user's, not autograd's of its forward."""
    module = function.__module__ or ""
    return module != "torch" and not module.startswith("torch.")


_PENDING: dict[int, OpaqueCall] = {}  # marker key -> the call whose fake outputs it must produce
_KEYS = itertools.count()


@torch.library.custom_op("bitpipe_fx::opaque", mutates_args=())
def _opaque(inputs: list[torch.Tensor], key: int) -> list[torch.Tensor]:
    raise TraceError("the bitpipe_fx::opaque marker ran outside capture; it only exists while torch.export traces")


@_opaque.register_fake
def _opaque_fake(inputs: list[torch.Tensor], key: int) -> list[torch.Tensor]:
    leaves = [x for x in _PENDING[key].out_leaves if isinstance(x, _Meta)]
    return [torch.empty(m.shape, dtype=m.dtype, device=m.device) for m in leaves]


MARKER = torch.ops.bitpipe_fx.opaque.default


def leaf_instances(model: nn.Module, leaves: Sequence[str | type]) -> dict[str, nn.Module]:
    """FQN -> module for every module named in ``leaves`` (by FQN or class), outermost only."""
    names = {x for x in leaves if isinstance(x, str)}
    types = tuple(x for x in leaves if isinstance(x, type))
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{outer}.") for outer in found)
        if name and not inside and (name in names or (types and isinstance(module, types))):
            found[name] = module
    return found


def _flat_in(target: str, args: tuple, kwargs: dict) -> tuple[list[Any], pytree.TreeSpec, tuple[Any, ...]]:
    flat, spec = pytree.tree_flatten((args, kwargs))
    for x in flat:
        if not isinstance(x, (torch.Tensor, *_CONSTANT_TYPES)):
            raise TraceError(
                f"{target} is called with a {type(x).__name__} argument; an opaque call (leaf module or autograd "
                "Function) can take tensors and plain constants only: pass tensors, or make a module around it the leaf"
            )
    return flat, spec, tuple(_TENSOR if isinstance(x, torch.Tensor) else x for x in flat)


class _Interceptor:
    """Routes leaf-module calls and custom Function applications to ``handle(target, function, call, args, kw)``."""

    def __init__(self, leaves: dict[str, nn.Module], handle: Callable[..., Any]) -> None:
        self.leaves = leaves
        self.handle = handle

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
            original = _FUNCTION_APPLY.__get__(None, cls)
            if not is_custom(cls):
                return original(*args, **kwargs)
            return self.handle(f"{cls.__module__}.{cls.__qualname__}", cls, original, args, kwargs)

        def wrap(name: str, module: nn.Module) -> Callable[..., Any]:
            forward = module.forward
            return lambda *args, **kwargs: self.handle(name, None, forward, args, kwargs)

        own = {name: module.__dict__.get("forward") for name, module in self.leaves.items()}
        for name, module in self.leaves.items():
            module.forward = wrap(name, module)
        torch.autograd.Function.apply = classmethod(apply)
        try:
            yield
        finally:
            torch.autograd.Function.apply = _FUNCTION_APPLY
            for name, module in self.leaves.items():
                if own[name] is None:
                    del module.forward
                else:
                    module.forward = own[name]


def record(model: nn.Module, args: tuple, kwargs: dict, leaves: dict[str, nn.Module]) -> list[OpaqueCall]:
    """Run ``model`` once eagerly and return its opaque calls in call order (calls nested in one are its own)."""
    calls: list[OpaqueCall] = []
    depth = [0]

    def handle(target: str, function: type | None, call: Callable[..., Any], a: tuple, kw: dict) -> Any:
        if depth[0]:
            return call(*a, **kw)
        _, in_spec, in_leaves = _flat_in(target, a, kw)
        depth[0] += 1
        try:
            out = call(*a, **kw)
        finally:
            depth[0] -= 1
        flat, out_spec = pytree.tree_flatten(out)
        metas = tuple(_Meta(tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else x for x in flat)
        calls.append(OpaqueCall(target, function, in_spec, in_leaves, out_spec, metas))
        return out

    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), _Interceptor(leaves, handle).active():
            model(*args, **kwargs)
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return calls


class Unrecorded(Exception):
    """torch.export met an opaque call that the eager recording did not see (record first, then export)."""


@contextlib.contextmanager
def mark(calls: list[OpaqueCall] | None, leaves: dict[str, nn.Module]) -> Iterator[dict[int, OpaqueCall]]:
    """While active, every opaque call becomes one marker op; yields marker key -> call (for ``emit``)."""
    keys: dict[int, OpaqueCall] = {}
    position = itertools.count()

    def handle(target: str, function: type | None, call: Callable[..., Any], a: tuple, kw: dict) -> Any:
        i = next(position)
        if calls is None or i >= len(calls):
            raise Unrecorded(target)
        expected = calls[i]
        flat, in_spec, in_leaves = _flat_in(target, a, kw)
        if expected.target != target or expected.in_spec != in_spec or expected.in_leaves != in_leaves:
            raise TraceError(
                f"opaque call #{i} is {target} under torch.export but {expected.target} with other arguments when "
                "run eagerly: the model must make the same leaf-module and autograd.Function calls on every run"
            )
        key = next(_KEYS)
        keys[key] = _PENDING[key] = expected
        outputs = iter(MARKER([x for x in flat if isinstance(x, torch.Tensor)], key))
        values = [next(outputs) if isinstance(m, _Meta) else m for m in expected.out_leaves]
        return pytree.tree_unflatten(values, expected.out_spec)

    try:
        with _Interceptor(leaves, handle).active():
            yield keys
    finally:
        for key in keys:
            _PENDING.pop(key, None)


def emit(graph: fx.Graph, node: fx.Node, lookup: Callable[[fx.Node], Any], call: OpaqueCall) -> fx.Node:
    """Replace marker ``node``: the real call on the looked-up inputs, then the list of its tensor outputs."""
    inputs = iter(lookup(x) for x in node.args[0])
    flat = [next(inputs) if x is _TENSOR else x for x in call.in_leaves]
    args, kwargs = pytree.tree_unflatten(flat, call.in_spec)
    if call.function is None:
        out = graph.call_module(call.target, tuple(args), dict(kwargs))
    else:
        out = graph.call_function(function_call(call.function), tuple(args), dict(kwargs))
    tensors = graph.call_function(tensor_leaves, (out,))
    tensors.meta.update(node.meta)
    return tensors


@contextlib.contextmanager
def functions_as_calls(make_call: Callable[[type, Callable[..., Any], tuple, dict], Any]) -> Iterator[None]:
    """While active, applying a custom Function calls ``make_call(function, apply, args, kwargs)`` (torch.fx)."""
    with _Interceptor({}, lambda target, function, call, a, kw: make_call(function, call, a, kw)).active():
        yield
