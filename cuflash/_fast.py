"""Repeat calls at the cost of their launches: a plan cached per call signature.

The full path (DLPack import, validation, the Params record, the variant choice) costs
100-200 us of Python per call, more than the kernels of a small problem take. Training
calls attention with the same shapes, strides, dtypes and options step after step, so a
call reuses what the first such call worked out: the kernels with their grids, and the
Params record with every field but the data pointers and the dropout seed filled in. A
repeat call allocates its outputs, writes its pointers into a copy of the record and
launches, on the caller's current stream like the full path.

The signature holds everything validation and the record read except the pointers: the
array type, each array's shape, strides, dtype and device, the scalar options with their
types, and any tile choice forced for tuning. Pointer alignment (vector or element loads)
is worked out per call. Only PyTorch tensors and CuPy arrays with no array-valued option
(bias, mask, ALiBi slopes, cu_seqlens) take this path, and only once a call with the same
signature succeeded on the full path, so every error is still raised there.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable

import numpy as np

from . import _tiles

_MAX_PLANS = 512


@dataclasses.dataclass(frozen=True)
class _Library:
    """How the fast path reads and allocates one array library's arrays."""

    name: str
    signature: Callable[[Any], tuple]  # (shape, strides, dtype, device, on_gpu)
    pointer: Callable[[Any], int]
    stream: Callable[[int], Any]  # the CuPy stream to launch on (the caller's current)
    dtype: Callable[[np.dtype], Any]  # the library's dtype for a NumPy one


_libraries: dict[type, _Library | None] = {}
_by_name: dict[str, _Library] = {}
_streams: dict[tuple[int, int], Any] = {}
_lock = threading.Lock()


def _torch_library() -> _Library:
    import cupy
    import torch

    from ._interop import _StreamHandle, _torch_dtype

    # The current stream's raw handle without building a torch.cuda.Stream object (what
    # inductor's generated code reads); the public spelling where a build lacks it.
    raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)

    def stream(index: int) -> Any:
        ptr = raw_stream(index) if raw_stream is not None else torch.cuda.current_stream(index).cuda_stream
        found = _streams.get((index, ptr))
        if found is None:
            found = cupy.cuda.Stream.from_external(_StreamHandle(ptr))
            with _lock:
                _streams[(index, ptr)] = found
        return found

    return _Library(
        name="torch",
        signature=lambda t: (t.shape, t.stride(), t.dtype, t.device, t.is_cuda),
        pointer=lambda t: t.data_ptr(),
        stream=stream,
        dtype=_torch_dtype,
    )


def _cupy_library() -> _Library:
    import cupy

    return _Library(
        name="cupy",
        signature=lambda a: (a.shape, a.strides, a.dtype, a.device.id, True),
        pointer=lambda a: a.data.ptr,
        stream=lambda index: cupy.cuda.get_current_stream(),
        dtype=np.dtype,
    )


def _library_of(kind: type) -> _Library | None:
    if kind in _libraries:
        return _libraries[kind]
    found = None
    module = kind.__module__.split(".")[0]
    try:
        if module == "torch":
            import torch

            if kind is torch.Tensor:
                found = _torch_library()
        elif module == "cupy":
            import cupy

            if kind is cupy.ndarray:
                found = _cupy_library()
    except ImportError:  # pragma: no cover - the array's own library is importable
        found = None
    _libraries[kind] = found
    if found is not None:
        _by_name[found.name] = found
    return found


def empty(library: str, like: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """A new contiguous array of the caller's library on `like`'s device (CuPy: the
    current one, which `run` makes `like`'s)."""
    if library == "torch":
        return like.new_empty(shape, dtype=dtype)
    import cupy

    return cupy.empty(shape, dtype=dtype)


def signature(kind: str, arrays: tuple, options: tuple, seed: Any) -> tuple | None:
    """The cache key of a call, or None when the call must take the full path."""
    if not (seed is None or (type(seed) is int and 0 <= seed < 2**64)):
        return None
    first = type(arrays[0])
    library = _library_of(first)
    if library is None:
        return None
    metas = []
    for a in arrays:
        if type(a) is not first:
            return None
        meta = library.signature(a)
        if not meta[-1]:  # host arrays take the reference path
            return None
        metas.append(meta)
    # Not hashed here: `run` and `remember` hash it once each, and treat an unhashable
    # option value (which the full path then judges) as a call without a plan.
    return (kind, library.name, tuple(metas), options, tuple(map(type, options)), _tuning())


def _tuning() -> tuple | None:
    """Tile choices forced for tuning (benchmarks/tune.py), which change the launches."""
    if not _tiles.OVERRIDES and _tiles.WGMMA_ENABLED and _tiles.FWD_FAMILY == "ws" and not _tiles.WS_PERSISTENT:
        return None
    return tuple(_tiles.OVERRIDES.items()), _tiles.WGMMA_ENABLED, _tiles.FWD_FAMILY, _tiles.WS_PERSISTENT


@dataclasses.dataclass(frozen=True)
class _Entry:
    library: _Library
    device_index: int
    plan: Any  # _launch.Plan
    repoint: Any  # _params.Repointer
    outputs: tuple[tuple[tuple[int, ...], Any], ...]  # (shape, library dtype) per output
    returned: int  # how many of the outputs the call returns


_plans: dict[tuple, _Entry] = {}


def remember(key: tuple, plan: Any, views: Any, opts: Any, dims: Any, device_index: int, inputs: tuple[str, ...],
             outputs: tuple[tuple[str, tuple[int, ...], np.dtype], ...], returned: int) -> None:
    """Keep what the full path launched for calls with signature `key`. `inputs` and
    `outputs` name the Views fields the call supplies and allocates, in order."""
    try:
        hash(key)
    except TypeError:  # an unhashable option value: such calls always take the full path
        return
    from ._params import Repointer

    library = _by_name[key[1]]
    names = inputs + tuple(name for name, _, _ in outputs)
    entry = _Entry(
        library=library,
        device_index=device_index,
        plan=plan,
        repoint=Repointer(plan.record, views, names, opts, dims),
        outputs=tuple((tuple(shape), library.dtype(dtype)) for _, shape, dtype in outputs),
        returned=returned,
    )
    with _lock:
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        _plans[key] = entry


def run(key: tuple, arrays: tuple, seed: int | None) -> tuple | None:
    """Run a call whose signature has a plan; None when it has none yet."""
    try:
        entry = _plans.get(key)
    except TypeError:  # an unhashable option value
        return None
    if entry is None:
        return None
    import cupy

    library, index = entry.library, entry.device_index
    with cupy.cuda.Device(index):
        stream = library.stream(index)
        outs = [empty(library.name, arrays[0], shape, dtype) for shape, dtype in entry.outputs]
        pointers = [library.pointer(a) for a in arrays]
        pointers += [library.pointer(o) for o in outs]
        if not entry.plan.run(stream, entry.repoint(pointers, 0 if seed is None else seed)):
            return None  # pointers the planned kernel cannot read (TMA alignment): the full path plans again
    return tuple(outs[: entry.returned])


def clear() -> None:
    """Forget every plan (the next call of each signature takes the full path)."""
    with _lock:
        _plans.clear()
