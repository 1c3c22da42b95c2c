"""TMA tensor maps (Hopper) for the warp-specialised forward (flash_fwd_ws_sm90.cu).

A tensor map is the driver's 128-byte description of a strided tensor and of the box one
copy moves; the kernel takes one for each of Q, K and V by value (`TmaDesc`, tma.cuh).
Every map here is 4-D, innermost first: (head dim, rows, heads, batch), with the
caller's own byte strides, so any layout whose strides are whole 16-byte multiples works
without a copy. A packed (varlen) batch is one batch entry of `total` rows; the kernel
adds each sequence's first row to its row coordinate. The box is 64 columns (128 bytes,
the swizzle span) by a tile of rows, and the copy lands it in the 128-byte swizzle that
sm90.cuh's wgmma descriptors read.

`map_shape` is the arithmetic (checked on the CPU by tests/test_tma.py); `encode` hands it
to `cuTensorMapEncodeTiled` through NVIDIA's cuda-bindings. Maps embed the tensor's
address, so `ForwardMaps` rebuilds them when a call's pointers differ (a few recent sets
are kept: a training step alternates between a handful of buffers).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import threading
from typing import Any

import numpy as np

DESCRIPTOR_BYTES = 128
BOX_COLS = 64  # 128 bytes of 16-bit elements: the 128-byte swizzle's row
_MAX_STRIDE = 2**40
_MAX_DIM = 2**32
_MAX_BOX = 256
DESCRIPTOR = np.dtype((np.void, DESCRIPTOR_BYTES))


@dataclasses.dataclass(frozen=True)
class MapShape:
    """What `cuTensorMapEncodeTiled` takes besides the address, innermost dimension first."""

    dims: tuple[int, int, int, int]  # (head_dim, rows, heads, batch) in elements
    strides: tuple[int, int, int]  # bytes between rows, heads, batch entries
    box: tuple[int, int, int, int]  # (64, box_rows, 1, 1)
    itemsize: int


def map_shape(shape: tuple[int, ...], strides: tuple[int, int, int], itemsize: int, layout: str, varlen: bool,
              box_rows: int) -> MapShape | None:
    """The map of a q/k/v-shaped array with `shape` and (batch, row, head) `strides` in
    elements (`_params.qkv_strides`), or None when TMA cannot read it: a stride that is not
    a positive multiple of 16 bytes (or reaches 2^40 bytes), a row of head_dim elements
    that is not whole 16-byte vectors, or a dimension past 2^32. A dimension of size 1 is
    never stepped along, so its stride is replaced by a valid one."""
    if itemsize != 2 or not 0 < box_rows <= _MAX_BOX:
        return None
    if varlen:
        rows, heads, head_dim = shape
        batch = 1
    elif layout == "bhsd":
        batch, heads, rows, head_dim = shape
    else:
        batch, rows, heads, head_dim = shape
    batch_stride, row_stride, head_stride = strides
    sizes = (rows, heads, batch)
    byte_strides = [s * itemsize for s in (row_stride, head_stride, batch_stride)]
    stepped = [b for b, n in zip(byte_strides, sizes) if n > 1]
    fallback = max(stepped, default=16)
    byte_strides = [b if n > 1 else fallback for b, n in zip(byte_strides, sizes)]
    if (head_dim * itemsize) % 16 or min(sizes + (head_dim,)) < 1 or max(sizes + (head_dim,)) > _MAX_DIM:
        return None
    if any(b <= 0 or b % 16 or b >= _MAX_STRIDE for b in byte_strides):
        return None
    return MapShape((head_dim, rows, heads, batch), tuple(byte_strides), (BOX_COLS, box_rows, 1, 1), itemsize)


def encode(shape: MapShape, address: int, bf16: bool) -> np.ndarray:
    """The 128-byte descriptor of `shape` at `address` (16-byte aligned), as a kernel
    argument (an opaque 128-byte scalar). Needs a driver."""
    from cuda.bindings import driver

    if address % 16:
        raise ValueError(f"address={address:#x} must be 16-byte aligned for TMA")
    dtype = driver.CUtensorMapDataType
    err, tmap = driver.cuTensorMapEncodeTiled(
        dtype.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 if bf16 else dtype.CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        4,
        address,
        [driver.cuuint64_t(n) for n in shape.dims],
        [driver.cuuint64_t(s) for s in shape.strides],
        [driver.cuuint32_t(n) for n in shape.box],
        [driver.cuuint32_t(1)] * 4,
        driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        # NONE fills elements outside the tensor with zeros (the other choice fills NaN).
        driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
    )
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed ({err}) for {shape} at {address:#x}")
    return np.frombuffer(ctypes.string_at(tmap.getPtr(), DESCRIPTOR_BYTES), dtype=DESCRIPTOR)[0]


class ForwardMaps:
    """The Q, K and V maps of one planned forward, rebuilt for each new set of pointers
    (read from the Params record the launch passes)."""

    _KEEP = 4

    def __init__(self, shapes: tuple[MapShape, MapShape, MapShape], bf16: bool, pointer_slots: tuple[int, int, int]):
        self.shapes = shapes
        self.bf16 = bf16
        self.pointer_slots = pointer_slots  # 8-byte word index of q, k, v in the record
        self._recent: dict[tuple[int, int, int], tuple[np.ndarray, ...]] = {}
        self._lock = threading.Lock()

    def arguments(self, argument: np.ndarray) -> tuple[np.ndarray, ...] | None:
        """The descriptors for the record `argument` (as `_params.as_argument` gives it),
        or None when a pointer is not 16-byte aligned (TMA cannot read it)."""
        words = argument.view(np.uint64)
        pointers = tuple(int(words[i]) for i in self.pointer_slots)
        found = self._recent.get(pointers)
        if found is None:
            if any(ptr % 16 for ptr in pointers):
                return None
            found = tuple(encode(s, ptr, self.bf16) for s, ptr in zip(self.shapes, pointers))
            with self._lock:  # plans are shared between threads
                while len(self._recent) >= self._KEEP:
                    self._recent.pop(next(iter(self._recent)))
                self._recent[pointers] = found
        return found


@functools.cache
def available() -> bool:
    """Whether tensor maps can be encoded here (NVIDIA's cuda-bindings, in the cuda12 and
    cuda13 extras). Without it the wgmma kernel serves every Hopper forward."""
    try:
        from cuda.bindings import driver  # noqa: F401
    except ImportError:
        return False
    return True


def forward_maps(views: Any, layout: str, varlen: bool, block_m: int, block_n: int, record_dtype: np.dtype,
                 qkv_strides: Any) -> ForwardMaps | None:
    """Maps for q (block_m-row boxes), k and v (block_n-row boxes), or None when any of
    them cannot be read by TMA (the caller then plans another kernel)."""
    if not available():
        return None
    shapes = []
    for name, rows in (("q", block_m), ("k", block_n), ("v", block_n)):
        a = getattr(views, name)
        if int(a.data.ptr) % 16:
            return None
        shape = map_shape(tuple(a.shape), qkv_strides(a), a.itemsize, layout, varlen, rows)
        if shape is None:
            return None
        shapes.append(shape)
    from ._interop import BFLOAT16

    slots = tuple(record_dtype.fields[name][1] // 8 for name in ("q", "k", "v"))
    return ForwardMaps(tuple(shapes), np.dtype(views.q.dtype) == BFLOAT16, slots)
