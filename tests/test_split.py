"""Split: the stage contract (model inputs read directly, skip values carried, shared parameters), float64
gradients equal to the un-pipelined model, honest train/eval behaviour of dropout, output structures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitpipe_fx.errors import PartitionError
from bitpipe_fx.examples.models import bert, gpt, lm_batch, lm_loss, mlm_batch
from bitpipe_fx.passes import capture, compute_nodes, estimate_costs, partition, run_stages, split


class LongSkip(nn.Module):
    """The first layer's output is used again by the last layer; ``scale`` is only read at the very end."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.middle = nn.ModuleList(nn.Linear(8, 8) for _ in range(6))
        self.last = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> dict:
        h0 = self.first(x)
        h = h0
        for layer in self.middle:
            h = torch.tanh(layer(h))
        return {"y": self.last(h + h0) * scale, "aux": (h0.sum(), None), "n": 3}


def _index(sm, value_name: str) -> list[int]:
    return [s.index for s in sm.specs if value_name in s.inputs]


def test_skip_values_are_carried_and_model_inputs_read_directly():
    torch.manual_seed(0)
    model = LongSkip()
    x, scale = torch.randn(4, 8), torch.randn(4, 1)
    captured = capture(model, (x, scale))
    sm = split(captured, partition(estimate_costs(captured), 4))
    first = next(n.name for n in compute_nodes(captured.graph) if n.name.startswith("linear"))
    # h0 is made in stage 0 and needed in stage 3: stages 1..3 receive it, stages 0..2 send it
    assert _index(sm, first) == [1, 2, 3]
    assert [s.index for s in sm.specs if first in s.outputs] == [0, 1, 2]
    # model inputs are read where they are used, never sent
    assert sm.specs[0].model_inputs == ("x",) and sm.specs[3].model_inputs == ("scale",)
    assert all(s.model_inputs == () for s in sm.specs[1:3])
    assert not any(name in s.inputs for s in sm.specs for name in ("x", "scale"))
    # a stage holds exactly the parameters its own nodes read
    assert sm.specs[0].params[:2] == ("first.weight", "first.bias")
    assert sm.specs[3].params[-2:] == ("last.weight", "last.bias")
    for stage, spec in zip(sm.stages, sm.specs):
        read = {n.target for n in stage.graph.nodes if n.op == "get_attr"}
        assert set(spec.params) == read
    # output structure (dict, nested tuple, None and a constant) is rebuilt
    x2, s2 = torch.randn(4, 8), torch.randn(4, 1)
    out, ref = run_stages(sm, (x2, s2)), model(x2, s2)
    assert out.keys() == ref.keys() and out["n"] == 3 and out["aux"][1] is None
    torch.testing.assert_close(out["y"], ref["y"])
    torch.testing.assert_close(out["aux"][0], ref["aux"][0])


@pytest.mark.parametrize("factory", [gpt, bert], ids=["gpt", "bert"])
def test_float64_gradients_match_the_unpipelined_model(factory):
    model, example = factory(layers=4)
    model.double()
    captured = capture(model, example)
    sm = split(captured, partition(estimate_costs(captured), 8))
    assert sm.shared == {"tok_emb.weight": (0, 7)}
    cfg = model.config
    if factory is gpt:
        tokens, targets = lm_batch(cfg.vocab, cfg.micro_batch, cfg.seq, seed=11)
        args = (tokens,)
    else:
        tokens, mask, targets = mlm_batch(cfg.vocab, cfg.micro_batch, cfg.seq, seed=11)
        args = (tokens, mask)

    def grads(forward) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = lm_loss(forward(), targets)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref = grads(lambda: model(*args))
    # the stages hold the model's own tensors, so the tied weight's gradient sums both uses by construction;
    # collect the stage gradients by FQN from the stage modules to check exactly that
    model.zero_grad(set_to_none=True)
    loss = lm_loss(run_stages(sm, args), targets)
    loss.backward()
    staged = {}
    for stage in sm.stages:
        for fqn, p in stage.named_parameters():
            staged[fqn] = p.grad
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert staged.keys() == ref.keys()
    for fqn, g in ref.items():
        torch.testing.assert_close(staged[fqn], g, rtol=1e-12, atol=1e-15, msg=fqn)


def test_dropout_follows_the_stage_modules_train_and_eval_mode():
    model, example = gpt(layers=2, dropout=0.5)
    captured = capture(model.eval(), example)
    assert not model.training  # capture leaves the model's mode as it was
    sm = split(captured, partition(estimate_costs(captured), 3))
    assert all(not s.training for s in sm.stages)  # stages start in the model's mode
    with torch.no_grad():
        torch.testing.assert_close(run_stages(sm, example), model(*example))
        for stage in sm.stages:
            stage.train()
        model.train()
        torch.manual_seed(3)
        staged = run_stages(sm, example)
        torch.manual_seed(3)
        reference = model(*example)
        # same dropout calls in the same order: the same random masks
        torch.testing.assert_close(staged, reference)
        assert not torch.allclose(staged, model.eval()(*example))


def test_split_refuses_bad_cuts():
    model, example = gpt(layers=2)
    captured = capture(model, example)
    nodes = compute_nodes(captured.graph)
    with pytest.raises(PartitionError, match="increase strictly"):
        split(captured, [5, 5])
    with pytest.raises(PartitionError, match="increase strictly"):
        split(captured, [len(nodes)])
    after_unbind = next(i for i, n in enumerate(nodes) if n.name.startswith("unbind")) + 1
    with pytest.raises(PartitionError, match=r"'unbind' \(list, not a tensor\)"):
        split(captured, [after_unbind])
