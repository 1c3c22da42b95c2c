"""The `cuflash` command (also `python -m cuflash`).

    cuflash info                       what cuflash sees: GPUs, driver, NVRTC, CuPy, cache, kernel families
    cuflash prebuild [ARCH ...]        compile every shipped kernel variant into the cache (no GPU needed)
    cuflash bench --quick              a one-minute comparison with PyTorch SDPA's backends on this GPU
    cuflash cache clear                delete the compiled kernels

Everything here reads the same tables the library plans with (`_tiles`, `_build`), so what
`info` and `prebuild` report is what a call would use. Nothing here needs a GPU except
`bench`, and nothing needs a driver except the GPU listing.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from . import __version__, _build, _tiles

# ---- what this machine has ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    major: int
    minor: int
    memory_bytes: int
    smem_optin: int

    @property
    def arch(self) -> str:
        return f"sm_{self.major}{self.minor}"


def find_gpus() -> tuple[list[Gpu], str]:
    """The CUDA GPUs CuPy sees, or ([], why there are none)."""
    try:
        import cupy
    except ImportError:
        return [], "CuPy is not installed (pip install 'cuflash[cuda12]' or 'cuflash[cuda13]')"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no driver, or a driver too old for this CuPy
        return [], f"no usable CUDA driver ({_one_line(exc)})"
    if count == 0:
        return [], "the CUDA driver reports no GPU"
    gpus = []
    for index in range(count):
        props = cupy.cuda.runtime.getDeviceProperties(index)
        name = props["name"]
        gpus.append(
            Gpu(
                index=index,
                name=name.decode() if isinstance(name, bytes) else str(name),
                major=int(props["major"]),
                minor=int(props["minor"]),
                memory_bytes=int(props["totalGlobalMem"]),
                smem_optin=int(props.get("sharedMemPerBlockOptin", 0)),
            )
        )
    return gpus, ""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _cuda_version(code: int) -> str:
    return f"{code // 1000}.{code % 1000 // 10}"


def _driver_version() -> str:
    try:
        import cupy

        code = cupy.cuda.runtime.driverGetVersion()
    except Exception as exc:  # noqa: BLE001
        return f"none ({_one_line(exc)})"
    return "none (no libcuda on this machine)" if code == 0 else f"supports CUDA {_cuda_version(code)}"


def _nvrtc() -> str:
    try:
        version = ".".join(map(str, _build.nvrtc_version()))
    except Exception as exc:  # noqa: BLE001 - no CuPy, or no libnvrtc
        return f"not found ({_one_line(exc)}): kernels cannot compile; install the cuda12 or cuda13 extra"
    where = ""
    try:
        from cuda import pathfinder

        where = f" ({pathfinder.load_nvidia_dynamic_lib('nvrtc').abs_path})"
    except Exception:  # noqa: BLE001 - older CuPy without cuda-pathfinder: the version is enough
        pass
    return version + where


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cupy_version() -> str:
    try:
        import cupy
    except ImportError as exc:
        return f"absent ({_one_line(exc)})"
    return cupy.__version__


@dataclasses.dataclass
class CacheSummary:
    folder: Path
    cubins: int
    bytes: int


def cache_summary() -> CacheSummary:
    folder = _build.cache_dir()
    cubins = size = 0
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.is_file():
                size += entry.stat().st_size
                cubins += entry.suffix == ".cubin"
    return CacheSummary(folder, cubins, size)


def _not_a_folder(folder: Path) -> str | None:
    """Why `folder` cannot be the cache: something other than a folder holds its name."""
    if folder.exists() and not folder.is_dir():
        return (f"{folder} is not a folder (a file holds its name); point CUFLASH_CACHE_DIR (or --cache-dir) "
                "at a folder")
    return None


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


# ---- kernel families, read from the tile table -------------------------------------------------


@dataclasses.dataclass
class KernelFile:
    """One kernel file of a family and what it serves on one GPU."""

    name: str
    target: str  # the --gpu-architecture it is compiled for
    roles: set[str] = dataclasses.field(default_factory=set)
    dtypes: set[str] = dataclasses.field(default_factory=set)
    buckets: set[int] = dataclasses.field(default_factory=set)
    modifiers: set[bool] = dataclasses.field(default_factory=set)


def _head_dim_ranges(buckets: Iterable[int]) -> str:
    """Head-dim buckets as the head dims they serve: {32, 64, 224, 256} -> "1-64, 193-256"."""
    ranges: list[list[int]] = []
    previous = 0
    for bucket in _tiles.HEAD_DIM_BUCKETS:
        if bucket in buckets:
            if ranges and ranges[-1][1] == previous:
                ranges[-1][1] = bucket
            else:
                ranges.append([previous + 1, bucket])
        previous = bucket
    return ", ".join(f"{lo}-{hi}" for lo, hi in ranges)


def kernel_families(arch: str, smem_limit: int) -> dict[str, list[KernelFile]]:
    """family name -> the kernel files that serve some call on `arch`, found by planning
    every (dtype, head-dim bucket, score modifiers?) the way a call does."""
    files: dict[tuple[str, str], KernelFile] = {}
    family_of: dict[tuple[str, str], str] = {}

    def serve(variant: _build.Variant, tiles: _tiles.Tiles, role: str, dtype, bucket: int, general: bool) -> None:
        target = f"{arch}{variant.arch_suffix}"
        key = (variant.kernel_file, target)
        entry = files.setdefault(key, KernelFile(variant.kernel_file, target))
        family_of[key] = ("wgmma + TMA, warp-specialised" if variant.kernel_file == _tiles.WS_FWD_FILE
                          else "KV cache (split-KV)" if variant.kernel_file == "flash_decode.cu"
                          else "wgmma" if tiles.wgmma
                          else "mma.sync" if _tiles.bf16_supported(arch) else "pre-Ampere")
        entry.roles.add(role)
        entry.dtypes.add(np.dtype(dtype).name)
        entry.buckets.add(bucket)
        entry.modifiers.add(general)

    if _tiles.bf16_supported(arch):
        from . import _decode_tiles

        for dtype in _decode_tiles.DTYPES:
            for bucket in _tiles.HEAD_DIM_BUCKETS:
                variant, tiles, _ = _decode_tiles.decode_variant(dtype, bucket, smem_limit)
                serve(variant, tiles, "attention over a KV cache", dtype, bucket, False)
    for dtype in _tiles.ELEM_CODE:
        if not _tiles.bf16_supported(arch) and dtype == _tiles.BFLOAT16:
            continue  # no bf16 tensor cores before Ampere
        for bucket in _tiles.HEAD_DIM_BUCKETS:
            for general in (False, True):
                variant, tiles, _ = _tiles.forward_variant(dtype, bucket, general, smem_limit, arch)
                serve(variant, tiles, "forward", dtype, bucket, general)
                ws, ws_tiles, _ = _tiles.forward_variant(dtype, bucket, general, smem_limit, arch, tma=True)
                if ws != variant:
                    serve(ws, ws_tiles, "forward", dtype, bucket, general)
                try:
                    plan = _tiles.backward_variant(dtype, bucket, general, smem_limit, arch)
                except _tiles.UnsupportedConfig:
                    continue
                if plan.dkdv_variant is None:
                    serve(plan.variant, plan.dkdv, "backward", dtype, bucket, general)
                else:
                    serve(plan.variant, plan.dq, "backward (preprocess, dQ)", dtype, bucket, general)
                    serve(plan.dkdv_variant, plan.dkdv, "backward (dK/dV)", dtype, bucket, general)
    families: dict[str, list[KernelFile]] = {}
    for key, entry in sorted(files.items(), key=lambda item: ("forward" not in item[1].roles, item[0])):
        families.setdefault(family_of[key], []).append(entry)
    return dict(sorted(families.items(), key=lambda item: item[0] != "mma.sync"))


_FAMILY_TITLES = {
    "mma.sync": "mma.sync tensor-core kernels (portable: compute capability 8.0 and newer)",
    "wgmma": "warpgroup MMA (wgmma) kernels (Hopper: this architecture only)",
    "pre-Ampere": "the portable kernels over pre-Ampere primitives (Turing: m16n8k8; Volta: FMA units)",
}


def _describe_families(families: dict[str, list[KernelFile]], indent: str) -> list[str]:
    lines = []
    for family, entries in families.items():
        lines.append(f"{indent}{_FAMILY_TITLES.get(family, family)}")
        for e in entries:
            modifiers = {
                frozenset({False}): "no score modifiers",
                frozenset({True}): "score modifiers only",
            }.get(frozenset(e.modifiers), "with or without score modifiers")
            roles = " + ".join(sorted(e.roles, key=lambda r: (not r.startswith("forward"), r)))
            if {"backward", "backward (preprocess, dQ)"} <= e.roles:
                roles = "backward (beside a wgmma dK/dV kernel: its preprocess and dQ)"
            dtypes = ", ".join(d for d in ("float16", "bfloat16", "float32") if d in e.dtypes)
            lines.append(
                f"{indent}  {e.name} ({e.target}): {roles}; {dtypes}; head dims {_head_dim_ranges(e.buckets)}; {modifiers}"
            )
    return lines


def _smem_limit(gpu: Gpu) -> int:
    return gpu.smem_optin or _tiles.SMEM_LIMIT.get(gpu.arch, 0)


# ---- cuflash info ----------------------------------------------------------------------------


def _unsupported(gpu: Gpu) -> str | None:
    """Why no kernel can run on `gpu` with this installation, or None (the same rules as a
    call's: compute capability 7.0 and newer; Volta needs an NVRTC that still targets it)."""
    if gpu.major < 7:
        return "cuflash's kernels need compute capability 7.0 or newer (Volta, Turing, Ampere and later)"
    try:
        blocked = _build.volta_unsupported(gpu.arch)
    except Exception:  # noqa: BLE001 - no NVRTC at all: the NVRTC line above says so
        return None
    if blocked:
        version = ".".join(map(str, _build.nvrtc_version()))
        return (f"NVRTC {version} cannot build for {gpu.arch} (CUDA 13 removed compute capability "
                f"{gpu.major}.{gpu.minor}); install the cuda12 extra: pip install 'cuflash[cuda12]'")
    return None


def info(args: argparse.Namespace) -> int:
    out = []
    package = Path(__file__).resolve().parent
    out.append(f"cuflash {__version__} ({package}); Python {sys.version.split()[0]}")
    out.append(f"CuPy:       {_cupy_version()}")
    out.append(f"NVRTC:      {_nvrtc()}")
    out.append(f"driver:     {_driver_version()}")
    for name, label in (("torch", "PyTorch"), ("jax", "JAX")):
        version = _package_version(name)
        out.append(f"{label + ':':<11} {version or 'absent (optional)'}")
    cache = cache_summary()
    state = f"{cache.cubins} cubins, {_megabytes(cache.bytes)}" if cache.folder.is_dir() else "empty (not created yet)"
    if _not_a_folder(cache.folder):
        state = "not a folder (a file holds its name): kernels cannot be cached there"
    source = "$CUFLASH_CACHE_DIR" if os.environ.get("CUFLASH_CACHE_DIR") else "default; set CUFLASH_CACHE_DIR to move it"
    out.append(f"cache:      {cache.folder} ({source}): {state}")
    gpus, why = find_gpus()
    if not gpus:
        out.append(f"GPUs:       no GPU: {why}")
        out.append("            CUDA arrays need a GPU; NumPy (and CPU PyTorch/JAX) arrays take the float64 reference path.")
        out.append("kernel families per architecture (kernels compile here all the same: `cuflash prebuild ARCH`):")
        for arch in _tiles.ARCHES:
            out.append(f"  {arch}:")
            out.extend(_describe_families(kernel_families(arch, _tiles.SMEM_LIMIT[arch]), "    "))
    else:
        out.append(f"GPUs:       {len(gpus)}")
        for gpu in gpus:
            out.append(
                f"  cuda:{gpu.index} {gpu.name}: compute capability {gpu.major}.{gpu.minor} ({gpu.arch}), "
                f"{gpu.memory_bytes / 2**30:.0f} GiB, {gpu.smem_optin // 1024} KB shared memory per block"
            )
            problem = _unsupported(gpu)
            if problem:
                out.append(f"    not supported: {problem}")
                continue
            out.extend(_describe_families(kernel_families(gpu.arch, _smem_limit(gpu)), "    "))
    print("\n".join(out))
    return 0


# ---- cuflash prebuild ------------------------------------------------------------------------


@dataclasses.dataclass
class Built:
    variant: _build.Variant
    arch: str
    seconds: float | None  # None: failed; 0.0: it was already in the cache
    error: str = ""


def _build_one(job: tuple[_build.Variant, str]) -> Built:
    """Compile one (variant, arch) into the cache. Top level, so process pools can run it: a
    crashing ptxas then takes down a worker, not the command."""
    variant, arch = job
    try:
        _, seconds = _build.build(variant, arch)
    except _build.CompileError as exc:
        return Built(variant, arch, None, str(exc))
    return Built(variant, arch, seconds)


def normalize_arch(text: str) -> str:
    """"sm_90", "sm_90a", "90", "9.0" -> "sm_90" (a variant that needs the "a" features
    carries the suffix itself)."""
    t = text.strip().lower()
    t = t.removeprefix("sm_").rstrip("a").replace(".", "")
    if not t.isdigit():
        raise ValueError(f"arch={text!r} must look like sm_90 (or 90, 9.0)")
    return f"sm_{t}"


def prebuild(
    arches: Sequence[str],
    jobs: int,
    limit: int | None = None,
    progress: bool = True,
    report: Callable[[str], None] = print,
) -> list[Built]:
    """Compile every shipped variant for each arch into the cache, `jobs` at a time. Returns
    one Built per variant (seconds 0.0 for one already cached)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    from tqdm import tqdm

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} must be an int >= 1 or None (every variant)")
    results: list[Built] = []
    pending = []
    for arch in arches:
        variants = _tiles.shipped_variants(arch)
        if limit is not None:
            variants = variants[:limit]
        for variant in variants:
            if _build.cubin_path(variant, arch).is_file():
                results.append(Built(variant, arch, 0.0))
            else:
                pending.append((variant, arch))
    if not pending:
        return results
    # Spawned workers: a caller may hold threads (JAX's) that a fork would copy mid-flight.
    context = multiprocessing.get_context("spawn")
    bar = tqdm(total=len(pending), unit="variant", desc="compiling", disable=not progress, dynamic_ncols=True)
    with ProcessPoolExecutor(max_workers=max(1, min(jobs, len(pending))), mp_context=context) as pool:
        futures = {pool.submit(_build_one, job): job for job in pending}
        for future in as_completed(futures):
            variant, arch = futures[future]
            try:
                built = future.result()
            except BrokenProcessPool as exc:
                built = Built(variant, arch, None, f"the compiler process died ({_one_line(exc)}); "
                                                   "NVRTC's ptxas can take a process down on some inputs")
            bar.set_postfix_str(f"{built.variant.kernel_file} {arch}{built.variant.arch_suffix}", refresh=False)
            bar.update()
            if built.seconds is None:
                bar.write(f"FAILED {built.variant.tag} for {arch}")
            results.append(built)
    bar.close()
    return results


def prebuild_summary(results: list[Built], wall: float, jobs: int) -> list[str]:
    """Per arch and kernel file: variants, compiled now, cached before, failed, compile time."""
    rows: dict[tuple[str, str], list[Built]] = {}
    for b in results:
        rows.setdefault((b.arch, f"{b.variant.kernel_file}{' (' + b.arch + b.variant.arch_suffix + ')' if b.variant.arch_suffix else ''}"), []).append(b)
    header = ("arch", "kernel file", "variants", "compiled", "cached", "failed", "compile s", "slowest s")
    table = []
    for (arch, name), built in sorted(rows.items()):
        compiled = [b.seconds for b in built if b.seconds]
        table.append((arch, name, len(built), len(compiled), sum(b.seconds == 0.0 for b in built),
                      sum(b.seconds is None for b in built), f"{sum(compiled):.1f}", f"{max(compiled, default=0):.1f}"))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in (header, *table)]
    compiled = [b.seconds for b in results if b.seconds]
    failed = sum(b.seconds is None for b in results)
    try:
        nvrtc = ".".join(map(str, _build.nvrtc_version()))
    except Exception:  # noqa: BLE001
        nvrtc = "?"
    lines.append(
        f"{len(results)} variants into {_build.cache_dir()} (NVRTC {nvrtc}): {len(compiled)} compiled "
        f"({sum(compiled):.0f} s of compile time, {wall:.0f} s wall with {jobs} jobs), "
        f"{sum(b.seconds == 0.0 for b in results)} already cached, {failed} failed"
    )
    return lines


def _default_arches() -> list[str]:
    gpus, why = find_gpus()
    if not gpus:
        raise SystemExit(
            f"cuflash prebuild: no GPU here ({why}), so there is no default architecture; name one or more, "
            f"e.g. `cuflash prebuild sm_90` (NVRTC compiles without a GPU; known: {', '.join(_tiles.SMEM_LIMIT)})"
        )
    return sorted({g.arch for g in gpus if g.major >= 8})


def prebuild_command(args: argparse.Namespace) -> int:
    # The arguments first, before anything looks for a GPU or NVRTC.
    if args.jobs < 1:
        print(f"cuflash prebuild: --jobs={args.jobs} must be at least 1", file=sys.stderr)
        return 2
    if args.limit is not None and args.limit < 1:
        print(f"cuflash prebuild: --limit={args.limit} must be at least 1 (leave it out to compile every variant)",
              file=sys.stderr)
        return 2
    if args.cache_dir:
        os.environ["CUFLASH_CACHE_DIR"] = str(Path(args.cache_dir).resolve())  # the workers inherit it
    problem = _not_a_folder(_build.cache_dir())
    if problem:
        print(f"cuflash prebuild: {problem}", file=sys.stderr)
        return 2
    try:
        arches = [normalize_arch(a) for a in args.arch] or _default_arches()
    except ValueError as exc:
        print(f"cuflash prebuild: {exc}", file=sys.stderr)
        return 2
    unknown = [a for a in arches if a not in _tiles.SMEM_LIMIT]
    if unknown:
        print(
            f"cuflash prebuild: no shared-memory budget on record for {', '.join(unknown)} "
            f"(known: {', '.join(_tiles.SMEM_LIMIT)}); kernels for it still compile on first use",
            file=sys.stderr,
        )
        return 2
    try:
        _build.nvrtc_version()
    except Exception as exc:  # noqa: BLE001
        print(f"cuflash prebuild: NVRTC not found ({_one_line(exc)}); install the cuda12 or cuda13 extra", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = prebuild(arches, args.jobs, args.limit, progress=not args.no_progress)
    wall = time.perf_counter() - start
    print("\n".join(prebuild_summary(results, wall, args.jobs)))
    failures = [b for b in results if b.seconds is None]
    for b in failures:
        print(f"\n{b.variant.tag} for {b.arch}:\n{b.error[:4000]}", file=sys.stderr)
    return 1 if failures else 0


# ---- cuflash cache ---------------------------------------------------------------------------


def _is_cache_file(path: Path) -> bool:
    """What cuflash writes into its cache: cubins, their ptxas logs, and temporaries of an
    interrupted write. Nothing else in the folder is touched (it may be shared)."""
    if not path.is_file():
        return False
    return path.suffix in (".cubin", ".log") or any(s.startswith(".tmp") for s in path.suffixes)


def cache_command(args: argparse.Namespace) -> int:
    folder = _build.cache_dir()
    problem = _not_a_folder(folder)
    if problem:
        print(f"cuflash cache {args.action}: {problem}", file=sys.stderr)
        return 2
    if args.action == "clear":
        removed = size = 0
        if folder.is_dir():
            for entry in sorted(folder.iterdir()):
                if _is_cache_file(entry):
                    size += entry.stat().st_size
                    entry.unlink()
                    removed += 1
        print(f"cleared {folder}: removed {removed} files ({_megabytes(size)})")
        return 0
    cache = cache_summary()
    print(f"{cache.folder}: {cache.cubins} cubins, {_megabytes(cache.bytes)}")
    return 0


# ---- cuflash bench --quick -------------------------------------------------------------------

QUICK_HEAD_DIMS = (64, 128)
QUICK_SEQLENS = (1024, 4096)
TOKENS = 16384  # batch x seqlen, as in benchmarks/bench.py's grid
HIDDEN = 2048  # heads x head_dim
CHECK_TOLERANCE = 0.05  # max |err| / max |ref| against float64, bf16 (benchmarks/bench.py's)
MODE_FLOPS = {"fwd": 1.0, "fwd+bwd": 3.5}
SDPA_BACKENDS = (("FA2", "FLASH_ATTENTION"), ("cuDNN", "CUDNN_ATTENTION"), ("mem-eff", "EFFICIENT_ATTENTION"))


def attention_flops(batch: int, heads: int, seqlen: int, head_dim: int, causal: bool, mode: str) -> float:
    """4·B·H·N²·d for the forward (two products), halved when causal; fwd+bwd 3.5x."""
    return 4.0 * batch * heads * seqlen * seqlen * head_dim * (0.5 if causal else 1.0) * MODE_FLOPS[mode]


def ratio_table(rows: list[dict[str, Any]]) -> list[str]:
    """rows: {head_dim, seqlen, causal, mode, ms: {system: float | None | str}} -> text table of
    cuflash TFLOP/s and cuflash's speed over each SDPA backend (above 1: cuflash is faster)."""
    header = ["d", "seqlen", "causal", "mode", "cuflash TFLOP/s"] + [f"x {name}" for name, _ in SDPA_BACKENDS]
    table = []
    for r in rows:
        mine = r["ms"].get("cuflash")
        cells = [str(r["head_dim"]), str(r["seqlen"]), "yes" if r["causal"] else "no", r["mode"]]
        if not isinstance(mine, float):
            cells.append(mine if isinstance(mine, str) else "n/a")
            cells += ["" for _ in SDPA_BACKENDS]
        else:
            cells.append(f"{r['flops'] / mine / 1e9:.0f}")
            for name, _ in SDPA_BACKENDS:
                theirs = r["ms"].get(name)
                cells.append(f"{theirs / mine:.2f}" if isinstance(theirs, float) else "n/a")
        table.append(cells)
    widths = [max(len(x) for x in col) for col in zip(header, *table)]
    return ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in (header, *table)]


