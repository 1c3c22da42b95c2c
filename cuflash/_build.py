"""Run-time compilation of cuda_src/ with NVRTC, cached on disk under our own key.

CuPy's own kernel cache keys on the main source text only, so an edited header would
silently reuse a stale binary. Here the key hashes every file under cuda_src/, the
kernel file, the preprocessor defines, the options, the NVRTC version and the target
arch. Cubins live in $CUFLASH_CACHE_DIR (default: ~/.cache/cuflash) and are loaded with
`cupy.RawModule(path=...)`. Compiling needs NVRTC only, not a GPU: the compile check and
the prebuild script use `compile_variant` on machines without one.

The cache is shared by every process of a user and survives crashes, full disks and
concurrent builds: each cubin is written to a temporary file and renamed into place (a
reader sees no file or a whole one), next to a record of its size and SHA-256 written the
same way before it. A cached cubin that does not match its record (truncated, corrupt, or
left without one) is rebuilt with a warning; a cache folder that cannot be written falls
back, with a warning, to a new private folder under the system's temporary directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

_OPTIONS = ("-std=c++17", "--ptxas-options=-v")
_log = logging.getLogger("cuflash")


def source_dir() -> Path:
    """cuda_src/ inside an installed wheel (cuflash/cuda_src), else the checkout's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "cuda_src", here.parent / "cuda_src"):
        if (candidate / "params.h").is_file():
            return candidate
    raise FileNotFoundError(f"cuflash: cuda_src/ not found next to {here} (broken install?)")


