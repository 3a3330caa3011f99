"""Runtime core on hand-cut models: chunks, flat gradient buffers, the local executor, batch checks, timeline.

The toy model (tests.support.toy.Toy) has a tied weight in its first and last stage, a skip value
carried through the middle stages and a model input read again by the last stage.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from bitpipe_fx.api import CompiledPipeline
from bitpipe_fx.errors import ConfigError, PipelineRuntimeError, ScheduleError
from bitpipe_fx.passes.stages import SplitModel, StageSpec
from bitpipe_fx.runtime.local import LocalExecutor
from bitpipe_fx.runtime.specs import check_stage_contract, trace_boundaries
from bitpipe_fx.schedules import SCHEDULES, Action, Program, generate
from bitpipe_fx.schedules.ir import bitpipe_placement, chimera_placement, linear_placement, v_placement
from tests.support.reference import max_rel_err, reference_grads
from tests.support.toy import Toy, naive_program, toy_split


def mse(out, y):
    return ((out - y) ** 2).mean()


def _pipe(program: Program, dtype=torch.float64, optimizer=None, **kw):
    torch.manual_seed(0)
    model = Toy(depth=program.stages * 2).to(dtype)
    ref = copy.deepcopy(model)
    pipe = CompiledPipeline(toy_split(model, program.stages), program, mse, torch.zeros(3, 5, dtype=dtype),
                            optimizer=optimizer, **kw)
    return pipe, ref


def _batch(n: int, dtype=torch.float64, rows: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n * rows, 5, generator=g, dtype=dtype), torch.randn(n * rows, 5, generator=g, dtype=dtype)


def _check(pipe: CompiledPipeline, ref, n: int, tol: float, dtype=torch.float64):
    x, y = _batch(n, dtype)
    loss = pipe.forward_backward(x, y)
    ref_loss, ref_grads = reference_grads(ref, x, y, n, mse)
    grads = pipe.gradients()
    assert set(grads) == set(ref_grads)
    assert abs(loss - ref_loss) <= tol * abs(ref_loss)
    for k, g in grads.items():
        assert max_rel_err(g, ref_grads[k]) <= tol, k


PLACEMENTS = {
    "v2": (v_placement(2), (0, 0, 0, 0)),
    "chimera4": (chimera_placement(4), (0, 0, 1, 1)),
    "bitpipe2": (bitpipe_placement(2), (0, 1, 0, 1)),
    "bitpipe4": (bitpipe_placement(4), (0, 0, 1, 1)),
    "interleaved2x3": (linear_placement(2, 3), (0, 0, 0, 0)),
    "chimera3-two-copies-on-device1": (chimera_placement(3), (0, 1, 0, 1)),
}


@pytest.mark.parametrize("split_backward", [False, True], ids=["B", "I+W"])
@pytest.mark.parametrize("layout", sorted(PLACEMENTS))
def test_any_placement_matches_reference_float64(layout, split_backward):
    placement, pipe_of = PLACEMENTS[layout]
    pipe, ref = _pipe(naive_program(placement, pipe_of, split_backward))
    _check(pipe, ref, len(pipe_of), 1e-12)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_family_matches_reference(name):
    pipe, ref = _pipe(generate(name, 4, 8))
    _check(pipe, ref, 8, 1e-12)


def test_float32_within_contract():
    pipe, ref = _pipe(generate("bitpipe", 2, 4), dtype=torch.float32)
    _check(pipe, ref, 4, 1e-5, torch.float32)


def test_gradients_live_in_one_flat_buffer_per_replica():
    pipe, _ = _pipe(generate("zbv", 2, 4))
    x, y = _batch(4)
    pipe.forward_backward(x, y)
    for r in pipe.executor.replicas:
        (flat,) = r.flat_grads
        assert flat.numel() == sum(p.numel() for p in r.params.values())
        for p in r.params.values():
            assert p.grad.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        assert flat.abs().sum() > 0


def test_replicas_are_private_copies_and_tied_copies_stay_equal():
    pipe, _ = _pipe(generate("bitpipe", 2, 4), optimizer=lambda ps: torch.optim.Adam(ps, lr=0.05))
    ids = [id(p) for r in pipe.executor.replicas for p in r.params.values()]
    assert len(ids) == len(set(ids))
    x, y = _batch(4)
    for _ in range(2):
        pipe.step(x, y)
    copies = [r.params["emb.weight"] for r in pipe.executor.replicas if "emb.weight" in r.params]
    assert len(copies) == 4  # stage 0 and stage 3, two replicas each
    for c in copies[1:]:
        assert torch.equal(c, copies[0])
    assert not torch.equal(copies[0], _pipe(generate("bitpipe", 2, 4))[1].emb.weight)


def test_optimizer_zero_grad_set_to_none_is_repaired():
    pipe, _ = _pipe(generate("1f1b", 2, 4), optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    x, y = _batch(4)
    pipe.step(x, y)
    pipe.optimizer.zero_grad(set_to_none=True)
    pipe.forward_backward(x, y)
    ref_grads = pipe.gradients()
    assert all(g is not None for g in ref_grads.values())
    for r in pipe.executor.replicas:
        for p in r.params.values():
            assert p.grad.untyped_storage().data_ptr() == r.flat_grads[0].untyped_storage().data_ptr()


def test_evaluate_is_forward_only():
    pipe, ref = _pipe(generate("bitpipe", 2, 4))
    x, y = _batch(4)
    loss = pipe.evaluate(x, y)
    ref_loss, _ = reference_grads(ref, x, y, 4, mse)
    assert abs(loss - ref_loss) <= 1e-12 * ref_loss
    assert all(float(g.abs().sum()) == 0.0 for g in pipe.gradients().values())
    assert all(not c.pending() for interp in pipe.executor._train for c in interp.chunks.values())


def test_timeline_records_every_action_once_per_device():
    program = generate("bitpipe", 2, 4)
    pipe, _ = _pipe(program)
    pipe.forward_backward(*_batch(4), record=True)
    compute = [e for e in pipe.last_timeline if e.kind in ("F", "B", "I", "W")]
    expected = sorted((d, str(a)) for d in range(2) for a in program.actions(d) if a.kind != "SYNC")
    assert sorted((e.device, e.name) for e in compute) == expected
    for d in range(2):
        mine = sorted((e for e in compute if e.device == d), key=lambda e: e.start)
        assert all(a.end <= b.start for a, b in itertools.pairwise(mine))
    recorded = list(pipe.last_timeline)
    pipe.forward_backward(*_batch(4))  # not recorded: the last timeline stays
    assert pipe.last_timeline == recorded


def test_deadlocked_program_is_reported():
    place = linear_placement(2)
    bad = Program("bad", place, (0,), (
        (Action("B", 0, 0, 0), Action("F", 0, 0, 0), Action("SYNC", 0, 0)),
        (Action("F", 0, 1, 0), Action("B", 0, 1, 0), Action("SYNC", 0, 1)),
    ))
    with pytest.raises(ScheduleError):
        _pipe(bad)
    torch.manual_seed(0)
    split = toy_split(Toy(depth=2).double(), 2)
    specs = trace_boundaries(split, [torch.zeros(3, 5, dtype=torch.float64)])
    ex = LocalExecutor(bad, split, mse, specs)
    from bitpipe_fx.runtime.batch import BatchSplitter

    batch = BatchSplitter(split.input_names, split.flatten_inputs, specs.model_inputs, 1).split(*_batch(1))
    with pytest.raises(PipelineRuntimeError, match=r"deadlocked: device 0 at B0\.0\.0, device 1 at F0\.1\.0"):
        ex.run(batch, train=True, record=False, step=0)


def test_stage_contract_is_checked():
    torch.manual_seed(0)
    split = toy_split(Toy(depth=2).double(), 2)
    spec1 = split.specs[1]
    broken = SplitModel(split.stages, (split.specs[0], StageSpec(1, spec1.model_inputs, ("h",), spec1.outputs, ())),
                        split.input_names, split.flatten_inputs, split.unflatten_output, split.shared)
    with pytest.raises(ConfigError, match=r"stage 1 receives \['h'\] but stage 0 sends \['h', 'h0'\]"):
        check_stage_contract(broken)


F64, F32 = torch.float64, torch.float32


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (((10, 5), F64), ((10, 5), F64), r"input 'x' has 10 rows .* not divisible by microbatches=4"),
        (((8, 5), F64), ((8, 5), F64), r"micro-batch of input 'x' would be \(2, 5\):float64 .* \(3, 5\)"),
        (((12, 6), F64), ((12, 5), F64), r"would be \(3, 6\):float64 .* compiled for \(3, 5\):float64"),
        (((12, 5), F32), ((12, 5), F64), r"would be \(3, 5\):float32 .* compiled for \(3, 5\):float64"),
        (((12, 5), F64), ((8, 5), F64), r"targets leaf 0 has shape \(8, 5\) but the inputs have 12 rows"),
        (None, ((12, 5), F64), r"model inputs must be a tensor, a tuple .* got NoneType"),
    ],
)
def test_bad_batches_are_refused_before_running(x, y, message):
    pipe, _ = _pipe(generate("1f1b", 2, 4))
    x = torch.zeros(*x[0], dtype=x[1]) if x is not None else None
    with pytest.raises(ConfigError, match=message):
        pipe.forward_backward(x, torch.zeros(*y[0], dtype=y[1]))
    assert all(not c.pending() for interp in pipe.executor._train for c in interp.chunks.values())


def test_program_and_split_must_agree():
    torch.manual_seed(0)
    split = toy_split(Toy(depth=4).double(), 4)
    with pytest.raises(ConfigError, match="program '1f1b' has 2 stages but the split model has 4"):
        CompiledPipeline(split, generate("1f1b", 2, 4), mse, torch.zeros(3, 5, dtype=torch.float64))


def test_local_data_parallel_is_refused():
    with pytest.raises(ConfigError, match=r"data_parallel=2 needs one process per .* world size .* = 4"):
        _pipe(generate("1f1b", 2, 4), data_parallel=2)