def _time_ms(torch, fn: Callable[[], Any], budget_ms: float = 120.0) -> float:
    """Median of per-call CUDA-event times, repeated to fill about budget_ms."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    estimate = max(start.elapsed_time(end), 1e-3)
    repeats = int(min(50, max(3, budget_ms / estimate)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for s, e in events:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return float(np.median([s.elapsed_time(e) for s, e in events]))


def _step(torch, attend: Callable, mode: str, q, k, v, dout) -> Callable[[], Any]:
    if mode == "fwd":
        return lambda: attend(q, k, v)
    return lambda: torch.autograd.grad(attend(q, k, v), (q, k, v), dout)


def check_against_float64(torch, causal: bool, head_dim: int, seed: int) -> float:
    """cuflash's output and gradients on a small bf16 problem against the float64 reference:
    the worst max|err| / max|ref| over out, dq, dk, dv."""
    import cuflash.torch as cft

    from . import reference

    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (1, 2, 257, head_dim)  # (batch, heads, seqlen, head_dim): SDPA's layout
    q, k, v, dout = (torch.randn(shape, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    out = cft.scaled_dot_product_attention(q, k, v, is_causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    host = [t.detach().float().cpu().numpy().astype(np.float64) for t in (q, k, v, dout)]
    opts = dict(causal=causal, causal_alignment="top_left", layout="bhsd")
    ref_out, ref_lse = reference.forward(*host[:3], **opts)
    refs = (ref_out, *reference.backward(host[3], *host[:3], ref_out, ref_lse, **opts)[:3])
    worst = 0.0
    for got, ref in zip((out, *grads), refs):
        got = got.detach().float().cpu().numpy().astype(np.float64)
        if not np.all(np.isfinite(got)):
            return math.inf
        worst = max(worst, float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-30)))
    return worst


def bench_command(args: argparse.Namespace) -> int:
    # The arguments first: a bad head dim is named as such on any machine, not hidden
    # behind "no GPU".
    head_dims = args.head_dims or QUICK_HEAD_DIMS
    seqlens = args.seqlens or QUICK_SEQLENS
    bad = [d for d in head_dims if d < 1 or HIDDEN % d] + [n for n in seqlens if n < 1 or TOKENS % n]
    if bad:
        print(f"cuflash bench: head dims must divide {HIDDEN} and seqlens {TOKENS}; got {bad}", file=sys.stderr)
        return 2
    gpus, why = find_gpus()
    if not gpus:
        print(f"cuflash bench: no CUDA GPU here ({why}); the benchmark times the kernels on a GPU "
              "(`cuflash info` says what cuflash sees)", file=sys.stderr)
        return 2
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as exc:
        print(f"cuflash bench: needs PyTorch with CUDA to compare against SDPA ({_one_line(exc)}); "
              "pip install 'cuflash[torch]'", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(f"cuflash bench: this PyTorch ({torch.__version__}) has no CUDA; install a CUDA build", file=sys.stderr)
        return 2
    import cuflash.torch as cft

    name = torch.cuda.get_device_name()
    print(f"cuflash {__version__} against PyTorch {torch.__version__} SDPA on {name}: bf16, "
          f"batch x seqlen = {TOKENS} tokens, heads x head_dim = {HIDDEN}")
    print("each cuflash configuration is checked against the float64 reference first; kernels compile on "
          "first use (`cuflash prebuild` does it ahead)", flush=True)
    started = time.perf_counter()
    rows = []
    failed_checks = []
    for head_dim in head_dims:
        for causal in (False, True):
            error = check_against_float64(torch, causal, head_dim, seed=head_dim * 2 + causal)
            passed = error <= CHECK_TOLERANCE
            print(f"  check d={head_dim} causal={causal}: max error / max |ref| = {error:.2e} "
                  f"({'ok' if passed else f'FAILED, above {CHECK_TOLERANCE}'})", flush=True)
            if not passed:
                failed_checks.append((head_dim, causal, error))
            for seqlen in seqlens:
                batch, heads = TOKENS // seqlen, HIDDEN // head_dim
                gen = torch.Generator(device="cuda").manual_seed(seqlen + head_dim)
                shape = (batch, heads, seqlen, head_dim)
                q, k, v, dout = (torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16)
                                 for _ in range(4))
                for t in (q, k, v):
                    t.requires_grad_(True)
                for mode in MODE_FLOPS:
                    ms: dict[str, Any] = {}
                    if passed:
                        ms["cuflash"] = _time_ms(torch, _step(
                            torch, lambda a, b, c, causal=causal: cft.scaled_dot_product_attention(a, b, c, is_causal=causal),
                            mode, q, k, v, dout))
                    else:
                        ms["cuflash"] = "check failed"
                    for label, backend in SDPA_BACKENDS:
                        chosen = getattr(SDPBackend, backend)

                        def sdpa(a, b, c, chosen=chosen, causal=causal):
                            with sdpa_kernel([chosen]):
                                return torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=causal)

                        try:
                            ms[label] = _time_ms(torch, _step(torch, sdpa, mode, q, k, v, dout))
                        except RuntimeError:  # this backend does not take the shape on this GPU
                            ms[label] = None
                    rows.append(dict(head_dim=head_dim, seqlen=seqlen, causal=causal, mode=mode, ms=ms,
                                     flops=attention_flops(batch, heads, seqlen, head_dim, causal, mode)))
                del q, k, v, dout
    print()
    print("\n".join(ratio_table(rows)))
    print(f"\nx BACKEND: cuflash's speed over SDPA with that backend forced (above 1: cuflash is faster); "
          f"n/a: not available for the shape on this GPU. {time.perf_counter() - started:.0f} s. "
          "The full benchmark is benchmarks/bench.py in a source checkout.")
    if failed_checks:
        print(f"cuflash bench: {len(failed_checks)} configuration(s) failed the float64 check and were not timed",
              file=sys.stderr)
        return 1
    return 0


# ---- the command line ------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cuflash",
        description="cuflash: exact FlashAttention kernels compiled at run time. "
        "Commands: info, prebuild, bench, cache.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show cuflash's log (a line per kernel compiled on first use)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    p = commands.add_parser("info", help="GPUs, driver, NVRTC, CuPy, the cache and the kernel families that serve each GPU")
    p.set_defaults(run=info)

    p = commands.add_parser(
        "prebuild",
        help="compile every shipped kernel variant into the cache (needs NVRTC, not a GPU)",
        description="Compile every kernel variant a call can reach on ARCH into the cache, in parallel. "
        "NVRTC needs no GPU: cubins for a GPU machine can be built anywhere with the NVRTC version that "
        "machine has (the cache key includes it) and carried there.",
    )
    p.add_argument("arch", nargs="*", help="target architectures, e.g. sm_80 sm_90 (default: this machine's GPUs)")
    p.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPU count)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N variants per arch (a quick check)")
    p.add_argument("--cache-dir", default=None, help="the cache folder (default: $CUFLASH_CACHE_DIR, else ~/.cache/cuflash)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=prebuild_command)

    p = commands.add_parser(
        "bench",
        help="a one-minute ratio table against PyTorch SDPA's backends on this GPU",
        description="Time cuflash against torch.nn.functional.scaled_dot_product_attention with each backend "
        "forced (FlashAttention-2, cuDNN, memory-efficient), bf16, forward and forward+backward, after "
        "checking each cuflash configuration against the float64 reference. Needs a GPU and PyTorch with CUDA.",
    )
    p.add_argument("--quick", action="store_true", help="the one-minute table (the only size here; the full "
                   "benchmark is benchmarks/bench.py in a source checkout)")
    p.add_argument("--head-dims", type=_int_list, default=None, help=f"comma-separated (default {QUICK_HEAD_DIMS})")
    p.add_argument("--seqlens", type=_int_list, default=None, help=f"comma-separated (default {QUICK_SEQLENS})")
    p.set_defaults(run=bench_command)

    p = commands.add_parser("cache", help="the compiled-kernel cache: `cache clear` empties it, `cache show` sizes it")
    p.add_argument("action", choices=("clear", "show"))
    p.set_defaults(run=cache_command)
    return parser


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated integers") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.verbose:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger = logging.getLogger("cuflash")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        return args.run(args)
    except BrokenPipeError:  # `cuflash info | head`: the reader left; say nothing more
        sys.stdout = open(os.devnull, "w")
        return 1
