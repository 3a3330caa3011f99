"""Capture: the normal form of the graph (flat inputs, canonical FQNs, flat outputs), tied parameters, leaf
modules and autograd Functions as one call, the torch.fx fallback, and TraceError for what cannot be captured."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitpipe_fx.errors import ConfigError, TraceError
from bitpipe_fx.examples.models import bert, gpt
from bitpipe_fx.passes import capture, compute_nodes
from bitpipe_fx.passes.capture import TRAINING_FLAG, normalize_inputs
from bitpipe_fx.passes.fx_capture import from_symbolic_trace


def test_export_graph_is_flat_with_canonical_fqns_and_tied_weights():
    model, example = gpt(layers=2)
    captured = capture(model, example)
    assert captured.method == "export"
    assert captured.input_names == ("tokens",)
    assert captured.tied == {"tok_emb.weight": ("tok_emb.weight", "head.weight")}
    canonical = {n for n, _ in model.named_parameters()}
    targets = {n.target for n in captured.graph.nodes if n.op == "get_attr"}
    assert targets == canonical  # every parameter read under its canonical name, the alias never
    ops = {str(n.target) for n in compute_nodes(captured.graph)}
    assert not any("assert" in op or "guards" in op for op in ops)
    out_node = next(n for n in captured.graph.nodes if n.op == "output")
    assert isinstance(out_node.args[0], tuple) and len(out_node.args[0]) == 1
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        flat = captured.graph_module(*captured.flatten_inputs((tokens,)))
        torch.testing.assert_close(captured.unflatten_output(flat), model(tokens))


def test_keyword_inputs_are_flattened_by_name_in_any_order():
    model, (tokens, mask) = bert(layers=1)
    captured = capture(model, (), {"tokens": tokens, "attention_mask": mask})
    assert captured.input_names == ("tokens", "attention_mask")
    flat = captured.flatten_inputs((), {"attention_mask": mask, "tokens": tokens})
    assert flat[0] is tokens and flat[1] is mask
    with pytest.raises(ConfigError, match="same positional/keyword structure"):
        captured.flatten_inputs((tokens, mask))


def test_non_tensor_inputs_are_specialised_and_checked():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x, times: int = 1):
            return self.lin(x) * times

    captured = capture(Scaled(), (torch.randn(2, 3),), {"times": 3})
    assert captured.input_names == ("x",)
    x = torch.randn(2, 3)
    assert captured.flatten_inputs((x,), {"times": 3})[0] is x
    with pytest.raises(ConfigError, match=r"non-tensor input #1 is 4 but the graph was specialised to 3"):
        captured.flatten_inputs((x,), {"times": 4})


def test_capture_keeps_the_models_mode_and_marks_dropout():
    model, example = gpt(layers=1, dropout=0.1)
    model.eval()
    captured = capture(model, example)
    assert not model.training and not captured.training
    flags = [n for n in captured.graph.nodes if n.op == "call_module" and n.target == TRAINING_FLAG]
    dropouts = [n for n in captured.graph.nodes if "dropout" in str(n.target)]
    assert dropouts and flags
    assert all(any(isinstance(a, torch.fx.Node) for a in n.args[1:]) for n in dropouts)


class Gate(nn.Module):
    """Data-dependent Python control flow: neither tracer can see through it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return -self.lin(x)


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.gate = Gate()
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.gate(torch.relu(self.a(x))))


def _run(captured, *args, **kwargs):
    with torch.no_grad():
        return captured.unflatten_output(captured.graph_module(*captured.flatten_inputs(args, kwargs)))


def test_data_dependent_submodule_becomes_a_leaf_under_export():
    torch.manual_seed(0)
    model = Gated()
    for leaves in ((), ["gate"], [Gate]):  # found by itself, or named by FQN or by class
        captured = capture(model, (torch.randn(3, 4),), leaf_modules=leaves)
        assert captured.method == "export" and captured.opaque == ("gate",)
        assert [n.target for n in captured.graph.nodes if n.op == "call_module"] == ["gate"]
        for sign in (1.0, -1.0):  # both branches of the leaf still run
            x = sign * torch.rand(3, 4)
            torch.testing.assert_close(_run(captured, x), model(x))
    with pytest.raises(ConfigError, match=r"leaf_modules names \['nope'\]"):
        capture(model, (torch.randn(3, 4),), leaf_modules=["nope"])


