"""The Turing (sm_75) and Volta (sm_70) families on a newer GPU: the same sources built as
PTX for compute_75 / compute_70 (CUFLASH_ARCH), which the driver compiles for the GPU at
hand. Those instructions (m16n8k8, ldmatrix, or neither) are valid there, so the float64
checks of the portable family run through the older families' code paths, with their
shared-memory budgets (64 KB, 96 KB) deciding the tiles.

Each architecture runs in a child process: the arch is fixed per process at first use.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

_SCRIPT = r"""
import sys
sys.path.insert(0, {tests!r})
import numpy as np
import cuflash
from cuflash import _build, _launch
from test_kernels_gpu import Case, run_case, dev

from cuflash import _fast, _interop

# Every output and workspace starts as NaN (as the pytest fixture of test_kernels_gpu does).
_real_empty = _interop.empty
def _poisoned(shape, dtype, like, stream=None):
    obj, view = _real_empty(shape, dtype, like, stream)
    if np.dtype(dtype).kind == "f":
        view.fill(np.nan)
    return obj, view
_interop.empty = _poisoned
_real_fast_empty = _fast.empty
def _poisoned_fast(library, like, shape, dtype):
    arr = _real_fast_empty(library, like, shape, dtype)
    if np.dtype(dtype).kind == "f":
        arr.fill(np.nan)
    return arr
_fast.empty = _poisoned_fast

assert _build.arch_of(0) == {arch!r}, _build.arch_of(0)
assert _launch.smem_limit(0) <= {limit}
cases = [
    Case(dtype="fp16"),
    Case(dtype="fp16", seqlen_q=77, seqlen_k=130, heads=4, heads_kv=2, causal=True),
    Case(dtype="fp16", seqlen_q=150, seqlen_k=40, causal=True, alignment="top_left", deterministic=True),
    Case(dtype="fp16", head_dim=128, window=(20, 7), layout="bhsd"),
    Case(dtype="fp16", head_dim=256, seqlen_q=70, seqlen_k=90, causal=True),
    Case(dtype="fp16", head_dim=40, softcap=20.0, alibi="h", bias_shape=("1", "h", "q", "k"),
         mask_shape=("b", "1", "q", "k"), dropout_p=0.2),
    Case(dtype="fp16", varlen=((30, 50), (0, 7), (45, 45)), causal=True),
    Case(dtype="fp32", head_dim=64, seqlen_q=65, seqlen_k=97, causal=True),
    Case(dtype="fp32", head_dim=128, seqlen_q=33, seqlen_k=40, heads=2, heads_kv=1),
    Case(dtype="fp32", head_dim=96, seqlen_q=50, seqlen_k=50, softcap=10.0, deterministic=True),
]
for i, case in enumerate(cases):
    run_case(case, seed=1000 + i)
    print("ok", case, flush=True)
import ml_dtypes
q = dev(np.ones((1, 8, 1, 64), dtype=ml_dtypes.bfloat16))
try:
    cuflash.forward(q, q, q)
except cuflash.ValidationError as exc:
    assert "float16" in str(exc) and "8.0" in str(exc), str(exc)
    print("bf16 refused:", str(exc).splitlines()[1])
else:
    raise AssertionError("bf16 ran on a pre-Ampere family")
print("all cases passed")
"""


@pytest.mark.parametrize("arch,limit", [("compute_75", 65536), ("compute_70", 98304)])
def test_pre_ampere_family_matches_float64(arch, limit, tmp_path):
    from cuflash import _build

    if _build.volta_unsupported(arch) and not os.environ.get(_build.PTX_DIR_ENV):
        pytest.skip(f"NVRTC {_build.nvrtc_version()} cannot target {arch} (CUDA 13 dropped Volta); "
                    "a CUDA 12 environment (cupy-cuda12x) runs this test")
    tests = str(Path(__file__).resolve().parent)
    env = dict(os.environ, CUFLASH_ARCH=arch)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT.format(tests=tests, arch=arch, limit=limit)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0 and "all cases passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
