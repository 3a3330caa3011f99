"""One device's copy of a stage (module + flat gradient buffer) and the chunks that run it.

A ``StageReplica`` owns a private module copy whose parameters' ``.grad`` are views into one flat buffer per
dtype: autograd accumulates in place into it, and the replica all-reduce is one collective with no copy.
A ``Chunk`` is one (pipe, stage) of the program; it runs F, B, I and W for micro-batches and keeps what a
backward needs (received leaves, outputs or loss, output grads between I and W) until that backward ends.
Two chunks of one stage on one device share the replica, so their gradients sum in the buffer.

A chunk with ``recompute`` runs F without autograd and keeps only its inputs and the generator state F started
from; the first backward of the micro-batch (B, or I when split) runs the forward again from that state (the
same dropout masks) with batch-norm running statistics left as F recorded them, and that one graph then
serves both I and W.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bitpipe_fx.errors import ConfigError, PipelineRuntimeError
from bitpipe_fx.passes.stages import LossFn, RunningStat, SplitModel, StageSpec, Targets
from bitpipe_fx.runtime import rng, splitbw
from bitpipe_fx.runtime.buffers import RunningStats
from bitpipe_fx.runtime.precision import FP32, Precision
from bitpipe_fx.schedules.ir import Placement


def is_floating(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


class StageReplica:
    """A private module copy of one stage on one device, with flat gradient buffers.

    With ``pad_to`` (sharded optimizer state, runtime.zero) the trainable parameters also become views of a flat
    parameter buffer per dtype laid out like the gradient buffer, both padded with zeros to a multiple of
    ``pad_to``, so that one shard of the buffer is one contiguous range on every copy.
    """

    def __init__(self, stage: int, module: nn.Module, running: Sequence[RunningStat] = (),
                 unused: Sequence[str] = (), pad_to: int | None = None) -> None:
        self.stage = stage
        self.module = module
        self.stats = RunningStats(module, running)
        self.params: dict[str, nn.Parameter] = dict(module.named_parameters())
        self.device = rng.device_of(module)
        # frozen parameters, and those no stage reads (no gradient, as in the model), are not trained
        self.trainable = [p for n, p in self.params.items() if p.requires_grad and n not in unused]
        self.flat_grads: list[torch.Tensor] = []
        self.flat_params: list[torch.Tensor] = []  # only with pad_to
        self.layout: list[list[tuple[str, int, nn.Parameter]]] = []  # per flat buffer: (FQN, offset, parameter)
        self._views: list[tuple[nn.Parameter, torch.Tensor]] = []
        names = {id(p): n for n, p in self.params.items()}
        groups: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
        for p in self.trainable:
            groups.setdefault((p.dtype, p.device), []).append(p)
        for (dtype, device), params in groups.items():
            numel = sum(p.numel() for p in params)
            padded = numel if pad_to is None else -(-numel // pad_to) * pad_to
            flat = torch.zeros(padded, dtype=dtype, device=device)
            values = torch.zeros(padded, dtype=dtype, device=device) if pad_to is not None else None
            entries = []
            offset = 0
            for p in params:
                if values is not None:
                    values[offset : offset + p.numel()].copy_(p.detach().reshape(-1))
                    p.data = values[offset : offset + p.numel()].view_as(p)
                p.grad = flat[offset : offset + p.numel()].view_as(p)
                self._views.append((p, p.grad))
                entries.append((names[id(p)], offset, p))
                offset += p.numel()
            self.flat_grads.append(flat)
            self.layout.append(entries)
            if values is not None:
                self.flat_params.append(values)

    def zero_grad(self) -> None:
        """Zero the flat buffers; re-attach a view that something replaced (e.g. zero_grad(set_to_none=True))."""
        for flat in self.flat_grads:
            flat.zero_()
        for p, view in self._views:
            if p.grad is not view:
                p.grad = view


@dataclass(frozen=True)
class _Stash:
    """What a recomputed forward needs: the stage's inputs, the target and the loss scale of F."""

    model_inputs: tuple[torch.Tensor, ...]
    received: tuple[torch.Tensor, ...]
    target: Targets
    scale: float


