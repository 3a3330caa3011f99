"""Opaque calls in a pipeline: mixture-of-experts models with data-dependent expert loops (Hugging Face Mixtral
and Qwen2-MoE, eager experts) and custom autograd Functions (a straight-through estimator, a gradient clip in
backward). One float64 step on the local executor equals the non-pipelined reference: the loss and every
gradient by name, relative <= 1e-12.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bitpipe_fx as bp
from bitpipe_fx.examples.models import lm_batch, lm_loss
from bitpipe_fx.passes import capture
from bitpipe_fx.schedules import SCHEDULES
from tests.support.reference import max_rel_err, reference_grads

MICROBATCHES = 4


def assert_one_step_matches(model: nn.Module, example: tuple, inputs, targets, loss_fn, schedule: str,
                            **options) -> None:
    """A pipeline of ``model`` at D=2 computes the reference loss and gradients (by FQN) in one step."""
    ref = copy.deepcopy(model)
    pipe = bp.compile(model, example, loss_fn, schedule=schedule, devices=2, microbatches=MICROBATCHES, **options)
    loss = pipe.forward_backward(inputs, targets)
    grads = pipe.gradients()
    ref_loss, ref_grads = reference_grads(ref, inputs, targets, MICROBATCHES, loss_fn)
    assert set(pipe.named_parameters()) == {n for n, _ in ref.named_parameters()}  # leaf parameters included
    assert grads.keys() == ref_grads.keys()
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    for name, grad in grads.items():
        assert max_rel_err(grad, ref_grads[name]) <= 1e-12, name


# ---- mixture of experts: Hugging Face, eager experts (a Python loop over the experts that got tokens) ---------


def _moe(kind: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    common = dict(
        num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
        num_experts_per_tok=2, vocab_size=64, max_position_embeddings=32, use_cache=False,
        experts_implementation="eager", bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if kind == "mixtral":
            model = transformers.MixtralForCausalLM(transformers.MixtralConfig(num_local_experts=4, **common))
        else:
            model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
                num_experts=4, moe_intermediate_size=8, shared_expert_intermediate_size=16, **common))
    assert model.config._experts_implementation == "eager"
    return model.double()


def _leaves(kind: str, model: nn.Module) -> list:
    if kind == "mixtral":  # the whole sparse block by class: the router's parameters are inside the leaf
        return [type(model.model.layers[0].mlp)]
    return [f"model.layers.{i}.mlp.experts" for i in range(2)]  # only the experts, by FQN


def test_moe_experts_are_kept_as_one_call():
    for kind in ("mixtral", "qwen2_moe"):
        model = _moe(kind)
        captured = capture(model, (lm_batch(64, 2, 8, seed=1)[0],))
        assert captured.method == "export"
        assert captured.opaque == ("model.layers.0.mlp.experts", "model.layers.1.mlp.experts")


@pytest.mark.parametrize("schedule", ["bitpipe", "1f1b"])
@pytest.mark.parametrize("leaves", [False, True], ids=["found", "leaf_modules"])
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_one_step_equals_the_reference(kind, leaves, schedule):
    model = _moe(kind)
    options = {"leaf_modules": tuple(_leaves(kind, model))} if leaves else {}
    tokens, targets = lm_batch(64, 2 * MICROBATCHES, 8, seed=3)
    assert_one_step_matches(model, (tokens[:2],), tokens, targets, lm_loss, schedule, **options)


# ---- custom autograd Functions keep their backward -----------------------------------------------------------


class RoundSTE(torch.autograd.Function):
    """Straight-through rounding: the forward's derivative is zero almost everywhere; the backward passes 1."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, grad):
        return grad


class ClipGrad(torch.autograd.Function):
    """Identity forward; the backward clips the gradient to [-bound, bound] (a non-tensor argument)."""

    @staticmethod
    def forward(ctx, x, bound):
        ctx.bound = bound
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(-ctx.bound, ctx.bound), None


class QuantLayer(nn.Module):
    """Rounded weights and activations (straight-through) and a gradient clip: both on weight and input paths."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        h = nn.functional.linear(x, RoundSTE.apply(self.lin.weight), self.lin.bias)
        return ClipGrad.apply(torch.tanh(RoundSTE.apply(h)), 0.01)


class QuantNet(nn.Module):
    def __init__(self, width: int = 8, depth: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList(QuantLayer(width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def _quant_net() -> QuantNet:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return QuantNet().double()


def test_straight_through_gradient_is_not_the_forwards_derivative():
    """What the pipeline must match: rounding's own derivative would give every weight a zero gradient."""
    model = _quant_net()
    captured = capture(model, (torch.zeros(2, 8, dtype=torch.float64),))
    assert captured.method == "export" and captured.opaque == ("RoundSTE", "ClipGrad")
    x = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _mse(model(x), torch.zeros_like(x)).backward()
    assert all(layer.lin.weight.grad.abs().sum() > 0 for layer in model.layers)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_autograd_functions_keep_their_backward_under_every_family(schedule):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2 * MICROBATCHES, 8, dtype=torch.float64, generator=g)
    y = torch.randn(2 * MICROBATCHES, 8, dtype=torch.float64, generator=g)
    assert_one_step_matches(_quant_net(), (x[:2],), x, y, _mse, schedule)
