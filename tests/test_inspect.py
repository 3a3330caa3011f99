"""Inspection: bitpipe_fx.inspect and the `bitpipe-fx inspect` / `partition` commands (auto-partition tool)."""

from __future__ import annotations

import textwrap

import pytest

import bitpipe_fx as bp
from bitpipe_fx.cli import main
from bitpipe_fx.compiler import split_from_plan
from bitpipe_fx.errors import ConfigError
from bitpipe_fx.examples.models import gpt
from bitpipe_fx.passes.command import load_factory, parse_kwargs
from bitpipe_fx.plan import Plan


def test_inspect_returns_the_plan():
    model, example = gpt(layers=4)
    plan = bp.inspect(model, example, schedule="bitpipe", devices=2)
    assert isinstance(plan, bp.Plan)
    assert (plan.schedule, plan.devices, plan.microbatches, plan.num_stages) == ("bitpipe", 2, 4, 4)


def test_cli_inspect_prints_the_summary(capsys):
    rc = main(["inspect", "bitpipe_fx.examples.models:gpt", "--devices", "2", "--schedule", "1f1b", "--arg", "dim=16"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "schedule 1f1b, D=2 devices, N=4 micro-batches, S=2 stages" in out
    assert "balance: max/mean device load =" in out


def test_cli_partition_writes_a_plan_that_recuts_the_model(tmp_path, capsys):
    factory = tmp_path / "my_models.py"
    factory.write_text(
        textwrap.dedent(
            """
            from bitpipe_fx.examples.models import gpt

            def make(layers=2):
                return gpt(layers=layers, dim=16)
            """
        )
    )
    out = tmp_path / "plan.json"
    rc = main(["partition", f"{factory}:make", "--arg", "layers=3", "--devices", "2", "--out", str(out)])
    assert rc == 0 and f"plan written to {out}" in capsys.readouterr().out
    plan = Plan.load(out)
    assert (plan.schedule, plan.devices, plan.num_stages) == ("bitpipe", 2, 4)
    model, example = gpt(layers=3, dim=16)
    assert split_from_plan(model, example, plan).num_stages == 4


def test_missing_factory_path_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere.py"
    with pytest.raises(ConfigError, match=rf"no such file '{missing}' \(from MODULE:FACTORY\)"):
        load_factory(f"{missing}:make")
    rc = main(["inspect", f"{missing}:make"])
    assert rc == 2
    assert f"bitpipe-fx inspect: error: no such file '{missing}'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"cannot import module 'no_such_pkg_xyz'"):
        load_factory("no_such_pkg_xyz:gpt")
    with pytest.raises(ConfigError, match=r"has no callable 'nope'; callables there: \[.*'gpt'"):
        load_factory("bitpipe_fx.examples.models:nope")
    with pytest.raises(ConfigError, match=r"must be MODULE:FACTORY"):
        load_factory("bitpipe_fx.examples.models")
    with pytest.raises(ConfigError, match=r"must return \(model, example_inputs\)"):
        load_factory("bitpipe_fx.examples.models:gpt_config")


def test_factory_arguments_parse_as_literals():
    assert parse_kwargs(["layers=16", "dropout=0.1", "name=tiny"]) == {"layers": 16, "dropout": 0.1, "name": "tiny"}
    with pytest.raises(ConfigError, match=r"--arg expects KEY=VALUE"):
        parse_kwargs(["layers"])


def test_a_factory_module_in_the_current_folder_is_found_by_the_console_script(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "my_factory_mod.py").write_text(textwrap.dedent("""
        from bitpipe_fx.examples.models import gpt

        def make():
            return gpt(layers=2, dim=32, heads=2, seq=16, micro_batch=2)
    """))
    script = Path(sys.executable).with_name("bitpipe-fx")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(script), "inspect", "my_factory_mod:make", "--devices", "2"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Plan for GPT: schedule bitpipe, D=2 devices" in proc.stdout
    proc = subprocess.run([str(script), "inspect", "my_factory_mod_typo:make"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 2 and "cannot import module 'my_factory_mod_typo'" in proc.stderr
