"""The memory model (sim/memory.py) on programs small enough to count by hand, and its torch-free import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.schedules import generate
from bitpipe_fx.sim.memory import DeviceMemory, StageMemory, choose_recompute, device_memory

# stage 0 sends 2 bytes per micro-batch, stage 1 (the last) receives them
TWO = (StageMemory(params=100, saved=10, outputs=2, inputs=0, weight_grads=3),
       StageMemory(params=200, saved=20, outputs=0, inputs=2, weight_grads=5))


def test_gpipe_by_hand():
    """gpipe D=2 N=2: device 0 runs F F B B and has both gradient messages posted at its peak; device 1 holds
    both forwards, and its two activation messages have arrived by then."""
    program = generate("gpipe", 2, 2)
    assert device_memory(program, TWO) == (DeviceMemory(100, 100, 200, 2 * 12, 2 * 2),
                                           DeviceMemory(200, 200, 400, 2 * 20, 0))
    assert device_memory(program, TWO, lookahead=1)[0].comm == 2  # one receive posted ahead
    assert device_memory(program, TWO, state_copies=1)[1].optimizer == 200


def test_a_recomputed_stage_keeps_its_inputs_and_rebuilds_one_graph_at_a_time():
    """Device 1 recomputing stage 1: F F keep 2 + 2 bytes; the first B rebuilds 18 more (peak 22)."""
    program = generate("gpipe", 2, 2)
    peaks = device_memory(program, TWO, (False, True))
    assert peaks[1] == DeviceMemory(200, 200, 400, 2 + 2 + 18, 0)
    assert peaks[0] == device_memory(program, TWO)[0]
    assert peaks[1].total == 200 + 200 + 400 + 22 and peaks[1].to_dict()["total"] == peaks[1].total


def test_split_backward_keeps_the_graph_and_weight_gradients_until_w():
    """zbv D=2 N=2 (S=4), every stage alike: device 1 runs F1 F2 F1 F2 I2 W2 I1 I2 I1 W1 W2 W1. After I2.0 it
    holds four graphs and one I's gradients, 4 x 12 + 3, with one of its four receives from device 0 (two
    activations, two gradients) still posted: the peak, 53. After I1.1: three graphs and three I's, 45."""
    same = StageMemory(params=1, saved=10, outputs=2, inputs=2, weight_grads=3)
    peaks = device_memory(generate("zbv", 2, 2), (same,) * 4)
    assert (peaks[1].activations, peaks[1].comm) == (4 * 12 + 3, 2)


def test_choose_recompute_takes_the_stage_that_saves_most_per_second():
    program = generate("gpipe", 2, 2)
    none = device_memory(program, TWO)
    assert choose_recompute(program, TWO, max(m.total for m in none), (1.0, 1.0)) == (False, False)
    # device 1 (840 B) is over 830: recomputing stage 1 brings it to 822
    assert choose_recompute(program, TWO, 830, (1.0, 1.0)) == (False, True)
    assert choose_recompute(program, TWO, 100, (1.0, 1.0)) is None


def test_wrong_sizes_are_refused():
    program = generate("gpipe", 2, 2)
    with pytest.raises(ConfigError, match="got 1 stage sizes for a program of 2 stages"):
        device_memory(program, TWO[:1])
    with pytest.raises(ConfigError, match="recompute has 3 entries but the program has 2 stages"):
        device_memory(program, TWO, (True, True, True))


def test_memory_model_does_not_import_torch():
    code = "import bitpipe_fx.sim.memory, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