def cache_dir() -> Path:
    env = os.environ.get("CUFLASH_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cuflash"


def nvrtc_version() -> tuple[int, int]:
    from cupy_backends.cuda.libs import nvrtc

    return tuple(nvrtc.getVersion())


_sources_lock = threading.Lock()
_sources_cache: dict[Path, tuple[dict[str, str], str]] = {}


def _sources() -> tuple[dict[str, str], str]:
    """All files of cuda_src/ and the hash of their names and contents."""
    root = source_dir()
    with _sources_lock:
        if root not in _sources_cache:
            files = {
                p.name: p.read_text()
                for p in sorted(root.iterdir())
                if p.suffix in (".h", ".cuh", ".cu")
            }
            digest = hashlib.sha256()
            for name, text in files.items():
                digest.update(name.encode() + b"\0" + text.encode() + b"\0")
            _sources_cache[root] = (files, digest.hexdigest())
        return _sources_cache[root]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled module: a kernel file and the defines that specialise it."""

    kernel_file: str  # e.g. "flash_fwd.cu"
    defines: tuple[tuple[str, int], ...]
    arch_suffix: str = ""  # "a": architecture-specific features (sm_90a's wgmma), that GPU only

    @property
    def tag(self) -> str:
        return f"{self.kernel_file.split('.')[0]}-" + "-".join(f"{k.replace('CF_', '').lower()}{v}" for k, v in self.defines)

    def with_defines(self, extra: tuple[tuple[str, int], ...]) -> Variant:
        return dataclasses.replace(self, defines=self.defines + extra)


@dataclasses.dataclass
class Compiled:
    cubin: bytes
    log: str
    seconds: float


class CompileError(RuntimeError):
    pass


def options_for(variant: Variant, arch: str) -> list[str]:
    return [f"--gpu-architecture={arch}{variant.arch_suffix}", *_OPTIONS, *(f"-D{k}={v}" for k, v in variant.defines)]


def cache_key(variant: Variant, arch: str) -> str:
    _, src_hash = _sources()
    digest = hashlib.sha256()
    for part in (src_hash, variant.kernel_file, repr(options_for(variant, arch)), repr(nvrtc_version()), arch):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:24]


# Cache folders found unwritable in this process, and the folder used instead of each.
_redirected: dict[Path, Path] = {}
_redirect_lock = threading.Lock()


def cubin_path(variant: Variant, arch: str) -> Path:
    folder = cache_dir()
    folder = _redirected.get(folder, folder)
    suffix = ".ptx" if arch.startswith("compute_") else ".cubin"
    return folder / f"{variant.tag}-{arch}-{cache_key(variant, arch)}{suffix}"


def _record_path(cubin: Path) -> Path:
    return cubin.with_suffix(".sha256")


def _record(data: bytes) -> str:
    return f"{hashlib.sha256(data).hexdigest()} {len(data)}\n"


def _cache_problem(path: Path) -> str | None:
    """None when `path` holds a whole cubin matching its record; "missing" when there is
    no cubin; otherwise what is wrong with it."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as exc:
        return f"unreadable: {exc}"
    try:
        record = _record_path(path).read_text()
    except OSError:
        return "no size and checksum record beside it"
    if record != _record(data):
        fields = record.split()
        if len(fields) == 2 and fields[1] != str(len(data)):
            return f"truncated or overwritten: {len(data)} bytes where the record says {fields[1]}"
        return "its SHA-256 does not match the record (corrupt)"
    if path.suffix == ".ptx":
        if b".version" not in data[:4096]:
            return "not PTX"
    elif not data.startswith(b"\x7fELF"):
        return "not an ELF file"
    return None


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that no reader ever sees part of it: a temporary file in
    the same folder, flushed to disk, then renamed over `path` (atomic on POSIX and NTFS)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _store(path: Path, compiled: Compiled) -> Path:
    """Put a freshly compiled cubin into the cache; returns where it went: `path`, or the
    same name in a temporary folder when the cache folder cannot be written."""
    try:
        _store_in(path, compiled)
        return path
    except OSError as exc:
        folder = path.parent
        with _redirect_lock:
            if folder in _redirected.values():
                raise  # the fallback itself failed: nowhere left to write
            first = folder not in _redirected
            if first:
                # Private to this process (mkdtemp: a new folder, mode 0700): a shared,
                # predictable name would let another user plant kernels in it.
                _redirected[folder] = Path(tempfile.mkdtemp(prefix="cuflash-cache-"))
            fallback = _redirected[folder]
        if first:
            warnings.warn(
                f"cuflash: cannot write the kernel cache folder {folder} ({exc}); compiled kernels go to "
                f"{fallback} in this process instead (set CUFLASH_CACHE_DIR to a writable folder to keep them)",
                RuntimeWarning,
                stacklevel=3,
            )
        moved = fallback / path.name
        _store_in(moved, compiled)
        return moved


def _store_in(path: Path, compiled: Compiled) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # The record first: a reader that finds the cubin finds its record too. Two processes
    # building the same variant write the same bytes (NVRTC is deterministic), so any
    # interleaving of their renames leaves a matching pair.
    _write_atomic(_record_path(path), _record(compiled.cubin).encode())
    _write_atomic(path, compiled.cubin)
    _write_atomic(path.with_suffix(".log"), compiled.log.encode())


def compile_variant(variant: Variant, arch: str) -> Compiled:
    """Compile with NVRTC (no GPU needed). Raises CompileError with the NVRTC log."""
    from cupy_backends.cuda.libs import nvrtc

    if volta_unsupported(arch):
        raise CompileError(
            f"NVRTC {'.'.join(map(str, nvrtc_version()))} cannot target {arch}: CUDA 13 dropped Volta "
            "(compute capability 7.0/7.2); install cuflash with the cuda12 extra (NVRTC 12) for a V100"
        )
    files, _ = _sources()
    headers = [text.encode() for name, text in files.items() if name != variant.kernel_file]
    names = [name.encode() for name in files if name != variant.kernel_file]
    start = time.perf_counter()
    prog = nvrtc.createProgram(files[variant.kernel_file], variant.kernel_file, headers, names)
    try:
        try:
            nvrtc.compileProgram(prog, options_for(variant, arch))
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(prog)
            raise CompileError(f"NVRTC failed to compile {variant.tag} for {arch}:\n{log}") from exc
        log = nvrtc.getProgramLog(prog)
        # A compute_XX target is PTX, which the driver compiles for the GPU at load time (the
        # pre-Ampere families are tested that way on newer GPUs); sm_XX is machine code.
        cubin = _ptx_bytes(nvrtc.getPTX(prog)) if arch.startswith("compute_") else nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return Compiled(cubin=cubin, log=log, seconds=time.perf_counter() - start)


def _ptx_bytes(ptx: Any) -> bytes:
    return ptx if isinstance(ptx, bytes) else ptx.encode()


# CUFLASH_PTX_DIR: a folder of PTX built elsewhere (`prebuilt_ptx_name`), loaded as
# it is for a compute_XX target (scripts/build-ptx writes it). How an architecture this
# NVRTC cannot target (Volta under CUDA 13) still runs, as PTX, on a newer GPU.
PTX_DIR_ENV = "CUFLASH_PTX_DIR"


def prebuilt_ptx_name(variant: Variant, arch: str) -> str:
    """The file name of a variant's PTX in a CUFLASH_PTX_DIR: keyed on the sources and the
    options (not the NVRTC version, which is the point), so PTX of other sources is never
    taken for these."""
    _, src_hash = _sources()
    digest = hashlib.sha256()
    for part in (src_hash, variant.kernel_file, repr(options_for(variant, arch)), arch):
        digest.update(part.encode() + b"\0")
    return f"{variant.tag}-{arch}-{digest.hexdigest()[:16]}.ptx"


def prebuilt_ptx(variant: Variant, arch: str) -> Path | None:
    folder = os.environ.get(PTX_DIR_ENV)
    if not folder:
        return None
    path = Path(folder) / prebuilt_ptx_name(variant, arch)
    return path if path.is_file() else None


def volta_unsupported(arch: str) -> bool:
    """Whether this NVRTC cannot build for `arch` (CUDA 13 removed compute capability 7.0/7.2)."""
    number = int(arch.split("_")[1].rstrip("a"))
    return number < 75 and nvrtc_version()[0] >= 13


def compile_job(job: tuple[Variant, str]) -> tuple[str, str, float | None, str]:
    """(variant, arch) -> (tag, arch, seconds or None on failure, NVRTC log or error).
    A top-level function, so process pools can run it (a crashing ptxas then takes down
    a worker, not the caller)."""
    variant, arch = job
    try:
        compiled = compile_variant(variant, arch)
    except CompileError as exc:
        return variant.tag, arch, None, str(exc)
    return variant.tag, arch, compiled.seconds, compiled.log


def build(variant: Variant, arch: str) -> tuple[Path, float]:
    """The cached cubin for (variant, arch), compiling it on first use.

    Returns (path, seconds spent compiling now; 0.0 on a cache hit)."""
    if arch.startswith("compute_"):
        given = prebuilt_ptx(variant, arch)
        if given is not None:
            return given, 0.0
    path = cubin_path(variant, arch)
    problem = _cache_problem(path)
    if problem is None:
        return path, 0.0
    if problem != "missing":
        warnings.warn(f"cuflash: cached kernel {path} is damaged ({problem}); rebuilding it",
                      RuntimeWarning, stacklevel=2)
    compiled = compile_variant(variant, arch)
    _log.info("compiled kernel variant %s for %s in %.1f s", variant.tag, arch, compiled.seconds)
    path = _store(path, compiled)
    return path, compiled.seconds


# ---- loading (needs a GPU) ---------------------------------------------------------------

_modules_lock = threading.Lock()
_modules: dict[tuple[Variant, str, int], Any] = {}
STATS = {"compiled": 0, "compile_seconds": 0.0, "loaded": 0, "load_seconds": 0.0}


_arches: dict[int, str] = {}


def arch_of(device_index: int) -> str:
    arch = _arches.get(device_index)
    if arch is None:
        arch = _arches[device_index] = _query_arch(device_index)
    return arch


# CUFLASH_ARCH=compute_75 (or compute_70) builds every kernel as PTX for that architecture,
# which the driver compiles for the GPU at hand: how the Turing and Volta families run, and
# are tested, on newer GPUs. Tile choices then follow that architecture's shared memory.
ARCH_ENV = "CUFLASH_ARCH"


def _query_arch(device_index: int) -> str:
    import cupy

    cc = cupy.cuda.Device(device_index).compute_capability  # e.g. "90"
    forced = os.environ.get(ARCH_ENV)
    if forced:
        number = forced.split("_")[-1]
        if not (forced.startswith(("sm_", "compute_")) and number.isdigit() and 70 <= int(number) <= int(cc)):
            raise RuntimeError(
                f"{ARCH_ENV}={forced!r} must be sm_XX or compute_XX with 70 <= XX <= this GPU's {cc} "
                f"(cuda:{device_index})"
            )
        return forced
    if int(cc) < 70:
        raise RuntimeError(
            f"cuflash needs a GPU of compute capability 7.0 or newer (Volta, Turing, Ampere, Ada, Hopper, ...); "
            f"cuda:{device_index} has {cc[:-1]}.{cc[-1]}"
        )
    return f"sm_{cc}"


def module(variant: Variant, device_index: int) -> Any:
    """The loaded cupy.RawModule for variant on a device (compiled and cached on demand)."""
    arch = arch_of(device_index)
    key = (variant, arch, device_index)
    with _modules_lock:
        mod = _modules.get(key)
        if mod is not None:
            return mod
        import cupy

        path, seconds = build(variant, arch)
        if seconds:
            STATS["compiled"] += 1
            STATS["compile_seconds"] += seconds
        start = time.perf_counter()
        with cupy.cuda.Device(device_index):
            mod = cupy.RawModule(path=str(path))
        STATS["loaded"] += 1
        STATS["load_seconds"] += time.perf_counter() - start
        _modules[key] = mod
        return mod
