"""The kernels compile for an H100/H200 (sm_90) without a GPU, with 128-bit accesses and libdevice float64 math.

This guards what the interpreter cannot see: that the aligned path really vectorises (the reason the
tables hold base + offset rather than raw addresses) and that the float64 scalar math lowers. The
compiler runs in a subprocess because the test session runs Triton in interpreter mode.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

BASE = {"offsets": "*i64", "n": "i32", "block_tensor": "*i32", "first_block": "*i64", "numels": "*i64", "s": "*fp64"}
ALIGNED_ARGS = {(i,): [["tt.divisibility", 16]] for i in range(9)}


def _compile(name: str, signature: dict, constexprs: dict, aligned_args: bool, num_warps: int) -> str:
    """PTX of kernels.<module>.<kernel> (`name` = "module.kernel") for sm_90 (run with the interpreter off)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, kernel = name.split(".")
    fn = getattr(importlib.import_module(f"bitpipe_fx.kernels.{module}"), kernel)
    attrs = ALIGNED_ARGS if aligned_args else {}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]


SF_SIGNATURE = {**BASE, "y_base": "*fp32", "g_base": "*fp32", "state_base": "*fp32",
                "ALIGNED": "constexpr", "BLOCK": "constexpr"}
JOBS = {  # name: (module.kernel, signature, constexprs, pointer args 16-byte aligned, num_warps)
    "aligned": ("sf_adamw.step_kernel", SF_SIGNATURE, {"ALIGNED": True, "BLOCK": 4096}, True, 8),
    "unaligned": ("sf_adamw.step_kernel", SF_SIGNATURE, {"ALIGNED": False, "BLOCK": 4096}, True, 8),
    # AdamW with the cosine profile: exp, log and cos in float64
    "scalar": ("adamw.scalar_kernel", {"s": "*fp64", "PROFILE": "constexpr"}, {"PROFILE": 2}, False, 1),
}


def _compile_all() -> dict[str, str]:
    return {job: _compile(*args) for job, args in JOBS.items()}


@pytest.fixture(scope="module")
def ptx() -> dict[str, str]:
    """Every job's PTX, compiled in one subprocess with the interpreter off."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_kernels_compile as t; "
            "print(json.dumps(t._compile_all()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        if "ptxas" in proc.stderr or "No module named 'triton.backends.nvidia'" in proc.stderr:
            pytest.skip("this triton build cannot compile for NVIDIA GPUs")
        raise AssertionError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sf_adamw_full_blocks_use_128_bit_accesses(ptx):
    # 8 warps x 32 threads x 16 elements: 4 vector loads per thread for each of y, g, z, v, 4 stores for y, z, v.
    assert len(re.findall(r"ld\.global(\.\w+)*\.v4\.b32", ptx["aligned"])) == 16
    assert len(re.findall(r"st\.global(\.\w+)*\.v4\.b32", ptx["aligned"])) == 12
    assert not re.findall(r"\.v4\.", ptx["unaligned"])


def test_scalar_kernel_float64_math_lowers_to_libdevice(ptx):
    scalar = ptx["scalar"]
    assert "ld.global.b64" in scalar and "st.global.b64" in scalar
    assert "fma.rn.f64" in scalar  # libdevice's float64 exp/log/cos
    assert "ex2.approx" not in scalar and "lg2.approx" not in scalar  # not the float32 fast paths
