"""The build stage, checked without a GPU: the params record matches the C struct, every
shipped kernel variant compiles for sm_80 and sm_90 with NVRTC (in child processes, so a
crashing ptxas fails a test instead of the run), and the cache key follows every source
file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cuflash import _build, _params, _tiles
from cuflash._interop import BFLOAT16

from _compile import compile_all, save_report

nvrtc_available = True
try:
    _build.nvrtc_version()
except Exception:  # noqa: BLE001 - no CuPy / NVRTC on this machine
    nvrtc_available = False
needs_nvrtc = pytest.mark.skipif(not nvrtc_available, reason="needs NVRTC (install the cuda12 or cuda13 extra)")


def test_cuda_sources_are_found_from_the_installed_package():
    import cuflash

    root = _build.source_dir()
    assert (root / "params.h").is_file()
    assert {"flash_fwd.cu", "flash_bwd.cu"} <= {p.name for p in root.iterdir()}
    if os.environ.get("CUFLASH_EXPECT_INSTALLED"):  # CI: tests run against the built wheel
        package = Path(cuflash.__file__).resolve().parent
        assert "site-packages" in str(package) and root == package / "cuda_src"


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_params_record_matches_the_c_struct(tmp_path):
    dtype = _params.params_dtype()
    lines = [f'printf("%s %zu\\n", "{n}", offsetof(struct Params, {n}));' for n in dtype.names]
    program = textwrap.dedent(
        """
        #include <stdio.h>
        #include <stddef.h>
        #include "params.h"
        int main(void) {
            printf("sizeof %zu\\n", sizeof(struct Params));
            %s
            return 0;
        }
        """
    ).replace("%s", "\n    ".join(lines))
    (tmp_path / "offsets.c").write_text(program)
    exe = tmp_path / "offsets"
    subprocess.run(["cc", "-I", str(_build.source_dir()), str(tmp_path / "offsets.c"), "-o", str(exe)], check=True)
    c_layout = dict(line.split() for line in subprocess.check_output([str(exe)]).decode().splitlines())
    assert int(c_layout.pop("sizeof")) == dtype.itemsize
    numpy_layout = {name: dtype.fields[name][1] for name in dtype.names}
    assert {k: int(v) for k, v in c_layout.items()} == numpy_layout


def test_params_field_sizes_match_their_c_types():
    dtype = _params.params_dtype()
    assert dtype.fields["q"][0] == np.uint64  # pointers
    assert dtype.fields["q_row_stride"][0] == np.int64  # 64-bit strides
    assert dtype.fields["head_dim"][0] == np.int32
    assert dtype.fields["softmax_scale"][0] == np.float32


class _FakeDeviceArray:
    """Just what _params.fill reads of a device array: pointer, shape, strides, dtype."""

    def __init__(self, ptr: int, shape: tuple, dtype, strides: tuple | None = None):
        self.dtype = np.dtype(dtype)
        self.itemsize = self.dtype.itemsize
        self.shape, self.ndim = shape, len(shape)
        if strides is None:
            strides = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
        self.strides = tuple(st * self.itemsize for st in strides)
        self.data = type("Pointer", (), {"ptr": ptr})()


def _views(pointers: dict[str, int], q_shape=(2, 70, 4, 64), kv_shape=(2, 90, 2, 64), row_stride=None):
    from cuflash._interop import BFLOAT16

    f32 = np.float32
    b, n, h, d = q_shape
    q_strides = None if row_stride is None else (n * row_stride, row_stride, d, 1)
    arrays = dict(q=(q_shape, BFLOAT16, q_strides), k=(kv_shape, BFLOAT16, None), v=(kv_shape, BFLOAT16, None),
                  out=(q_shape, BFLOAT16, None), lse=((b, h, n), f32, None), dout=(q_shape, BFLOAT16, None),
                  dq=(q_shape, BFLOAT16, None), dk=(kv_shape, BFLOAT16, None), dv=(kv_shape, BFLOAT16, None),
                  dsum=((b, h, n), f32, None), lse_log2=((b, h, n), f32, None), dq_accum=((b, h, n, d), f32, None))
    return _params.Views(**{name: _FakeDeviceArray(pointers[name], shape, dt, st) for name, (shape, dt, st) in arrays.items()})


@pytest.mark.parametrize("row_stride", [None, 4 * 64 + 3])
def test_a_reused_record_with_new_pointers_equals_a_fresh_one(row_stride):
    """The plan cache's records: a filled record re-pointed (pointers, alignment bits,
    seed) is byte for byte the record `fill` makes for the new call, misaligned pointers
    included."""
    from cuflash._options import make_options
    from cuflash._validate import Dims

    names = ("dout", "q", "k", "v", "out", "lse", "dq", "dk", "dv", "dq_accum", "dsum", "lse_log2")
    opts = make_options(causal=True, dropout_p=0.1, seed=5)
    dims = Dims(batch=2, seqlen_q=70, seqlen_k=90, num_heads=4, num_heads_kv=2, head_dim=64)
    rng = np.random.default_rng(0)
    first = {name: int(rng.integers(1, 2**40)) * 256 for name in names}
    record = _params.fill(_views(first, row_stride=row_stride), opts, dims, dq_atomic=True).pack()
    repoint = _params.Repointer(record, _views(first, row_stride=row_stride), names, opts, dims)
    for offset in (0, 2, 16, 6):
        again = {name: int(rng.integers(1, 2**40)) * 256 + (offset if name in ("q", "dk", "out") else 0)
                 for name in names}
        seed = int(rng.integers(0, 2**64, dtype=np.uint64))
        fresh = _params.fill(_views(again, row_stride=row_stride), opts.replace(seed=seed), dims, dq_atomic=True).pack()
        argument = repoint([again[name] for name in names], seed)
        assert argument.shape == (1,) and argument.dtype == _params.as_argument(fresh).dtype
        reused = argument.view(fresh.dtype)
        assert reused.tobytes() == fresh.tobytes()
        if offset % 16:  # the misaligned arrays lose their vector-load bits
            assert int(reused["aligned"][0]) != int(record["aligned"])


@needs_nvrtc
@pytest.mark.parametrize("arch", _tiles.ARCHES)
def test_every_shipped_variant_compiles(arch):
    variants = _tiles.shipped_variants(arch)
    assert len(variants) >= 90
    done = compile_all(variants, arch)
    report, failures = done.report, done.failures
    save_report(report, arch)
    assert not failures, "\n".join(failures)
    for tag, entry in report.items():
        kernels = entry["kernels"]
        assert kernels, f"{tag}: no ptxas resource report"
        if tag.startswith("flash_fwd_ws_sm90"):
            assert set(kernels) == {"cuflash_fwd"}
            # The consumer warpgroups hold O, S and P in registers: a spill in the key loop
            # costs more than the warp specialisation gains. At head dim 256 (O alone is 128
            # registers) ptxas keeps one per-thread index (4 bytes) in local memory, read
            # once per query tile on the packed-batch path, outside the key loop (SASS).
            allowed = 8 if "head_dim256" in tag else 0
            assert kernels["cuflash_fwd"]["spill_stores"] <= allowed, (tag, kernels)
        elif tag.startswith("flash_fwd_sm90"):
            assert set(kernels) == {"cuflash_fwd"}  # probabilities come from the portable module
        elif tag.startswith("flash_bwd_sm90"):
            assert set(kernels) == {"cuflash_bwd_dkdv"}  # the other kernels come from the portable module
        elif tag.startswith("flash_decode"):
            assert set(kernels) == {"cuflash_decode", "cuflash_decode_append", "cuflash_decode_combine"}
        elif tag.startswith("flash_fwd"):
            assert set(kernels) == {"cuflash_fwd", "cuflash_probs"}
        else:
            assert set(kernels) == {"cuflash_bwd_prep", "cuflash_bwd_dkdv", "cuflash_bwd_dq", "cuflash_bwd_dq_convert"}


@needs_nvrtc
@pytest.mark.parametrize("arch", _tiles.PRE_AMPERE_ARCHES)
def test_every_pre_ampere_variant_compiles_to_sass(arch):
    """The Turing and Volta families: every variant a user can reach there (fp16, fp32; no
    bf16) assembles for the real architecture. Registers, stack and spills go to
    CUFLASH_COMPILE_REPORT when set (reports/compile-pre-ampere.md is made from it)."""
    if _build.volta_unsupported(arch):
        with pytest.raises(_build.CompileError, match="CUDA 13 dropped Volta"):
            _build.compile_variant(_tiles.shipped_variants(arch)[0], arch)
        pytest.skip(f"NVRTC {_build.nvrtc_version()} cannot target {arch} (CUDA 13 dropped Volta): "
                    "the cuda12 environment (CI) builds it")
    variants = _tiles.shipped_variants(arch)
    assert variants and all(dict(v.defines).get("CF_ELEM") != 1 for v in variants)
    assert not any(v.arch_suffix for v in variants)
    done = compile_all(variants, arch)
    report, failures = done.report, done.failures
    save_report(report, arch)
    assert not failures, "\n".join(failures)
    assert all(entry["kernels"] for entry in report.values())


@needs_nvrtc
@pytest.mark.parametrize("arch", _tiles.ARCHES)
def test_block_sparse_variants_compile(arch):
    """The list-walking (CF_BLOCK_SPARSE) kernels of every family, for the smallest and the
    largest block size, 16-bit and fp32, with and without modifiers, head dims 64, 128, 256."""
    variants = _tiles.block_sparse_variants(arch, dtypes=(BFLOAT16, np.dtype(np.float32)), head_dims=(64, 128, 256),
                                            block_sizes=[(64, 64), (128, 128)])
    assert all(("CF_BLOCK_SPARSE", 1) in v.defines for v in variants)
    done = compile_all(variants, arch)
    assert not done.failures, "\n".join(done.failures)
    for tag, entry in done.report.items():
        assert entry["kernels"], f"{tag}: no ptxas resource report"


@needs_nvrtc
def test_cache_key_follows_header_edits(tmp_path, monkeypatch):
    fake = tmp_path / "cuda_src"
    shutil.copytree(_build.source_dir(), fake)
    monkeypatch.setattr(_build, "source_dir", lambda: fake)
    variant = _tiles.shipped_variants("sm_90")[0]
    before = _build.cache_key(variant, "sm_90")
    with open(fake / "softmax.cuh", "a") as f:
        f.write("\n// an edit to a header\n")
    _build._sources_cache.clear()
    after = _build.cache_key(variant, "sm_90")
    _build._sources_cache.clear()
    assert before != after
    assert _build.cache_key(variant, "sm_80") != _build.cache_key(variant, "sm_90")


@needs_nvrtc
def test_build_writes_the_cubin_once_and_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CUFLASH_CACHE_DIR", str(tmp_path))
    variant = _tiles.forward_variant(np.dtype(np.float16), 64, False, _tiles.SMEM_LIMIT["sm_80"])[0]
    path, seconds = _build.build(variant, "sm_80")
    assert path.is_file() and path.parent == tmp_path and seconds > 0
    assert path.read_bytes()[:4] == b"\x7fELF"
    again, seconds_again = _build.build(variant, "sm_80")
    assert again == path and seconds_again == 0.0


def test_tile_table_fits_every_arch_shared_memory():
    for arch, limit in _tiles.SMEM_LIMIT.items():
        for dtype in _tiles.ELEM_CODE:
            for bucket in _tiles.HEAD_DIM_BUCKETS:
                _, tiles, smem = _tiles.forward_variant(dtype, bucket, False, limit)
                assert smem <= limit and tiles.block_m % 16 == 0
                try:
                    plan = _tiles.backward_variant(dtype, bucket, False, limit)
                except _tiles.UnsupportedConfig:
                    assert np.dtype(dtype) == np.float32 and bucket > 128 and limit < 150_000
                    continue
                assert plan.dkdv_smem <= limit and plan.dq_smem <= limit


def test_hopper_forward_table_fits_and_is_chosen_only_where_it_runs():
    limit = _tiles.SMEM_LIMIT["sm_90"]
    for dtype in _tiles.ELEM_CODE:
        for bucket in _tiles.HEAD_DIM_BUCKETS:
            for general in (False, True):
                variant, tiles, smem = _tiles.forward_variant(dtype, bucket, general, limit, "sm_90")
                hopper = np.dtype(dtype).itemsize == 2 and not general
                assert (variant.kernel_file == "flash_fwd_sm90.cu") == hopper == tiles.wgmma
                assert (variant.arch_suffix == "a") == hopper and smem <= limit
                if hopper:
                    assert tiles.block_m == 16 * tiles.warps and tiles.warps % 4 == 0
                    assert "--gpu-architecture=sm_90a" in _build.options_for(variant, "sm_90")
                    assert smem * tiles.min_blocks <= limit  # the resident blocks fit together
    for arch in ("sm_80", "sm_86", "sm_89"):
        assert _tiles.forward_variant(np.dtype(np.float16), 128, False, _tiles.SMEM_LIMIT[arch], arch)[0].kernel_file == "flash_fwd.cu"


def test_hopper_backward_table_fits_and_is_chosen_only_where_it_runs():
    limit = _tiles.SMEM_LIMIT["sm_90"]
    for dtype in _tiles.ELEM_CODE:
        for bucket in _tiles.HEAD_DIM_BUCKETS:
            for general in (False, True):
                plan = _tiles.backward_variant(dtype, bucket, general, limit, "sm_90")
                portable = _tiles.backward_variant(dtype, bucket, general, limit)
                # 160 and 192 pad to 192 columns, which do not split into 128-column halves
                hopper = np.dtype(dtype).itemsize == 2 and not general and bucket not in (160, 192)
                assert (plan.dkdv_variant is not None) == hopper == plan.dkdv.wgmma
                assert plan.variant == portable.variant and plan.dq == portable.dq  # prep, dQ kernels
                assert plan.dkdv_smem <= limit
                if hopper:
                    assert plan.dkdv_variant.kernel_file == "flash_bwd_sm90.cu"
                    assert "--gpu-architecture=sm_90a" in _build.options_for(plan.dkdv_variant, "sm_90")
                    assert plan.dkdv.block_m in (64, 128)
                    padded = -(-bucket // 64) * 64
                    # BwdSm90's static_asserts: 64-key groups of one warpgroup, or of two that
                    # split the padded head dim in 128-column halves and the query tile in halves
                    split = _tiles.bwd_sm90_split(plan.dkdv)
                    assert plan.dkdv.block_n * split == 16 * plan.dkdv.warps and split == (1 if bucket <= 128 else 2)
                    if split == 2:
                        assert padded == 256 and plan.dkdv.block_m // 2 == 32
                    # dQ splits into 64- or 128-column wgmma products
                    row_split = plan.dkdv.block_m // 64
                    cols = padded // (plan.dkdv.warps // 4 // row_split)
                    assert cols in (64, 128)
                else:
                    assert plan == portable
    for arch in ("sm_80", "sm_86", "sm_89"):
        assert _tiles.backward_variant(np.dtype(np.float16), 128, False, _tiles.SMEM_LIMIT[arch], arch).dkdv_variant is None


def test_wgmma_header_matches_its_generator():
    script = Path(__file__).resolve().parent.parent / "scripts" / "gen_wgmma.py"
    if not script.is_file():
        pytest.skip("scripts/ is not part of an installed package")
    res = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, "cuda_src/wgmma.cuh differs from scripts/gen_wgmma.py's output: rerun the script"


def test_head_dims_pad_to_buckets():
    assert [_tiles.head_dim_bucket(d) for d in (1, 31, 32, 33, 64, 65, 255, 256)] == [32, 32, 32, 64, 64, 96, 256, 256]
    with pytest.raises(ValueError, match="257"):
        _tiles.head_dim_bucket(257)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


# ---- the kernel cache under faults -------------------------------------------------------------


def _small_variant():
    """The quickest shipped variant to compile (a head-dim-32 forward)."""
    return _tiles.forward_variant(np.dtype(np.float16), 32, False, _tiles.SMEM_LIMIT["sm_80"])[0]


@pytest.fixture(scope="module")
def compiled_once():
    """One real NVRTC compile that the fault tests hand out again instead of recompiling."""
    return _build.compile_variant(_small_variant(), "sm_80")


@pytest.fixture
def counted_compiles(monkeypatch, compiled_once):
    calls = []
    monkeypatch.setattr(_build, "compile_variant", lambda v, a: calls.append((v, a)) or compiled_once)
    monkeypatch.setattr(_build, "_redirected", {})
    return calls


@needs_nvrtc
def test_a_truncated_corrupt_or_unrecorded_cached_cubin_is_rebuilt_with_a_warning(tmp_path, monkeypatch,
                                                                                   counted_compiles, compiled_once):
    monkeypatch.setenv("CUFLASH_CACHE_DIR", str(tmp_path))
    variant = _small_variant()
    path, _ = _build.build(variant, "sm_80")
    assert path.read_bytes() == compiled_once.cubin and len(counted_compiles) == 1
    data = compiled_once.cubin

    def damage_and_rebuild(damage, match):
        damage()
        with pytest.warns(RuntimeWarning, match=match):
            again, seconds = _build.build(variant, "sm_80")
        assert again == path and seconds > 0 and path.read_bytes() == data
        assert _build._cache_problem(path) is None

    damage_and_rebuild(lambda: path.write_bytes(data[: len(data) // 2]), f"truncated.*{len(data) // 2} bytes")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    damage_and_rebuild(lambda: path.write_bytes(bytes(flipped)), "does not match the record")
    damage_and_rebuild(lambda: path.write_bytes(b""), "truncated")
    damage_and_rebuild(lambda: _build._record_path(path).unlink(), "no size and checksum record")
    assert len(counted_compiles) == 5
    _build.build(variant, "sm_80")  # whole again: a hit, no warning, no compile
    assert len(counted_compiles) == 5
    assert not list(tmp_path.glob("*.tmp")), "temporary files left behind"


@needs_nvrtc
def test_an_unwritable_cache_folder_falls_back_to_a_temporary_one_with_a_warning(tmp_path, monkeypatch,
                                                                                 counted_compiles, compiled_once):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    unwritable = blocker / "cache"  # mkdir fails whoever runs the test (root ignores permissions)
    monkeypatch.setenv("CUFLASH_CACHE_DIR", str(unwritable))
    # The fallback folder is made under the system's temporary folder: keep it inside this
    # test's own folder, so no run leaves anything behind or meets another run's folders.
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    variant = _small_variant()
    with pytest.warns(RuntimeWarning, match="cannot write the kernel cache folder"):
        path, seconds = _build.build(variant, "sm_80")
    try:
        assert seconds > 0 and path.parent != unwritable and Path(tempfile.gettempdir()) in path.parents
        assert path.read_bytes() == compiled_once.cubin and _build._cache_problem(path) is None
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the fallback is remembered: no second warning
            again, seconds = _build.build(variant, "sm_80")
        assert again == path and seconds == 0.0 and len(counted_compiles) == 1
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


_RACER = """
import hashlib, json, os, sys, time
from pathlib import Path
import numpy as np
from cuflash import _build, _tiles

