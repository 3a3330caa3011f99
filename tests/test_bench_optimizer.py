"""benchmarks/optimizer_step.py: the smoke run writes a consistent JSON and markdown; the sizes are DESIGN.md's."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

pytest.importorskip("schedulefree")
optimizer_step = pytest.importorskip("optimizer_step")


def test_gpt_preset_is_the_design_doc_parameter_list():
    shapes = optimizer_step.transformer_shapes(*optimizer_step.PRESETS["gpt-1.3b"])
    assert len(shapes) == 292
    assert sum(math.prod(s) for s in shapes) / 1e9 == pytest.approx(1.316, abs=5e-4)


def test_bytes_per_parameter_floor():
    import torch

    assert optimizer_step.bytes_per_param("bitpipe_fx ScheduleFreeAdamW", torch.float32) == 28
    assert optimizer_step.bytes_per_param("schedulefree SGDScheduleFree", torch.float32) == 20
    assert optimizer_step.bytes_per_param("torch AdamW fused", torch.float32) == 28
    assert optimizer_step.bytes_per_param("bitpipe_fx ScheduleFreeAdamW", torch.bfloat16) == 2 * 2 + 2 + 16


def test_smoke_run_writes_json_and_markdown(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / "optimizer_step.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp_path / "optimizer_step_cpu.json").read_text())
    assert payload["device"] == "cpu" and payload["preset"] == "smoke"
    names = {row["optimizer"] for row in payload["rows"]}
    assert names == {"bitpipe_fx ScheduleFreeAdamW", "bitpipe_fx ScheduleFreeSGD", "bitpipe_fx AdamW (rex profile)",
                     "torch AdamW foreach", "schedulefree AdamWScheduleFree", "schedulefree SGDScheduleFree"}
    bandwidth = payload["copy_bandwidth_gbps"]
    assert bandwidth > 0
    for row in payload["rows"]:
        assert row["ms"] > 0
        floor_ms = row["bytes_per_param"] * payload["parameters"] / (bandwidth * 1e9) * 1e3
        assert row["floor_ms"] == pytest.approx(floor_ms)
        assert row["pct_of_floor"] == pytest.approx(100 * floor_ms / row["ms"])
        assert row["gbps"] == pytest.approx(row["bytes_per_param"] * payload["parameters"] / row["ms"] / 1e6)
    ms = {row["optimizer"]: row["ms"] for row in payload["rows"]}
    for ratio in payload["ratios"]:
        assert ratio["speedup"] == pytest.approx(ms[ratio["peer"]] / ms[ratio["ours"]])
    assert {(r["ours"], r["peer"]) for r in payload["ratios"]} >= {
        ("bitpipe_fx ScheduleFreeAdamW", "schedulefree AdamWScheduleFree"),
        ("bitpipe_fx ScheduleFreeSGD", "schedulefree SGDScheduleFree")}
    assert payload["check"] and all(c["pass_rtol_1e-5_atol_1e-6"] for c in payload["check"].values())
    markdown = (tmp_path / "optimizer_step_cpu.md").read_text()
    assert markdown.startswith("## Optimizer step")
    assert "| bitpipe_fx ScheduleFreeAdamW |" in markdown and "peer ms / fused ms" in markdown
