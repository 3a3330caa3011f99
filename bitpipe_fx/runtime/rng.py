"""The randomness rule: every global micro-batch of a step draws one random stream, whatever the split.

Global micro-batch g = dp_index * N + m of step t starts from the generator state seeded by
``microbatch_key(seed, t, g)``; the first stage's forward runs from that state, and the state it leaves
travels with the activation (one uint8 tensor: the CPU generator state, then the CUDA generator state of
the stage's device when the stage runs on CUDA), so stage k+1 continues the stream the unsplit model would
have drawn. The non-pipelined reference runs micro-batch g of step t under ``keyed(seed, t, g)``. The
caller's global generator state is saved before and restored after every such forward (fork_rng-style).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

CPU = torch.device("cpu")


def microbatch_key(seed: int, step: int, index: int) -> int:
    """The 63-bit generator seed of global micro-batch ``index`` of step ``step`` (0-based) under ``seed``."""
    digest = hashlib.blake2b(f"bitpipe-rng:{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def device_of(module: nn.Module) -> torch.device:
    """Where a stage runs: the device of its first parameter or buffer (CPU for a stage without any)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return CPU


def _cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def pack(device: torch.device) -> torch.Tensor:
    """The current global generator state (CPU, then the CUDA state of ``device`` on CUDA) as one uint8 tensor
    on ``device`` (so that it travels in the activation bundle)."""
    parts = [torch.get_rng_state()]
    if _cuda(device):
        parts.append(torch.cuda.get_rng_state(device))
    return torch.cat(parts).to(device)


def _restore(state: torch.Tensor, device: torch.device) -> None:
    """Make ``state`` (from ``pack``/``key_state``) the global generator state for a stage on ``device``."""
    state = state.to(CPU)
    cpu_bytes = torch.get_rng_state().numel()
    torch.set_rng_state(state[:cpu_bytes].clone())
    if _cuda(device):
        torch.cuda.set_rng_state(state[cpu_bytes:].clone(), device)


def key_state(seed: int, step: int, index: int, device: torch.device = CPU) -> torch.Tensor:
    """The packed generator state a micro-batch's first forward starts from (see the module docstring)."""
    key = microbatch_key(seed, step, index)
    parts = [torch.Generator().manual_seed(key).get_state()]
    if _cuda(device):
        parts.append(torch.Generator(device=device).manual_seed(key).get_state())
    return torch.cat(parts).to(device)


class Stream:
    """What ``stream`` hands its body: ``after`` is the packed state left by the body once it has ended."""

    after: torch.Tensor


@contextmanager
def stream(state: torch.Tensor, device: torch.device) -> Iterator[Stream]:
    """Run the body from generator state ``state``; afterwards ``Stream.after`` holds the state it left and
    the caller's own state is back."""
    saved = pack(device)
    out = Stream()
    _restore(state, device)
    try:
        yield out
        out.after = pack(device)
    finally:
        _restore(saved, device)


def keyed(seed: int, step: int, index: int, device: torch.device = CPU) -> AbstractContextManager[Stream]:
    """The reference's side of the rule: run micro-batch ``index`` of step ``step`` from its key state."""
    return stream(key_state(seed, step, index, device), device)


@contextmanager
def preserved(device: torch.device = CPU) -> Iterator[None]:
    """Run the body without changing the caller's generator state (e.g. compile-time tracing forwards)."""
    saved = pack(device)
    try:
        yield
    finally:
        _restore(saved, device)


@dataclass(frozen=True)
class StepKeys:
    """The keys of one step on one pipeline: micro-batch m is global micro-batch ``first + m``."""

    seed: int
    step: int
    first: int
    device: torch.device = CPU

    def state(self, m: int) -> torch.Tensor:
        return key_state(self.seed, self.step, self.first + m, self.device)