@dataclass
class _Saved:
    """What one micro-batch's backward needs."""

    leaves: list[torch.Tensor]  # received floating values, as leaves requiring grad
    roots: list[torch.Tensor]  # outputs (or [loss]) that require grad
    root_index: list[int]  # index among the floating outputs of each root (gradient to use)
    out_grads: list[torch.Tensor] | None = None  # kept between I and W
    deferred: splitbw.DeferredWeights | None = None  # what W needs after I
    rng_state: torch.Tensor | None = None  # generator state the forward started from (for a recomputation)
    stash: _Stash | None = None  # inputs of a forward still to be recomputed (recompute chunks, F to B/I)


class Chunk:
    """(pipe, stage) on one device: runs F/B/I/W on the shared replica for each micro-batch."""

    def __init__(
        self,
        pipe: int,
        stage: int,
        replica: StageReplica,
        spec: StageSpec,
        last: bool,
        loss_fn: LossFn,
        unflatten_output: Callable[[Sequence[torch.Tensor]], object],
        precision: Precision = FP32,
        recompute: bool = False,
    ) -> None:
        self.pipe, self.stage, self.replica, self.spec, self.last = pipe, stage, replica, spec, last
        self.loss_fn, self.unflatten_output, self.precision = loss_fn, unflatten_output, precision
        self.recompute = recompute
        self.saved: dict[int, _Saved] = {}
        self.splitter = splitbw.StageSplitter(replica.trainable)
        self.recomputed = 0  # forwards run again for a backward (one per micro-batch with ``recompute``)

    # ---- forward --------------------------------------------------------------------------------

    def forward(
        self, m: int, model_inputs: Sequence[torch.Tensor], received: Sequence[torch.Tensor], target: Targets,
        scale: float, train: bool,
    ) -> tuple[torch.Tensor, ...] | torch.Tensor:
        """Run the stage on micro-batch m; returns its outputs, or the scaled loss on the last stage."""
        if not train or self.recompute:
            with torch.no_grad():
                out = self._call(model_inputs, received)
                result = self._loss(out, target, scale) if self.last else out
            if train:
                self.saved[m] = _Saved([], [], [], stash=_Stash(tuple(model_inputs), tuple(received), target, scale))
            return result
        self.saved[m], result = self._graph(model_inputs, received, target, scale)
        return result

    def _graph(self, model_inputs: Sequence[torch.Tensor], received: Sequence[torch.Tensor], target: Targets,
               scale: float) -> tuple[_Saved, tuple[torch.Tensor, ...] | torch.Tensor]:
        """The forward with autograd: what its backward needs, and the (detached) outputs or the loss."""
        leaves = [t.detach().requires_grad_(True) if is_floating(t) else t for t in received]
        with torch.enable_grad():
            out = self._call(model_inputs, leaves)
            if self.last:
                loss = self._loss(out, target, scale)
                if not loss.requires_grad and (self.replica.trainable or any(map(is_floating, leaves))):
                    raise ConfigError(
                        f"stage {self.stage}'s loss does not require grad: loss_fn (or the model's forward) cut it "
                        "from the autograd graph (.detach(), .item(), torch.no_grad(), a new tensor), so no "
                        "parameter would get a gradient; compute the loss from the model's output with tensor ops"
                    )
                roots, index = ([loss], [0]) if loss.requires_grad else ([], [])
                result: tuple[torch.Tensor, ...] | torch.Tensor = loss
            else:
                floats = [t for t in out if is_floating(t)]
                index = [i for i, t in enumerate(floats) if t.requires_grad]
                roots = [floats[i] for i in index]
                result = tuple(t.detach() for t in out)
        return _Saved([t for t in leaves if is_floating(t)], roots, index), result

    def _recompute(self, saved: _Saved) -> None:
        """Rebuild a recomputed micro-batch's graph in place, from the generator state its F started from, with
        the running statistics as F left them (they are recorded once, at F)."""
        stash = saved.stash
        if stash is None:
            return
        if saved.rng_state is None:
            raise PipelineRuntimeError(f"stage {self.stage} cannot recompute a forward whose generator state was "
                                       "not kept; call started_from after each forward")
        with rng.stream(saved.rng_state, self.replica.device), self.replica.stats.kept():
            graph, _ = self._graph(stash.model_inputs, stash.received, stash.target, stash.scale)
        saved.leaves, saved.roots, saved.root_index, saved.stash = graph.leaves, graph.roots, graph.root_index, None
        self.recomputed += 1

    def started_from(self, m: int, state: torch.Tensor) -> None:
        """Keep the generator state micro-batch m's forward started from, with what its backward needs."""
        if m in self.saved:
            self.saved[m].rng_state = state

    def outputs(self, model_inputs: Sequence[torch.Tensor], received: Sequence[torch.Tensor]) -> tuple:
        """The stage's flat outputs without loss or autograd (the last stage's are the model's: predict)."""
        with torch.no_grad():
            return self._call(model_inputs, received)

    def _call(self, model_inputs: Sequence[torch.Tensor], received: Sequence[torch.Tensor]) -> tuple:
        with self.precision.compute(self.replica.device):
            out = self.replica.module(*model_inputs, *received)
        out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return out if self.last else self.precision.wire(out)

    def _loss(self, out: tuple, target: Targets, scale: float) -> torch.Tensor:
        with self.precision.compute(self.replica.device):
            loss = self.loss_fn(self.unflatten_output(out), target)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise PipelineRuntimeError(
                f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
                + "; reduce the loss (e.g. mean) over the micro-batch"
            )
        return loss.reshape(()) * scale

    # ---- backward -------------------------------------------------------------------------------

    def backward(self, m: int, out_grads: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
        """Full backward: weight grads into the flat buffer, returns the input grads (floating inputs)."""
        saved = self.saved.pop(m)
        self._recompute(saved)
        if saved.roots:
            torch.autograd.backward(saved.roots, self._root_grads(saved, out_grads))
        return [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in saved.leaves]

    def backward_input(self, m: int, out_grads: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
        """Input-gradient half (I): input grads now; what W needs is kept (see splitbw)."""
        saved = self.saved[m]
        self._recompute(saved)
        saved.out_grads = list(out_grads) if out_grads is not None else None
        if not saved.roots or not saved.leaves:  # nothing to send: W does the whole backward
            return [torch.zeros_like(leaf) for leaf in saved.leaves]
        grads, saved.deferred = self.splitter.backward_input(
            saved.roots, self._root_grads(saved, out_grads), saved.leaves
        )
        return [g if g is not None else torch.zeros_like(leaf) for g, leaf in zip(grads, saved.leaves)]

    def backward_weight(self, m: int) -> None:
        """Weight-gradient half (W): accumulates parameter grads into the flat buffer and frees the graph."""
        saved = self.saved.pop(m)
        if saved.deferred is not None:
            splitbw.backward_weight(saved.deferred)
        elif saved.roots and self.replica.trainable:
            torch.autograd.backward(
                saved.roots, self._root_grads(saved, saved.out_grads), inputs=self.replica.trainable
            )

    def _root_grads(self, saved: _Saved, out_grads: Sequence[torch.Tensor] | None) -> list[torch.Tensor] | None:
        if self.last:
            return None
        if out_grads is None:
            raise PipelineRuntimeError(f"backward of stage {self.stage} got no output gradients")
        return [out_grads[i] for i in saved.root_index]

    def pending(self) -> list[int]:
        """Micro-batches whose backward has not finished (should be empty after a step)."""
        return sorted(self.saved)


def build_device(
    split: SplitModel, placement: Placement, device: int, loss_fn: LossFn, pad_to: Mapping[int, int] | None = None,
    precision: Precision = FP32, recompute: Sequence[bool] = (),
) -> tuple[dict[int, StageReplica], dict[tuple[int, int], Chunk]]:
    """Private copies of the stages ``device`` holds (one per stage) and its chunks over them; ``pad_to``: stage ->
    the size of its copy group, when the optimizer state is sharded (flat parameter buffers, runtime.zero);
    ``precision``: what the chunks compute in and send (runtime.precision); ``recompute``: per stage, whether
    its chunks recompute their forward (empty = none)."""
    replicas: dict[int, StageReplica] = {}
    chunks: dict[tuple[int, int], Chunk] = {}
    last = split.num_stages - 1
    for pipe, stage in placement.chunks(device):
        if stage not in replicas:
            replicas[stage] = StageReplica(stage, copy.deepcopy(split.stages[stage]), split.specs[stage].running_stats,
                                           split.unused, None if pad_to is None else pad_to[stage])
        chunks[(pipe, stage)] = Chunk(
            pipe, stage, replicas[stage], split.specs[stage], stage == last, loss_fn, split.unflatten_output,
            precision, bool(recompute[stage]) if recompute else False,
        )
    return replicas, chunks