here, me, other = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
(here / f"ready-{me}").touch()
while not (here / f"ready-{other}").exists():  # start compiling together
    time.sleep(0.005)
real_compile = _build.compile_variant


def compile_together(variant, arch):
    # Entered only after this process found the cache empty: waiting here until the other
    # process has too makes the race certain (both compile, both store), whatever the
    # scheduler does between the two cache checks; without it a process stalled for longer
    # than one compile finds the other's cubin and never compiles.
    (here / f"compiling-{me}").touch()
    give_up = time.monotonic() + 240
    while not (here / f"compiling-{other}").exists():
        if time.monotonic() > give_up:
            sys.exit(f"{other} never started compiling: it found a cubin in the empty cache")
        time.sleep(0.005)
    return real_compile(variant, arch)


_build.compile_variant = compile_together
variant = _tiles.forward_variant(np.dtype(np.float16), 32, False, _tiles.SMEM_LIMIT["sm_80"])[0]
path, seconds = _build.build(variant, "sm_80")
print(json.dumps({"path": str(path), "seconds": seconds, "problem": _build._cache_problem(path),
                  "sha": hashlib.sha256(path.read_bytes()).hexdigest()}))
"""


@needs_nvrtc
def test_two_processes_compiling_one_variant_into_one_empty_cache_both_load_whole_cubins(tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, CUFLASH_CACHE_DIR=str(cache),
               PYTHONPATH=os.pathsep.join([str(Path(_build.__file__).resolve().parents[1]),
                                           os.environ.get("PYTHONPATH", "")]))
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path), me, other], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for me, other in (("a", "b"), ("b", "a"))]
    results = []
    for racer in racers:
        out, err = racer.communicate(timeout=300)
        assert racer.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["seconds"] > 0 for r in results), "both processes must have compiled (a real race)"
    assert all(r["problem"] is None for r in results)
    assert len({r["path"] for r in results}) == 1 and len({r["sha"] for r in results}) == 1
    assert sorted(p.suffix for p in cache.iterdir()) == [".cubin", ".log", ".sha256"]
