"""The kernels' parameter block: a NumPy record laid out exactly like `struct Params`.

The record type and the flag bits are read from cuda_src/params.h (one `TYPE NAME;` per
line, 8-byte fields first; `#define CF_NAME value`), so the two sides cannot drift apart;
tests/test_build.py checks every offset against a C compiler. `fill` is the one function
that turns a call into a Params record.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import numpy as np

from ._build import source_dir
from ._interop import BFLOAT16
from ._options import Options
from ._validate import Dims

_C_TYPES = {
    "cf_i64": np.int64,
    "cf_u64": np.uint64,
    "cf_u32": np.uint32,
    "int": np.int32,
    "float": np.float32,
}

def _defines(text: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"#define CF_(\w+) (\d+)", text)}


_HEADER = (source_dir() / "params.h").read_text()
# Params::flags bits and Params::aligned bits, as params.h defines them.
FLAGS = {name: bit for name, bit in _defines(_HEADER).items() if not name.startswith("ALIGN_")}
_ALIGN_NAMES = {"Q": "q", "K": "k", "V": "v", "O": "out", "DO": "dout", "DQ": "dq", "DK": "dk", "DV": "dv"}
ALIGN_BITS = {
    _ALIGN_NAMES[name[len("ALIGN_"):]]: bit for name, bit in _defines(_HEADER).items() if name.startswith("ALIGN_")
}


def _parse_fields(text: str, struct: str = "Params") -> list[tuple[str, Any]]:
    """The (name, NumPy type) fields of `struct NAME { ... };` in a header's text."""
    opening = f"struct {struct} {{"
    body = text[text.index(opening) : text.index("};", text.index(opening))]
    fields = []
    for line in body.splitlines()[1:]:
        line = line.split("//")[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(const\s+)?([\w ]+?)\s*(\*)?\s*(\w+);", line)
        if not m:
            raise ValueError(f"params.h: cannot parse field line {line!r}")
        ctype, pointer, name = m.group(2).strip(), m.group(3), m.group(4)
        fields.append((name, np.uint64 if pointer else _C_TYPES[ctype]))
    return fields


@functools.lru_cache(maxsize=None)
def params_dtype() -> np.dtype:
    return np.dtype(_parse_fields(_HEADER), align=True)


@dataclasses.dataclass
class Views:
    """Device views (CuPy arrays) of one call's tensors; None where absent."""

    q: Any
    k: Any
    v: Any
    out: Any
    lse: Any
    dout: Any = None
    dq: Any = None
    dk: Any = None
    dv: Any = None
    bias: Any = None
    mask: Any = None
    alibi: Any = None
    cu_seqlens_q: Any = None
    cu_seqlens_k: Any = None
    rng_state: Any = None
    dq_accum: Any = None
    dsum: Any = None
    lse_log2: Any = None
    dbias_full: Any = None
    block_sparse: Any = None  # a cuflash.block_sparse.BlockSparse of CuPy arrays


def _ptr(a: Any) -> int:
    return 0 if a is None else int(a.data.ptr)


def _elem_strides(a: Any) -> tuple[int, ...]:
    return tuple(s // a.itemsize for s in a.strides)


def qkv_strides(a: Any, opts: Options, varlen: bool) -> tuple[int, int, int]:
    """(batch, row, head) strides in elements of a q/k/v-shaped array."""
    s = _elem_strides(a)
    if varlen:
        return 0, s[0], s[1]
    if opts.layout == "bhsd":
        return s[0], s[2], s[1]
    return s[0], s[1], s[2]


def _vector_rows(a: Any, opts: Options, varlen: bool, head_dim: int) -> bool:
    """Whether `a`'s rows are whole 16-byte vectors apart (its pointer aside)."""
    if a is None:
        return False
    vector = 16 // a.itemsize
    return head_dim % vector == 0 and all(st % vector == 0 for st in qkv_strides(a, opts, varlen))


def _aligned(a: Any, opts: Options, varlen: bool, head_dim: int) -> bool:
    return _vector_rows(a, opts, varlen, head_dim) and _ptr(a) % 16 == 0


def broadcast_strides(a: Any, target_ndim: int = 4) -> tuple[int, ...]:
    """Strides (elements) of `a` broadcast, NumPy-style, to `target_ndim` dimensions."""
    s = _elem_strides(a)
    shape = tuple(a.shape)
    pad = target_ndim - len(shape)
    out = [0] * pad
    for size, stride in zip(shape, s):
        out.append(0 if size == 1 else stride)
    return tuple(out)


def window_limits(opts: Options, dims: Dims) -> tuple[int, int]:
    """(left, right) with -1 = unbounded and causal folded into right = 0. Limits wider
    than any distance between a query and a key are unbounded too (keeps the kernels'
    arithmetic small); global positions (position_offsets) widen those distances."""
    left, right = opts.window_size
    if opts.causal:
        right = 0
    span = dims.seqlen_q + dims.seqlen_k + abs(opts.position_offsets[0] - opts.position_offsets[1])
    if left > span:
        left = -1
    if right > span:
        right = -1
    return left, right


def dropout_threshold(p: float) -> int:
    return min(int(math.floor(p * 4294967296.0)), 2**32 - 1)


def is_general(opts: Options) -> bool:
    """Whether the call needs the kernels compiled with score modifiers."""
    return (
        opts.softcap > 0
        or opts.alibi_slopes is not None
        or opts.bias is not None
        or opts.mask is not None
        or opts.dropout_p > 0
    )


class _Record(dict):
    """Field values by name; unset fields are 0. Becomes the NumPy record in one step
    (assigning ~80 fields of a structured scalar one by one costs tens of microseconds)."""

    def pack(self) -> np.ndarray:
        dtype = params_dtype()
        return np.array(tuple(self.get(name, 0) for name in dtype.names), dtype=dtype)


def fill(views: Views, opts: Options, dims: Dims, *, dq_atomic: bool = False, want_dbias: bool = False) -> np.ndarray:
    """The Params record (a 0-d structured array) for one call (forward or backward)."""
    p = _Record()
    varlen = dims.varlen
    for name in ("q", "k", "v", "dout", "bias", "mask", "alibi", "cu_seqlens_q", "cu_seqlens_k", "rng_state", "out", "lse",
                 "dq", "dk", "dv", "dq_accum", "dsum", "lse_log2", "dbias_full"):
        p[name] = _ptr(getattr(views, name))
    for prefix, a in (("q", views.q), ("k", views.k), ("v", views.v), ("o", views.out), ("do", views.dout),
                      ("dq", views.dq), ("dk", views.dk), ("dv", views.dv)):
        if a is not None:
            p[f"{prefix}_batch_stride"], p[f"{prefix}_row_stride"], p[f"{prefix}_head_stride"] = qkv_strides(a, opts, varlen)
    if views.lse is not None:
        s = _elem_strides(views.lse)
        p["lse_batch_stride"], p["lse_head_stride"] = (0, s[0]) if varlen else (s[0], s[1])
    if varlen:
        p["ws_batch_stride"], p["ws_head_stride"] = 0, dims.total_q
    else:
        p["ws_batch_stride"], p["ws_head_stride"] = dims.num_heads * dims.seqlen_q, dims.seqlen_q

    flags = 0
    if views.bias is not None:
        flags |= FLAGS["HAS_BIAS"]
        dt = np.dtype(views.bias.dtype)
        flags |= FLAGS["BIAS_IS_F32"] if dt == np.float32 else FLAGS["BIAS_IS_BF16"] if dt == BFLOAT16 else FLAGS["BIAS_IS_F16"]
        (p["bias_batch_stride"], p["bias_head_stride"], p["bias_row_stride"], p["bias_col_stride"]) = broadcast_strides(views.bias)
    if views.mask is not None:
        flags |= FLAGS["HAS_MASK"]
        (p["mask_batch_stride"], p["mask_head_stride"], p["mask_row_stride"], p["mask_col_stride"]) = broadcast_strides(views.mask)
    if views.alibi is not None:
        flags |= FLAGS["HAS_ALIBI"]
        p["alibi_batch_stride"] = dims.num_heads if views.alibi.ndim == 2 else 0
    if views.dbias_full is not None:
        s = _elem_strides(views.dbias_full)
        p["dbias_batch_stride"], p["dbias_head_stride"], p["dbias_row_stride"] = s[0], s[1], s[2]
    if opts.softcap > 0:
        flags |= FLAGS["HAS_SOFTCAP"]
    if opts.dropout_p > 0:
        flags |= FLAGS["HAS_DROPOUT"]
    if varlen:
        flags |= FLAGS["IS_VARLEN"]
    if dq_atomic:
        flags |= FLAGS["DQ_ATOMIC"]
    if want_dbias:
        flags |= FLAGS["WANT_DBIAS"]
    p["flags"] = flags
    bs = views.block_sparse
    if bs is not None:
        for name, a in bs.arrays().items():
            p[f"bs_{name}"] = _ptr(a)
        p["bs_batches"], p["bs_heads"], p["bs_q_blocks"], p["bs_k_blocks"] = bs.shape
        p["bs_block_q"], p["bs_block_k"] = bs.block_size

    aligned = 0
    for name, bit in ALIGN_BITS.items():
        if _aligned(getattr(views, name), opts, varlen, dims.head_dim):
            aligned |= bit
    p["aligned"] = aligned

    scale = opts.scale_for(dims.head_dim)
    left, right = window_limits(opts, dims)
    p["seed"] = 0 if opts.seed is None else int(opts.seed)
    p["batch"], p["num_heads"], p["num_heads_kv"], p["head_dim"] = dims.batch, dims.num_heads, dims.num_heads_kv, dims.head_dim
    p["seqlen_q"], p["seqlen_k"] = dims.seqlen_q, dims.seqlen_k
    p["window_left"], p["window_right"] = left, right
    p["bottom_right"] = int(opts.causal_alignment == "bottom_right")
    p["q_position"], p["k_position"] = opts.position_offsets
    p["softmax_scale"] = scale
    p["scale_log2"] = scale * math.log2(math.e)
    p["softcap"] = opts.softcap
    if opts.dropout_p > 0:
        p["dropout_scale"] = 1.0 / (1.0 - opts.dropout_p)
        p["dropout_threshold"] = dropout_threshold(opts.dropout_p)
    return p


def pack(p: dict) -> np.ndarray:
    return _Record(p).pack()


def as_argument(record: np.ndarray) -> np.ndarray:
    """The record as a kernel argument: one opaque element of the struct's size. (CuPy
    passes a one-element array by value through its __array_interface__, which for the
    structured dtype spells out every field: ~45 us per launch.)"""
    return record.reshape(1).view(np.dtype((np.void, record.dtype.itemsize)))


class Repointer:
    """A filled record, reusable for calls that differ only in their data pointers (and
    dropout seed): every other field is a function of shapes, strides, dtypes and options.

    `names` are the Views fields a call supplies, in the order `__call__` takes their
    pointers. The `aligned` bits are recomputed from each call's pointers, exactly as
    `fill` computes them (the rows' vector layout is fixed by the strides)."""

    def __init__(self, record: np.ndarray, views: Views, names: tuple[str, ...], opts: Options, dims: Dims):
        dtype = record.dtype
        self._opaque = np.dtype((np.void, dtype.itemsize))
        # Work on the record's 8-byte words: copying a structured array field by field
        # costs ~16 us, a plain word array ~0.2 us.
        self._words = record.reshape(1).view(np.uint64).copy()
        self._slots = np.array([dtype.fields[name][1] // 8 for name in names], dtype=np.intp)
        self._seed_slot = dtype.fields["seed"][1] // 8
        self._aligned_slot = dtype.fields["aligned"][1] // 4
        self._align_bits = tuple(
            (i, ALIGN_BITS[name]) for i, name in enumerate(names)
            if name in ALIGN_BITS and _vector_rows(getattr(views, name), opts, dims.varlen, dims.head_dim)
        )

    def __call__(self, pointers: list[int], seed: int) -> np.ndarray:
        """The record for these pointers, as `as_argument` gives it: one opaque element
        (a kernel argument passed by value)."""
        words = self._words.copy()
        words[self._slots] = pointers
        words[self._seed_slot] = seed
        aligned = 0
        for i, bit in self._align_bits:
            if pointers[i] % 16 == 0:
                aligned |= bit
        words.view(np.int32)[self._aligned_slot] = aligned
        return words.view(self._opaque)
