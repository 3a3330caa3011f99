"""The bad inputs of issue 13 that escaped as raw tracebacks or trained silently wrong: each is now a
BitPipeError naming the value and the fix (type and message checked), or works as eager PyTorch does."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import bitpipe_fx as bp
from bitpipe_fx.errors import ConfigError, TraceError
from bitpipe_fx.examples.models import gpt, lm_batch, lm_loss
from bitpipe_fx.passes.cost import estimate_costs
from bitpipe_fx.passes.fx_capture import from_symbolic_trace
from bitpipe_fx.plan import Plan


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def tiny():
    return gpt(dim=16, layers=2, heads=2, vocab=64, seq=8, micro_batch=2)


def mse(y, t):
    return ((y - t) ** 2).mean()


def test_an_out_of_vocabulary_token_id_is_refused_before_anything_runs():
    model, example = tiny()
    pipe = bp.compile(model, example, lm_loss, "1f1b", 2, 2, optimizer=sgd)
    before = {k: v.clone() for k, v in pipe.named_parameters().items()}
    tokens, targets = lm_batch(64, 4, 8)
    tokens[1, 3] = 1000
    with pytest.raises(ConfigError) as info:
        pipe.step(tokens, targets)
    assert str(info.value) == (
        "model input 'tokens' holds id 1000 at [1, 3], but it indexes tok_emb.weight with 64 rows (ids 0..63); "
        "map the data into that range (a tokenizer of this model), or give the model a table of at least 1001 rows")
    tokens[1, 3] = -1
    with pytest.raises(ConfigError, match=r"^model input 'tokens' holds id -1 at \[1, 3\], .*this model\)$"):
        pipe.predict(tokens)
    assert all(torch.equal(before[k], v) for k, v in pipe.named_parameters().items())
    tokens[1, 3] = 63  # the last row is fine
    assert pipe.step(tokens, targets) > 0


@pytest.mark.parametrize("loss_fn", [None, "cross_entropy"])
def test_a_loss_fn_that_is_not_a_function_is_refused_at_compile(loss_fn):
    model, example = tiny()
    with pytest.raises(ConfigError, match=f"^loss_fn must be a function .* got {loss_fn!r}; e.g. lambda"):
        bp.compile(model, example, loss_fn, "1f1b", 2, 2, optimizer=sgd)


class MutatesInput(nn.Module):
    """Updates its input in place before reading it, as eager PyTorch allows."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        x.mul_(2)
        h = torch.relu(self.a(x))
        return self.c(self.b(h) + x)


@pytest.mark.parametrize("schedule", ["1f1b", "bitpipe"])
def test_a_model_updating_its_input_in_place_trains_as_eager_does(schedule):
    torch.manual_seed(0)
    model, reference = MutatesInput().double(), MutatesInput().double()
    reference.load_state_dict(model.state_dict())
    pipe = bp.compile(model, (torch.randn(2, 4, dtype=torch.float64),), mse, schedule, 2, 4)
    x, t = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    given = x.clone()
    loss = pipe.forward_backward(x, t)
    expected = sum(mse(reference(xm.clone()), tm) for xm, tm in zip(x.chunk(4), t.chunk(4))) / 4
    expected.backward()
    assert loss == pytest.approx(expected.item(), rel=1e-12)
    grads = pipe.gradients()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-12, atol=1e-14)
    assert torch.equal(x, given)  # the stage updated a copy; the caller's batch is as it was


def test_an_in_place_update_of_an_input_stays_in_one_stage_with_its_later_reads():
    class ReadsAfter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(x.abs())
            x.add_(1)  # symbolic_trace keeps later reads on the placeholder itself
            return self.b(h) * x

    captured = from_symbolic_trace(ReadsAfter(), (torch.randn(2, 4),), {}, True, [])
    names = [n.name for n in captured.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    cuttable = estimate_costs(captured).cuttable  # cuttable[b - 1]: a cut before node b
    mutation, last_read = names.index("add_"), names.index("mul")
    assert not any(cuttable[b - 1] for b in range(mutation + 1, last_read + 1))
    assert cuttable[mutation - 1]  # before the update is fine: the stage updates its own copy


class Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(5, 4)

    def forward(self, x):
        return self.b(self.a(x))


def test_the_models_own_error_during_capture_is_a_trace_error_naming_the_module_and_line():
    with pytest.raises(TraceError) as info:
        bp.compile(Broken(), (torch.randn(2, 4),), mse, "1f1b", 2, 2)
    text = str(info.value)
    assert text.startswith("Broken's forward raised RuntimeError: mat1 and mat2 shapes cannot be multiplied "
                           "(2x4 and 5x4) on the example inputs, in b (Linear) at ")
    assert "test_bad_inputs.py" in text and "in forward: return self.b(self.a(x))" in text
    assert text.endswith("it fails without any tracer too (model(*example_inputs)): fix the model or pass example "
                         "inputs it accepts")


def test_a_loss_cut_from_the_graph_is_refused_not_trained_with_zero_gradients():
    model, example = tiny()
    pipe = bp.compile(model, example, lambda y, t: lm_loss(y, t).detach(), "1f1b", 2, 2, optimizer=sgd)
    with pytest.raises(ConfigError, match=r"^stage 1's loss does not require grad: loss_fn \(or the "
                                          r"model's forward\) cut it from the autograd graph \(\.detach\(\)"):
        pipe.step(*lm_batch(64, 4, 8))


def test_an_optimizer_over_other_parameters_is_refused():
    model, example = tiny()
    with pytest.raises(ConfigError) as info:
        bp.compile(model, example, lm_loss, "1f1b", 2, 2, optimizer=lambda ps: sgd(model.parameters()))
    assert str(info.value).startswith("the optimizer factory '<lambda>' returned an optimizer whose parameters are "
                                      "not the ones it was given (28 of its 28 tensors are not the ")
    assert str(info.value).endswith("build it from the argument: lambda params: torch.optim.SGD(params, lr=0.1)")
    with pytest.raises(ConfigError, match=r"^the optimizer factory returned list, not a torch\.optim\.Optimizer"):
        bp.compile(model, example, lm_loss, "1f1b", 2, 2, optimizer=lambda ps: list(ps))


@pytest.mark.parametrize(("edit", "keep_checksum"), [
    (lambda d: d.__setitem__("microbatches", 4), True),
    (lambda d: d["stages"][0].__setitem__("flops", 1), True),
    (lambda d: d.__setitem__("cuts", [c + 3 for c in d["cuts"]]), True),
    (lambda d: d.__setitem__("devices", 4), False),
])
def test_a_plan_whose_numbers_were_edited_is_refused(tmp_path, edit, keep_checksum):
    model, example = tiny()
    data = json.loads(bp.inspect(model, example, "1f1b", 2, 2).to_json())
    edit(data)
    if not keep_checksum:
        del data["checksum"]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as info:
        bp.compile(model, example, lm_loss, plan=path, optimizer=sgd)
    text = str(info.value)
    assert text.startswith(f"plan file {str(path)!r}: ")
    if keep_checksum:
        assert "the plan was edited after it was written (its checksum " in text
        assert text.endswith("re-run `bitpipe-fx partition` (or Plan.save) instead of editing the numbers")
    else:
        assert "the plan's devices is 4 but its program '1f1b' has 2; the plan was edited or is damaged" in text


def test_an_unedited_plan_round_trips_with_its_checksum():
    model, example = tiny()
    plan = bp.inspect(model, example, "1f1b", 2, 2)
    assert Plan.from_json(plan.to_json()) == plan
    assert len(json.loads(plan.to_json())["checksum"]) == 64
