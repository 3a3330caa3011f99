"""The numerics contract (DESIGN.md) on the local executor, on captured example models.

Losses and every parameter's gradient (replicas summed, by original FQN) match the non-pipelined
reference, and so do the parameters after 3 optimizer steps: float64 at 1e-12 relative, float32 at 1e-5.
The distributed executor is checked against the same contract in test_dist.py.
"""

from __future__ import annotations

import pytest
import torch

from bitpipe_fx.schedules import SCHEDULES, generate
from tests.support.cases import contract_errors, model_case

FAMILIES = sorted(SCHEDULES)
_CASES: dict[tuple[str, torch.dtype], object] = {}



def case(name: str, dtype: torch.dtype = torch.float64):
    """Each model is captured once per session (partition + split are per program)."""
    if (name, dtype) not in _CASES:
        _CASES[(name, dtype)] = model_case(name, dtype)
    return _CASES[(name, dtype)]


def assert_contract(result: dict, tol: float) -> None:
    assert result["fqns"] == result["all_fqns"], "every used parameter gets a gradient"
    for key in ("loss_err", "grad_err", "param_err"):
        assert result[key] <= tol, (key, result)


@pytest.mark.parametrize("schedule", FAMILIES)
@pytest.mark.parametrize("model", ["gpt", "bert"])
def test_examples_every_family_two_devices(model, schedule):
    assert_contract(contract_errors(case(model), generate(schedule, 2, 4)), 1e-12)


@pytest.mark.parametrize("schedule", FAMILIES)
def test_gpt_every_family_four_devices(schedule):
    assert_contract(contract_errors(case("gpt"), generate(schedule, 4, 8)), 1e-12)


@pytest.mark.parametrize("schedule", FAMILIES)
def test_bert_with_dropout_every_family_four_devices(schedule):
    assert_contract(contract_errors(case("bert"), generate(schedule, 4, 8)), 1e-12)


def test_dropout_results_are_equal_across_schedules():
    """BERT with dropout 0.1: the same loss and parameters after 3 steps whatever the schedule and D."""
    results = [contract_errors(case("bert"), generate(s, d, 8)) for s in ("1f1b", "bitpipe", "zbv") for d in (2, 4)]
    losses = [r["loss"] for r in results]
    assert max(losses) - min(losses) <= 1e-12 * abs(losses[0])


@pytest.mark.parametrize("schedule", FAMILIES)
def test_hugging_face_gpt2_with_dropout_every_family(schedule):
    pytest.importorskip("transformers")
    assert_contract(contract_errors(case("hf-gpt2"), generate(schedule, 2, 4)), 1e-12)


@pytest.mark.parametrize(("model", "schedule"), [("gpt", "bitpipe"), ("bert", "dualpipev")])
def test_float32(model, schedule):
    assert_contract(contract_errors(case(model, torch.float32), generate(schedule, 2, 4)), 1e-5)
