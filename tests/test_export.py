"""Export and load_into: safetensors by original names, Schedule-Free eval vs train weights against the
schedulefree package, tied weights written once, and Hugging Face models through from_pretrained."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_model

import bitpipe_fx as bp
from bitpipe_fx import export
from bitpipe_fx.errors import ConfigError
from bitpipe_fx.examples.models import gpt, lm_batch, lm_loss
from tests.support.reference import max_rel_err, reference_grads

schedulefree = pytest.importorskip("schedulefree")

SF = dict(lr=0.05, momentum=0.9, warmup_steps=0)


def _gpt64():
    model, example = gpt()
    return model.double(), example


@pytest.fixture(scope="module")
def trained():
    """A bitpipe pipeline (D=2) and the unpipelined reference, 3 Schedule-Free SGD steps each, float64."""
    model, example = _gpt64()
    fresh = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    pipe = bp.compile(model, example, lm_loss, schedule="bitpipe", devices=2, microbatches=4,
                      optimizer=lambda ps: bp.optim.ScheduleFreeSGD(ps, **SF))
    pipe.train()
    opt = schedulefree.SGDScheduleFree(ref.parameters(), **SF)
    opt.train()
    tokens, targets = lm_batch(128, 8, 16, seed=5)
    for _ in range(3):
        pipe.step(tokens, targets)
        reference_grads(ref, tokens, targets, 4, lm_loss)
        opt.step()
    return pipe, ref, opt, fresh, tokens


def _reference_weights(ref, opt, mode: str) -> dict[str, torch.Tensor]:
    getattr(opt, mode)()
    weights = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    opt.train()
    return weights


def test_export_writes_eval_weights_once_per_tied_tensor_and_loads_strictly(trained, tmp_path):
    pipe, ref, opt, fresh, tokens = trained
    before = {k: p.detach().clone() for k, p in pipe.named_parameters().items()}
    path = pipe.export(tmp_path / "gpt.safetensors")
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
    assert "tok_emb.weight" in names and "head.weight" not in names  # tied: written once
    model = copy.deepcopy(fresh)
    model.load_state_dict(export.load(path), strict=True)
    expected = _reference_weights(ref, opt, "eval")
    for k, v in model.state_dict().items():
        assert max_rel_err(v, expected[k]) <= 1e-12, k
    assert model.head.weight is model.tok_emb.weight  # loading keeps the model's tie
    with torch.no_grad():
        ref.eval()
        opt.eval()
        want = ref(tokens)
        opt.train()
        ref.train()
        got = model.eval()(tokens)
    assert max_rel_err(got, want) <= 1e-12
    # safetensors' own loader accepts the file too (it knows about the tie)
    other = copy.deepcopy(fresh)
    load_model(other, str(path))
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    # exporting changed nothing in the pipeline
    assert all(torch.equal(p, before[k]) for k, p in pipe.named_parameters().items())


def test_train_weights_are_y_and_differ_from_eval(trained, tmp_path):
    pipe, ref, opt, _, _ = trained
    y = export.load(pipe.export(tmp_path / "y.safetensors", weights="train"))
    x = export.load(pipe.export(tmp_path / "x.safetensors"))
    expected = _reference_weights(ref, opt, "train")
    assert all(max_rel_err(y[k], expected[k]) <= 1e-12 for k in expected)
    assert any(not torch.equal(x[k], y[k]) for k in x)
    # from eval mode (parameters hold x): x exactly, y back through the train lerp (rounding level)
    pipe.eval()
    try:
        assert all(torch.equal(pipe.trained_state_dict("eval")[k], x[k]) for k in x)
        assert all(max_rel_err(pipe.trained_state_dict("train")[k], y[k]) <= 1e-14 for k in y)
    finally:
        pipe.train()


def test_load_into_equals_export(trained, tmp_path):
    pipe, _, _, fresh, _ = trained
    model = pipe.load_into(copy.deepcopy(fresh))
    exported = export.load(pipe.export(tmp_path / "m.safetensors"))
    assert set(model.state_dict()) == set(exported)
    assert all(torch.equal(v, exported[k]) for k, v in model.state_dict().items())


def test_load_into_refuses_a_different_model(trained):
    pipe = trained[0]
    other, _ = gpt(layers=2)
    with pytest.raises(ConfigError, match=r"do not fit GPT: missing \[\], unexpected \['blocks.2"):
        pipe.load_into(other.double())
    wider, _ = gpt(dim=16, heads=2)
    with pytest.raises(ConfigError, match=r"shapes \(trained vs model\) \['tok_emb.weight \(128, 32\) vs \(128, 16\)"):
        pipe.load_into(wider)


def test_bad_weights_and_paths_are_refused(trained, tmp_path):
    pipe = trained[0]
    with pytest.raises(ConfigError, match=r"weights='best' is not one of \('eval', 'train'\)"):
        pipe.export(tmp_path / "m.safetensors", weights="best")
    with pytest.raises(ConfigError, match=r"is a directory; pass a file path such as"):
        pipe.export(tmp_path)
    with pytest.raises(ConfigError, match=r"is not a safetensors file"):
        export.load(tmp_path / "missing.safetensors")


def test_optimizer_without_two_weight_sets_exports_the_parameters(tmp_path):
    model, example = _gpt64()
    pipe = bp.compile(model, example, lm_loss, schedule="1f1b", devices=2, microbatches=2,
                      optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    tokens, targets = lm_batch(128, 4, 16, seed=1)
    pipe.step(tokens, targets)
    full = pipe.full_state_dict()
    for weights in ("eval", "train"):
        state = pipe.trained_state_dict(weights)
        assert set(state) == set(full) and all(torch.equal(state[k], full[k]) for k in full)


def test_foreign_schedule_free_optimizer_exports_only_its_current_mode():
    model, example = _gpt64()
    pipe = bp.compile(model, example, lm_loss, schedule="1f1b", devices=2, microbatches=2,
                      optimizer=lambda ps: schedulefree.SGDScheduleFree(ps, **SF))
    pipe.train()
    pipe.step(*lm_batch(128, 4, 16, seed=1))
    assert set(pipe.trained_state_dict("train")) == set(pipe.full_state_dict())
    with pytest.raises(ConfigError, match=r"SGDScheduleFree swaps weights .* call pipe.eval\(\) before exporting"):
        pipe.trained_state_dict("eval")


def _hf_case(kind: str):
    transformers = pytest.importorskip("transformers")
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
        cls = transformers.GPT2LMHeadModel
    else:
        cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)
        cls = transformers.BertForMaskedLM
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = cls(cfg).double()
    return cls, model


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_hugging_face_models_round_trip_through_from_pretrained(kind, tmp_path):
    cls, model = _hf_case(kind)
    tokens, targets = lm_batch(96, 8, 12, seed=3)
    pipe = bp.compile(model, (tokens[:2],), lm_loss, schedule="1f1b", devices=2, microbatches=4,
                      optimizer=lambda ps: bp.optim.ScheduleFreeSGD(ps, **SF))
    pipe.train()
    for _ in range(2):
        pipe.step(tokens, targets)
    out = pipe.export(tmp_path / kind)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    loaded = cls.from_pretrained(out, torch_dtype=torch.float64)
    trained = pipe.trained_state_dict()
    state = loaded.state_dict()
    assert set(state) == set(trained)
    for k, v in trained.items():
        assert torch.equal(state[k], v), k
    mine = pipe.load_into(copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(tokens).logits, mine.eval()(tokens).logits)
