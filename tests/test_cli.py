"""The `cuflash` command: info, prebuild, cache clear and bench work as documented, and
say clearly what they cannot do on a machine without a GPU."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cuflash import _build, _cli, _tiles

nvrtc_available = True
try:
    _build.nvrtc_version()
except Exception:  # noqa: BLE001
    nvrtc_available = False
needs_nvrtc = pytest.mark.skipif(not nvrtc_available, reason="needs NVRTC (install the cuda12 or cuda13 extra)")
no_gpu = pytest.mark.skipif(bool(_cli.find_gpus()[0]), reason="checks the behaviour on a machine without a GPU")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cubins"
    monkeypatch.setenv("CUFLASH_CACHE_DIR", str(folder))
    return folder


def test_info_names_every_kernel_file_that_serves_a_call(cache, capsys):
    assert _cli.main(["info"]) == 0
    text = capsys.readouterr().out
    for label in ("CuPy:", "NVRTC:", "driver:", "GPUs:", f"cache:      {cache}"):
        assert label in text
    arches = [g.arch for g in _cli.find_gpus()[0] if g.major >= 8] or list(_tiles.ARCHES)
    for arch in arches:
        if arch in _tiles.SMEM_LIMIT:
            for variant in _tiles.shipped_variants(arch):
                assert f"{variant.kernel_file} ({arch}{variant.arch_suffix})" in text


@no_gpu
def test_info_without_a_gpu_says_so():
    res = subprocess.run([sys.executable, "-m", "cuflash", "info"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "no GPU" in res.stdout and "sm_90a" in res.stdout


def test_info_works_without_cupy(monkeypatch, cache, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setitem(sys.modules, "cupy_backends", None)
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs", None)
    assert _cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "CuPy is not installed" in text and "NVRTC:      not found" in text


def test_kernel_families_cover_exactly_the_shipped_variants():
    for arch in _tiles.ARCHES:
        families = _cli.kernel_families(arch, _tiles.SMEM_LIMIT[arch])
        listed = {(f.name, f.target) for files in families.values() for f in files}
        shipped = {(v.kernel_file, arch + v.arch_suffix) for v in _tiles.shipped_variants(arch)}
        assert listed == shipped
        assert ("wgmma" in families) == (arch in _tiles.WGMMA_ARCHES)


def test_head_dim_buckets_read_as_head_dim_ranges():
    assert _cli._head_dim_ranges(_tiles.HEAD_DIM_BUCKETS) == "1-256"
    assert _cli._head_dim_ranges({32, 64, 96, 128, 224, 256}) == "1-128, 193-256"
    assert _cli._head_dim_ranges({64, 160}) == "33-64, 129-160"


@pytest.mark.parametrize("text, arch", [("sm_90", "sm_90"), ("sm_90a", "sm_90"), ("90", "sm_90"), ("8.6", "sm_86")])
def test_arch_spellings(text, arch):
    assert _cli.normalize_arch(text) == arch


def test_prebuild_rejects_an_unknown_arch(cache, capsys):
    assert _cli.main(["prebuild", "sm_12x"]) == 2
    assert "arch='sm_12x'" in capsys.readouterr().err
    assert _cli.main(["prebuild", "sm_61"]) == 2  # Pascal: below every kernel family
    assert "sm_61" in capsys.readouterr().err


@no_gpu
def test_prebuild_without_an_arch_and_without_a_gpu_asks_for_one(cache):
    with pytest.raises(SystemExit, match="name one or more"):
        _cli.main(["prebuild"])


@needs_nvrtc
def test_prebuild_compiles_into_the_cache_then_finds_it_there(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUFLASH_CACHE_DIR", str(tmp_path / "unused"))  # --cache-dir replaces it; restored after
    folder = tmp_path / "carried"
    argv = ["prebuild", "sm_80", "--limit", "2", "--jobs", "2", "--cache-dir", str(folder), "--no-progress"]
    assert _cli.main(argv) == 0
    first = capsys.readouterr().out
    cubins = sorted(folder.glob("*.cubin"))
    assert len(cubins) == 2 and all(p.read_bytes()[:4] == b"\x7fELF" for p in cubins)
    assert "2 compiled" in first and "0 failed" in first and "flash_" in first
    assert _cli.main(argv) == 0
    again = capsys.readouterr().out.strip().splitlines()[-1]
    assert "0 compiled" in again and "2 already cached" in again


def test_scripts_prebuild_keeps_its_old_arguments():
    script = Path(__file__).resolve().parent.parent / "scripts" / "prebuild"
    if not script.is_file():
        pytest.skip("scripts/ is not part of an installed package")
    namespace: dict = {"__name__": "prebuild_script", "__file__": str(script)}
    saved = sys.path[:]
    try:
        exec(compile(script.read_text(), str(script), "exec"), namespace)
    finally:
        sys.path[:] = saved
    translate = namespace["translate"]
    assert translate(["sm_90", "16"]) == ["prebuild", "sm_90", "--jobs", "16"]
    assert translate(["sm_80", "--limit", "3"]) == ["prebuild", "sm_80", "--limit", "3"]
    assert translate([]) == ["prebuild", "sm_90"]


def test_cache_clear_removes_only_what_cuflash_wrote(cache, capsys):
    cache.mkdir(parents=True)
    ours = ["flash_fwd-x-sm_90-abc.cubin", "flash_fwd-x-sm_90-abc.log", "flash_fwd-x-sm_90-abc.tmp123.456"]
    for name in ours:
        (cache / name).write_bytes(b"x" * 10)
    (cache / "notes.txt").write_text("not ours")
    assert _cli.main(["cache", "clear"]) == 0
    out = capsys.readouterr().out
    assert str(cache) in out and "removed 3 files" in out
    assert [p.name for p in cache.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_prebuild_limit_below_one_is_refused_before_anything_compiles(cache, capsys, limit):
    """--limit -1 sliced the variant list to all but one and compiled those."""
    assert _cli.main(["prebuild", "sm_80", "--limit", limit, "--no-progress"]) == 2
    assert f"--limit={limit} must be at least 1" in capsys.readouterr().err
    assert not cache.exists()
    with pytest.raises(ValueError, match=r"limit=-1 must be an int >= 1 or None"):
        _cli.prebuild(["sm_80"], 1, -1, progress=False)


@pytest.mark.parametrize("argv", [["cache", "show"], ["cache", "clear"], ["prebuild", "sm_80", "--no-progress"]])
def test_a_file_in_place_of_the_cache_folder_is_named(cache, capsys, argv):
    cache.write_text("not a folder")
    assert _cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{cache} is not a folder" in err and "0 cubins" not in err
    assert cache.read_text() == "not a folder"


def test_info_says_the_cache_folder_is_a_file(cache, capsys):
    cache.write_text("not a folder")
    assert _cli.main(["info"]) == 0
    assert f"cache:      {cache} ($CUFLASH_CACHE_DIR): not a folder" in capsys.readouterr().out


@pytest.mark.parametrize("argv, bad", [(["--head-dims", "0"], "[0]"), (["--head-dims", "-64"], "[-64]"),
                                       (["--head-dims", "48"], "[48]"), (["--seqlens", "0"], "[0]")])
def test_bench_names_bad_arguments_before_looking_for_a_gpu(monkeypatch, capsys, argv, bad):
    def no_search():
        raise AssertionError("bench looked for a GPU before checking its arguments")

    monkeypatch.setattr(_cli, "find_gpus", no_search)
    assert _cli.main(["bench", "--quick", *argv]) == 2
    err = capsys.readouterr().err
    assert f"got {bad}" in err and "no CUDA GPU" not in err


@no_gpu
def test_bench_without_a_gpu_fails_with_a_clear_message(capsys):
    assert _cli.main(["bench", "--quick"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_ratio_table_divides_the_anchor_time_by_cuflash_time():
    flops = _cli.attention_flops(4, 16, 4096, 128, True, "fwd")
    assert flops == 4.0 * 4 * 16 * 4096 * 4096 * 128 * 0.5
    rows = [dict(head_dim=128, seqlen=4096, causal=True, mode="fwd", flops=flops,
                 ms={"cuflash": 2.0, "FA2": 3.0, "cuDNN": 1.0, "mem-eff": None})]
    _, line = _cli.ratio_table(rows)
    cells = line.split()
    assert cells[:4] == ["128", "4096", "yes", "fwd"]
    assert math.isclose(float(cells[4]), flops / 2.0 / 1e9, rel_tol=0.01)
    assert cells[5:] == ["1.50", "0.50", "n/a"]


@needs_nvrtc
def test_a_compile_logs_one_line_naming_the_variant_and_its_time(cache, caplog):
    variant = _tiles.forward_variant(np.dtype(np.float16), 32, False, _tiles.SMEM_LIMIT["sm_80"])[0]
    with caplog.at_level(logging.INFO, logger="cuflash"):
        _build.build(variant, "sm_80")
        _build.build(variant, "sm_80")  # cached: no second line
    lines = [r.getMessage() for r in caplog.records if r.name == "cuflash"]
    assert len(lines) == 1 and variant.tag in lines[0] and "sm_80" in lines[0] and " s" in lines[0]


def test_the_library_is_silent_by_default():
    code = "import logging, cuflash; print(logging.getLogger('cuflash').getEffectiveLevel() > logging.INFO)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "True", res.stderr


@pytest.mark.gpu
def test_info_lists_this_machines_gpus(capsys):
    assert _cli.main(["info"]) == 0
    text = capsys.readouterr().out
    for gpu in _cli.find_gpus()[0]:
        assert f"cuda:{gpu.index} {gpu.name}: compute capability {gpu.major}.{gpu.minor}" in text


@pytest.mark.gpu
def test_bench_quick_times_checked_kernels_against_sdpa(capsys):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA build of PyTorch")
    assert _cli.main(["bench", "--quick", "--head-dims", "64", "--seqlens", "1024"]) == 0
    out = capsys.readouterr().out
    assert out.count(": max error / max |ref| = ") == 2 and "FAILED" not in out
    rows = [line.split() for line in out.splitlines() if line.split()[:2] == ["64", "1024"]]
    assert len(rows) == 4  # causal and not, fwd and fwd+bwd
    for cells in rows:
        tflops = float(cells[4])
        assert 1.0 < tflops < 5000.0
        ratios = [float(c) for c in cells[5:] if c != "n/a"]
        assert ratios and all(0.01 < r < 100.0 for r in ratios)


@pytest.mark.parametrize("major,minor,family", [(7, 5, "pre-Ampere"), (7, 0, "pre-Ampere"), (8, 6, "mma.sync"),
                                                (9, 0, "wgmma")])
def test_info_lists_the_families_of_a_turing_volta_ampere_or_hopper_gpu(monkeypatch, cache, capsys, major, minor,
                                                                       family):
    gpu = _cli.Gpu(index=0, name="Test GPU", major=major, minor=minor, memory_bytes=16 * 2**30,
                   smem_optin=_tiles.SMEM_LIMIT[f"sm_{major}{minor}"])
    monkeypatch.setattr(_cli, "find_gpus", lambda: ([gpu], ""))
    assert _cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"cuda:0 Test GPU: compute capability {major}.{minor}" in text
    if nvrtc_available and major == 7 and minor == 0 and _build.nvrtc_version()[0] >= 13:
        assert "cannot build for sm_70" in text and "cuflash[cuda12]" in text
    else:
        assert "not supported" not in text
        assert _cli._FAMILY_TITLES[family] in text


def test_info_says_why_a_gpu_older_than_volta_cannot_run(monkeypatch, cache, capsys):
    gpu = _cli.Gpu(index=0, name="Old GPU", major=6, minor=1, memory_bytes=8 * 2**30, smem_optin=49152)
    monkeypatch.setattr(_cli, "find_gpus", lambda: ([gpu], ""))
    assert _cli.main(["info"]) == 0
    assert "not supported: cuflash's kernels need compute capability 7.0 or newer" in capsys.readouterr().out


@needs_nvrtc
def test_info_sends_a_volta_gpu_to_the_cuda12_extra_under_nvrtc_13(monkeypatch, cache, capsys):
    gpu = _cli.Gpu(index=0, name="Volta", major=7, minor=0, memory_bytes=16 * 2**30, smem_optin=98304)
    monkeypatch.setattr(_cli, "find_gpus", lambda: ([gpu], ""))
    monkeypatch.setattr(_build, "nvrtc_version", lambda: (13, 0))
    assert _cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "not supported: NVRTC 13.0 cannot build for sm_70" in text and "cuflash[cuda12]" in text


def test_compile_report_renders_the_compile_checks_json(tmp_path):
    data = {
        "flash_fwd_head_dim64_x": {"seconds": 1.0, "kernels": {"cuflash_fwd": {"registers": 200, "stack": 0,
                                                                               "spill_stores": 0}}},
        "flash_bwd_head_dim128_y": {"seconds": 2.0, "kernels": {"cuflash_bwd_dkdv": {"registers": 255, "stack": 40,
                                                                                    "spill_stores": 24}}},
        "flash_bwd_head_dim256_z": {"seconds": 3.0, "kernels": {"cuflash_bwd_dkdv": {"registers": 254, "stack": 8,
                                                                                    "spill_stores": 8}}},
    }
    path = tmp_path / "compile-sm_75.json"
    path.write_text(json.dumps(data))
    script = Path(__file__).resolve().parent.parent / "scripts" / "compile-report"
    if not script.is_file():
        pytest.skip("scripts/ is not part of an installed package")
    res = subprocess.run([sys.executable, str(script), str(path), "--commit", "abc1234"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "| compile-sm_75.json (sm_75) | 3 | 2 | 1 | 255 |" in res.stdout
    assert "| flash_bwd_head_dim128_y | cuflash_bwd_dkdv | 255 | 40 | 24 **spills** |" in res.stdout
    assert "commit abc1234" in res.stdout
