"""bitpipe_fx.compile() end to end (local executor): training, plans, inputs, optimizers, modes, timelines."""

from __future__ import annotations

import copy

import pytest
import torch

import bitpipe_fx as bp
from bitpipe_fx.errors import ConfigError, ScheduleError
from bitpipe_fx.examples.models import bert, gpt, lm_batch, lm_loss, mlm_batch
from bitpipe_fx.sim.trace import read_chrome_trace
from tests.support.reference import max_rel_err, reference_grads


def _gpt64():
    model, example = gpt()
    return model.double(), example


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def test_compile_trains_like_the_reference():
    model, example = _gpt64()
    ref = copy.deepcopy(model)
    pipe = bp.compile(model, example, lm_loss, schedule="bitpipe", devices=2, microbatches=4, optimizer=sgd)
    assert isinstance(pipe.plan, bp.Plan) and pipe.plan.program.name == "bitpipe" and pipe.plan.devices == 2
    assert "stage" in pipe.plan.summary()
    opt = sgd(list(ref.parameters()))
    for step in range(3):
        tokens, targets = lm_batch(128, 8, 16, seed=step)
        loss = pipe.step(tokens, targets)
        ref_loss, _ = reference_grads(ref, tokens, targets, 4, lm_loss)
        opt.step()
        assert abs(loss - ref_loss) <= 1e-12 * ref_loss
    ref_params = dict(ref.named_parameters())
    for name, p in pipe.named_parameters().items():
        assert max_rel_err(p.detach(), ref_params[name].detach()) <= 1e-12, name
    assert set(pipe.named_parameters()) == set(ref_params)


def test_saved_plan_reproduces_the_pipeline(tmp_path):
    model, example = _gpt64()
    first = bp.compile(model, example, lm_loss, schedule="zbv", devices=2, microbatches=4)
    path = tmp_path / "plan.json"
    first.plan.save(path)
    for plan in (first.plan, path, str(path)):
        again = bp.compile(model, example, lm_loss, plan=plan)
        assert again.plan.cuts == first.plan.cuts and again.program == first.program
    tokens, targets = lm_batch(128, 8, 16, seed=3)
    first.forward_backward(tokens, targets)
    again.forward_backward(tokens, targets)
    a, b = first.gradients(), again.gradients()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_keyword_inputs_and_two_input_models():
    model, (tokens_mb, mask_mb) = bert()
    model = model.double()
    tokens, mask, targets = mlm_batch(128, 8, 16, seed=4)
    positional = bp.compile(model, (tokens_mb, mask_mb), lm_loss, schedule="1f1b", devices=2, microbatches=4)
    keyword = bp.compile(model, {"tokens": tokens_mb, "attention_mask": mask_mb}, lm_loss, schedule="1f1b",
                         devices=2, microbatches=4)
    loss_kw = keyword.evaluate({"tokens": tokens, "attention_mask": mask}, targets)
    assert loss_kw == positional.evaluate((tokens, mask), targets)
    ref_loss, _ = reference_grads(copy.deepcopy(model), (tokens, mask), targets, 4, lm_loss)
    assert abs(loss_kw - ref_loss) <= 1e-12 * ref_loss


def test_schedule_free_train_and_eval_are_driven_by_the_pipeline():
    schedulefree = pytest.importorskip("schedulefree")

    def sf(params):  # the SGD flavour: linear in the gradients, so rounding noise is not amplified as in Adam
        return schedulefree.SGDScheduleFree(params, lr=0.05, warmup_steps=0)

    model, example = _gpt64()
    ref = copy.deepcopy(model)
    pipe = bp.compile(model, example, lm_loss, schedule="bitpipe", devices=2, microbatches=4, optimizer=sf)
    opt = sf(list(ref.parameters()))
    opt.train()
    tokens, targets = lm_batch(128, 8, 16, seed=5)
    for _ in range(3):
        pipe.step(tokens, targets)
        reference_grads(ref, tokens, targets, 4, lm_loss)
        opt.step()

    def close_to_ref() -> bool:
        ref_params = dict(ref.named_parameters())
        return all(max_rel_err(p.detach(), ref_params[k].detach()) <= 1e-12
                   for k, p in pipe.named_parameters().items())

    y_params = {k: p.detach().clone() for k, p in pipe.named_parameters().items()}
    pipe.eval()
    opt.eval()
    ref.eval()
    assert not pipe.training and close_to_ref()
    assert any(not torch.equal(p, y_params[k]) for k, p in pipe.named_parameters().items())  # x != y
    with torch.no_grad():
        ref_loss = sum(float(lm_loss(ref(x), y)) for x, y in zip(tokens.tensor_split(4), targets.tensor_split(4))) / 4
    assert abs(pipe.evaluate(tokens, targets) - ref_loss) <= 1e-12 * ref_loss
    pipe.train()
    opt.train()
    assert pipe.training and close_to_ref()
    assert all(max_rel_err(p.detach(), y_params[k]) <= 1e-12 for k, p in pipe.named_parameters().items())


def test_record_writes_a_trace_in_the_simulators_format(tmp_path):
    model, example = gpt()
    path = tmp_path / "step.json"
    pipe = bp.compile(model, example, lm_loss, schedule="bitpipe", devices=2, microbatches=4, optimizer=sgd,
                      trace_path=path)
    pipe.step(*lm_batch(128, 8, 16, seed=6), record=True)
    events = read_chrome_trace(path)
    compute = sorted((e.device, e.name) for e in events if e.kind in ("F", "B", "I", "W"))
    program = pipe.program
    assert compute == sorted((d, str(a)) for d in range(2) for a in program.actions(d) if a.kind != "SYNC")
    recorded = {(e.device, e.name): e for e in pipe.last_timeline}
    for e in events:
        assert abs(recorded[(e.device, e.name)].start - e.start) < 1e-9
        assert e.end >= e.start >= 0


def test_optimizer_must_be_a_factory():
    model, example = gpt()
    with pytest.raises(ConfigError, match=r"optimizer must be a factory .* got SGD"):
        bp.compile(model, example, lm_loss, schedule="1f1b", devices=2, microbatches=2,
                   optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_step_needs_an_optimizer():
    model, example = gpt()
    pipe = bp.compile(model, example, lm_loss, schedule="1f1b", devices=2, microbatches=2)
    with pytest.raises(ConfigError, match=r"step\(\) needs an optimizer"):
        pipe.step(*lm_batch(128, 4, 16))


def test_unknown_schedule_is_refused():
    model, example = gpt()
    with pytest.raises(ScheduleError, match="unknown schedule 'pipedream'"):
        bp.compile(model, example, lm_loss, schedule="pipedream", devices=2, microbatches=2)


def test_local_compile_refuses_data_parallel():
    model, example = gpt()
    with pytest.raises(ConfigError, match="data_parallel=2 needs one process per"):
        bp.compile(model, example, lm_loss, schedule="1f1b", devices=2, microbatches=2, data_parallel=2)