def test_recording_opaque_calls_leaves_buffers_and_rng_alone():
    class Normed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.BatchNorm1d(4)
            self.drop = nn.Dropout(0.5)
            self.gate = Gate()

        def forward(self, x):
            return self.gate(self.drop(self.norm(x)))

    model, x = Normed(), torch.randn(3, 4) + 5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    captured = capture(model, (x,))
    assert captured.opaque == ("gate",)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class RootGate(nn.Module):
    """Data-dependent control flow in the model's own forward: no submodule to keep opaque."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        if h.sum() > 0:
            return h
        return -h


def test_uncapturable_model_names_the_construct_and_the_fix():
    with pytest.raises(TraceError) as info:
        capture(RootGate(), (torch.randn(3, 4),))
    text = str(info.value)
    assert "could not capture RootGate" in text
    assert "torch.export.export(strict=False) failed" in text and "torch.fx.symbolic_trace failed" in text
    assert "if h.sum() > 0" in text  # the line of user code that broke
    assert "data-dependent Python control flow (an `if`/`for`/`while`" in text
    assert "in RootGate.forward itself" in text
    assert "move it into a submodule and keep that as one opaque call: leaf_modules=['path.to.submodule']" in text


class Config:
    """Not a tensor, not a constant: an opaque call cannot take it."""

    scale = 2.0


class ConfiguredGate(nn.Module):
    def forward(self, x, config):
        return x * config.scale if x.sum() > 0 else x


class UsesConfig(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.inner = nn.Sequential(nn.Linear(4, 4))
        self.gate = ConfiguredGate()

    def forward(self, x):
        return self.gate(self.lin(x), Config())


def test_a_leaf_that_cannot_be_opaque_is_named_with_the_fix():
    with pytest.raises(TraceError) as info:
        capture(UsesConfig(), (torch.randn(3, 4),))
    text = str(info.value)
    assert "could not capture UsesConfig as a graph (opaque: ConfiguredGate)" in text
    assert "gate is called with a Config argument" in text
    assert "pass tensors, or make a module around it the leaf" in text


class HalfGrad(torch.autograd.Function):
    """Identity forward whose backward halves the gradient (autograd of the forward alone would not)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 0.5


class KeywordModel(nn.Module):
    """forward(**kwargs), a data-dependent leaf and a custom autograd Function: what the torch.fx fallback takes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x, **kwargs):
        h = HalfGrad.apply(self.a(x)) * kwargs["mask"]
        return {"out": self.gate(h), "skip": h}


def test_symbolic_trace_takes_keyword_arguments_leaves_and_autograd_functions():
    torch.manual_seed(0)
    model = KeywordModel()
    x, mask = torch.randn(3, 4), torch.ones(3, 4)
    captured = from_symbolic_trace(model, (x,), {"mask": mask}, True, [Gate])
    assert captured.method == "symbolic_trace" and captured.input_names == ("x", "mask")
    assert captured.opaque == ("a", "HalfGrad", "gate")  # torch.fx keeps torch.nn modules whole too
    x2, mask2 = torch.randn(3, 4), (torch.rand(3, 4) > 0.5).float()
    assert captured.flatten_inputs((x2,), {"mask": mask2})[1] is mask2
    expected, got = model(x2, mask=mask2), _run(captured, x2, mask=mask2)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    with pytest.raises(ConfigError, match=r"the captured graph needs tensors for \['x', 'mask'\]"):
        captured.flatten_inputs((x2,), {})
    model.zero_grad()
    captured.unflatten_output(captured.graph_module(x2, mask2))["skip"].sum().backward()
    staged = model.a.weight.grad.clone()
    model.zero_grad()
    model(x2, mask=mask2)["skip"].sum().backward()
    assert torch.equal(staged, model.a.weight.grad)  # HalfGrad's backward ran
    torch.testing.assert_close(staged, 0.5 * (mask2.t() @ x2))


def test_symbolic_trace_reads_tied_weights_under_the_canonical_name():
    class TiedLeaf(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.gate = Gate()
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, tokens):
            return self.head(self.gate(self.emb(tokens)))

    captured = from_symbolic_trace(TiedLeaf(), (torch.randint(0, 10, (2, 3)),), {}, True, [Gate])
    assert captured.method == "symbolic_trace"
    assert captured.tied == {"emb.weight": ("emb.weight", "head.weight")}
    attrs = {n.target for n in captured.graph.nodes if n.op == "get_attr"}
    assert "emb.weight" in attrs and "head.weight" not in attrs


def test_hugging_face_cache_gives_the_use_cache_hint():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        num_hidden_layers=1, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
        vocab_size=64, max_position_embeddings=16, use_cache=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    with pytest.raises(TraceError, match=r"use_cache = False"):
        capture(transformers.LlamaForCausalLM(cfg), (torch.randint(0, 64, (1, 8)),))


def test_inputs_are_normalised_and_non_modules_refused():
    t = torch.zeros(1)
    assert normalize_inputs(t) == ((t,), {})
    assert normalize_inputs((t, t)) == ((t, t), {})
    assert normalize_inputs({"x": t}) == ((), {"x": t})
    with pytest.raises(ConfigError, match=r"capture needs an nn\.Module, got function"):
        capture(lambda x: x, (t,))
