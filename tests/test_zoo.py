"""Model zoo: capture, partition and split real architectures; the stages in sequence must equal the model.

Small configs, random weights, no downloads (Hugging Face models are built from config objects).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitpipe_fx.examples import models as ex
from bitpipe_fx.passes import capture, estimate_costs, partition, run_stages, split

transformers = pytest.importorskip("transformers")


class MLP(nn.Module):
    """16 Linear layers with GELUs: enough layers for 16 stages."""

    def __init__(self, width: int = 16, depth: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.nn.functional.gelu(layer(x))
        return x


def _tokens(vocab: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _padding_mask(shape: tuple[int, int], seed: int) -> torch.Tensor:
    lengths = torch.randint(shape[1] // 2, shape[1] + 1, (shape[0],), generator=torch.Generator().manual_seed(seed))
    return (torch.arange(shape[1])[None, :] < lengths[:, None]).long()


def _hf_small() -> dict:
    return {"vocab_size": 96, "max_position_embeddings": 32}


def make_mlp(seed: int):
    torch.manual_seed(0)
    return MLP(), lambda s: ((torch.randn(3, 16, generator=torch.Generator().manual_seed(s)),), {})


def make_gpt(seed: int):
    model, _ = ex.gpt(layers=8, seed=seed)
    return model, lambda s: ((_tokens(128, (2, 16), s),), {})


def make_bert(seed: int):
    model, _ = ex.bert(layers=8, seed=seed)
    return model, lambda s: ((_tokens(128, (2, 16), s), _padding_mask((2, 16), s)), {})


def make_hf_gpt2(seed: int):
    cfg = transformers.GPT2Config(
        n_layer=4, n_embd=32, n_head=2, n_positions=32, vocab_size=96, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg), lambda s: ((_tokens(96, (2, 12), s),), {})


def make_hf_bert(seed: int):
    cfg = transformers.BertConfig(
        num_hidden_layers=4, hidden_size=32, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0, **_hf_small(),
    )
    torch.manual_seed(seed)
    model = transformers.BertForMaskedLM(cfg)
    return model, lambda s: ((), {"input_ids": _tokens(96, (2, 12), s), "attention_mask": _padding_mask((2, 12), s)})


def make_hf_llama(seed: int):
    cfg = transformers.LlamaConfig(
        num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        use_cache=False, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0, **_hf_small(),
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg), lambda s: ((_tokens(96, (2, 12), s),), {})


# model -> (factory, stage counts the model has enough layers for, tied FQN expected in `shared` or None)
ZOO = {
    "mlp": (make_mlp, (2, 4, 8, 16), None),
    "gpt": (make_gpt, (2, 4, 8, 16), "tok_emb.weight"),
    "bert": (make_bert, (2, 4, 8, 16), "tok_emb.weight"),
    "hf_gpt2": (make_hf_gpt2, (2, 4, 8), "transformer.wte.weight"),
    "hf_bert_mlm": (make_hf_bert, (2, 4, 8), "bert.embeddings.word_embeddings.weight"),
    "hf_llama": (make_hf_llama, (2, 4, 8), "model.embed_tokens.weight"),
}
CASES = [(name, s) for name, (_, counts, _) in ZOO.items() for s in counts]


@pytest.fixture(scope="module")
def captured_zoo():
    """Each model captured and costed once, reused by every stage count."""
    cache = {}

    def get(name: str):
        if name not in cache:
            factory = ZOO[name][0]
            model, inputs = factory(0)
            model.train()
            args, kwargs = inputs(100)
            captured = capture(model, args, kwargs)
            cache[name] = (model, inputs, captured, estimate_costs(captured))
        return cache[name]

    return get


def _output_close(actual, expected) -> None:
    assert type(actual) is type(expected)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize(("name", "stages"), CASES, ids=[f"{n}-S{s}" for n, s in CASES])
def test_stages_in_sequence_equal_the_model(captured_zoo, name, stages):
    model, inputs, captured, costs = captured_zoo(name)
    sm = split(captured, partition(costs, stages))
    assert sm.num_stages == stages
    args, kwargs = inputs(7 + stages)  # fresh random inputs, not the capture example
    with torch.no_grad():
        _output_close(run_stages(sm, args, kwargs), model(*args, **kwargs))

    # every stage receives exactly what the previous one sends
    for prev, spec in zip(sm.specs, sm.specs[1:]):
        assert spec.inputs == prev.outputs

    # every parameter in exactly one stage, or listed as shared by exactly the stages holding it
    state_keys = set(model.state_dict())
    holders = {name: [s.index for s in sm.specs if name in s.params] for name, _ in model.named_parameters()}
    for fqn, where in holders.items():
        assert where, f"{fqn} is in no stage"
        if len(where) > 1:
            assert sm.shared[fqn] == tuple(where)
        else:
            assert fqn not in sm.shared
    assert sm.unused == ()

    # stage parameters: original FQNs, the original tensors, only the ones the stage's graph reads
    for stage, spec in zip(sm.stages, sm.specs):
        names = [n for n, _ in stage.named_parameters()]
        assert tuple(names) == spec.params
        assert set(names) <= state_keys
        read = {n.target for n in stage.graph.nodes if n.op == "get_attr"}
        assert set(names) <= read
        for fqn, p in stage.named_parameters():
            assert p is model.get_parameter(fqn)
        assert {n for n, _ in stage.named_buffers() if n in spec.buffers} <= {n for n, _ in model.named_buffers()}

    tied = ZOO[name][2]
    if tied is not None:
        assert sm.shared.get(tied) == (0, stages - 1)


@pytest.mark.parametrize("name", ["hf_gpt2", "hf_llama", "bert"])
def test_gradients_flow_through_the_stages(captured_zoo, name):
    """Backward through the chained stages gives the model's own gradients (tied weights summed)."""
    model, inputs, captured, costs = captured_zoo(name)
    sm = split(captured, partition(costs, 4))
    args, kwargs = inputs(3)

    def grads(forward) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        ex.lm_loss(forward(), _tokens(96, (2, 12), 5) if name != "bert" else _tokens(128, (2, 16), 5)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    reference = grads(lambda: model(*args, **kwargs))
    staged = grads(lambda: run_stages(sm, args, kwargs))
    assert reference.keys() == staged.keys()
    for fqn in reference:
        torch.testing.assert_close(staged[fqn], reference[fqn], msg=fqn)
