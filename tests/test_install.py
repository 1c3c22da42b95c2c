"""The installed CUDA packages are enough, with no GPU: NVRTC compiles cuflash's kernels,
and the CUDA runtime headers that CuPy's own elementwise kernels and casts include are
there and compile. These are what the slim cuda12/cuda13 extras bring; CI installs them
exactly as README.md says (CUFLASH_EXPECT_INSTALLED=1), where a missing piece fails here
instead of skipping."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cuflash import _build, _tiles

EXPECT_INSTALLED = bool(os.environ.get("CUFLASH_EXPECT_INSTALLED"))


def _missing(what: str, exc: BaseException | None = None) -> None:
    message = f"{what} not found{f' ({exc})' if exc else ''}: install the cuda12 or cuda13 extra"
    if EXPECT_INSTALLED:
        pytest.fail(message)
    pytest.skip(message)


def test_nvrtc_is_installed():
    try:
        version = _build.nvrtc_version()
    except Exception as exc:  # noqa: BLE001 - no CuPy or no libnvrtc
        _missing("NVRTC", exc)
    assert version >= (12, 0)


@pytest.mark.parametrize("arch, hopper", [("sm_80", False), ("sm_90", True)])
def test_a_kernel_of_each_family_compiles_here(arch, hopper):
    try:
        _build.nvrtc_version()
    except Exception as exc:  # noqa: BLE001
        _missing("NVRTC", exc)
    variant, tiles, _ = _tiles.forward_variant(np.dtype(np.float16), 32, False, _tiles.SMEM_LIMIT[arch], arch)
    assert tiles.wgmma == hopper
    compiled = _build.compile_variant(variant, arch)
    assert compiled.cubin[:4] == b"\x7fELF" and "cuflash_fwd" in compiled.log


_CASTS = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
extern "C" __global__ void casts(const float* x, __half* h, __nv_bfloat16* b, long n) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < n) { h[i] = __float2half(x[i]); b[i] = __float2bfloat16(x[i]); }
}
"""


def test_cuda_runtime_headers_compile_with_nvrtc():
    """What CuPy needs for its own kernels (astype to float16/bfloat16, elementwise
    arithmetic): cuda_fp16.h and cuda_bf16.h from the CUDA runtime package, compiled by
    NVRTC with the include folders CuPy uses (its bundled CCCL among them)."""
    try:
        from cuda import pathfinder
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as exc:
        _missing("CuPy", exc)
    include = pathfinder.find_nvidia_header_directory("cudart")
    if include is None:
        _missing("the CUDA runtime headers (cuda_fp16.h)")
    import cupy

    cupy_include = os.path.join(os.path.dirname(cupy.__file__), "_core", "include")
    cccl = os.path.join(cupy_include, "cupy", "_cccl")
    options = ["--gpu-architecture=sm_80", "-std=c++17", f"-I{include}", f"-I{cupy_include}"]
    options += [f"-I{os.path.join(cccl, part)}" for part in ("libcudacxx", "cub", "thrust") if os.path.isdir(os.path.join(cccl, part))]
    prog = nvrtc.createProgram(_CASTS, "casts.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError:
            pytest.fail(f"NVRTC could not compile a kernel that includes cuda_fp16.h:\n{nvrtc.getProgramLog(prog)}")
        assert nvrtc.getCUBIN(prog)[:4] == b"\x7fELF"
    finally:
        nvrtc.destroyProgram(prog)


def test_the_tensor_map_encoder_is_installed():
    """The Hopper warp-specialised forward encodes TMA descriptors with the driver's
    cuTensorMapEncodeTiled through cuda-bindings (the extras install it); without it the
    wgmma kernel serves every call."""
    from cuflash import _tma

    if not _tma.available():
        _missing("cuda-bindings (cuda.bindings.driver)")
    from cuda.bindings import driver

    assert callable(driver.cuTensorMapEncodeTiled)
