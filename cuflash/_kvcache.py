"""Attention over a KV cache: `attention_with_kvcache`, FlashAttention-2's
`flash_attn_with_kvcache` for any DLPack array, and its float64 reference.

A call optionally appends new keys and values (rotary embedding applied to the keys) to
the cache at each sequence's length, in place, then attends q to every key of the
sequence, appended ones included:

    q        (batch, seqlen_q, heads, head_dim)
    k_cache  (batch_cache, seqlen_cache, heads_kv, head_dim), or paged:
             (num_pages, page_size, heads_kv, head_dim) with block_table (batch, max_pages)
    k, v     (batch, seqlen_new, heads_kv, head_dim), written to rows
             cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1 of sequence b
    keys     rows cache_leftpad[b] .. cache_seqlens[b] + seqlen_new - 1 of sequence b

Row r of sequence b lives in k_cache[cache_batch_idx[b], r] (contiguous) or in
k_cache[block_table[b, r // page_size], r % page_size] (paged). Causal masking and
windows are bottom-right aligned over the sequence's own keys (the last query sees the
last key). The rotary embedding turns new key i of sequence b by position
cache_seqlens[b] + i, and query i by position cache_seqlens[b] + i when causal or
windowed, else cache_seqlens[b] (FlashAttention-2's convention).

CUDA arrays (fp16, bf16) run the kernels of cuda_src/flash_decode.cu on the caller's
stream; host arrays take the float64 reference (`reference`) and write the appended rows
into the caller's cache as well. The data path is the one of `cuflash._api`: import
(zero-copy) -> validate (every reason, one error) -> record -> variant -> build -> launch.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any, Sequence

import numpy as np

from . import _build, _interop, _params
from ._decode_tiles import decode_variant
from ._interop import BFLOAT16, ArrayRef, Device, InteropError, dtype_name
from ._options import make_options, option_errors
from ._validate import MAX_HEAD_DIM, ValidationError, lists_valid_keywords

WHERE = "cuflash.attention_with_kvcache"
PAGE_MULTIPLE = 16
MAX_SPLITS = 128
_MAX_INT = 2**31 - 1

# ---- the parameter record ----------------------------------------------------------------

_HEADER = (_build.source_dir() / "decode_params.h").read_text()
FLAGS = {m[0]: int(m[1]) for m in __import__("re").findall(r"#define CFD_(\w+) (\d+)", _HEADER)}


def _record_dtype() -> np.dtype:
    return np.dtype(_params._parse_fields(_HEADER, "DecodeParams"), align=True)


RECORD = _record_dtype()

# ---- the float64 reference -------------------------------------------------------------


def _f64(a: Any) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, pos: np.ndarray, interleaved: bool) -> np.ndarray:
    """x (n, heads, d) turned by the rotary embedding at positions pos (n,); float64."""
    half = cos.shape[1]
    rd = 2 * half
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]
    out = x.copy()
    if interleaved:
        a, b = x[..., 0:rd:2], x[..., 1:rd:2]
        out[..., 0:rd:2] = a * c - b * s
        out[..., 1:rd:2] = a * s + b * c
    else:
        a, b = x[..., :half], x[..., half:rd]
        out[..., :half] = a * c - b * s
        out[..., half:rd] = a * s + b * c
    return out


def reference(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table=None, cache_batch_idx=None,
              cache_leftpad=None, rotary_cos=None, rotary_sin=None, rotary_interleaved=True, softmax_scale=None,
              causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, storage_dtype=None):
    """The KV-cache semantics in float64, on host arrays. Returns (out, lse, k_cache,
    v_cache): out (batch, seqlen_q, heads, head_dim), lse (batch, heads, seqlen_q) (-inf
    on rows with no key), and new float64 caches holding the appended rows (the inputs are
    not modified). With `storage_dtype`, the appended rows and the rotated queries are
    rounded to it, as a kernel storing them in that dtype does."""
    from . import reference as attention_reference

    q, kc, vc = _f64(q), _f64(k_cache).copy(), _f64(v_cache).copy()
    batch, seqlen_q = q.shape[:2]
    lens = np.broadcast_to(np.asarray(cache_seqlens, dtype=np.int64), (batch,))
    pads = np.zeros(batch, np.int64) if cache_leftpad is None else np.asarray(cache_leftpad, np.int64)
    rnd = (lambda a: a) if storage_dtype is None else (lambda a: a.astype(storage_dtype).astype(np.float64))
    paged = block_table is not None
    table = None if block_table is None else np.asarray(block_table, np.int64)
    entries = np.arange(batch) if cache_batch_idx is None else np.asarray(cache_batch_idx, np.int64)

    def where(b: int, rows: np.ndarray):
        if paged:
            ps = kc.shape[1]
            return table[b, rows // ps], rows % ps
        return np.full(rows.shape, entries[b]), rows

    rotary = rotary_cos is not None
    cos = _f64(rotary_cos) if rotary else None
    sin = _f64(rotary_sin) if rotary else None
    seqlen_new = 0
    if k is not None:
        kn, vn = _f64(k), _f64(v)
        seqlen_new = kn.shape[1]
        for b in range(batch):
            rows = lens[b] + np.arange(seqlen_new)
            keys = _rotate(kn[b], cos, sin, rows, rotary_interleaved) if rotary else kn[b]
            at = where(b, rows)
            kc[at] = rnd(keys)
            vc[at] = rnd(vn[b])
    if rotary:
        sequential = causal or tuple(window_size) != (-1, -1)
        q = np.stack([
            rnd(_rotate(q[b], cos, sin, lens[b] + (np.arange(seqlen_q) if sequential else np.zeros(seqlen_q, np.int64)),
                        rotary_interleaved))
            for b in range(batch)
        ]) if batch else q
    slopes = None if alibi_slopes is None else np.broadcast_to(_f64(alibi_slopes), (batch, q.shape[2]))
    outs, lses = [], []
    for b in range(batch):
        rows = np.arange(pads[b], lens[b] + seqlen_new)
        at = where(b, rows)
        out, lse = attention_reference.forward(
            q[b : b + 1], kc[at][None], vc[at][None], softmax_scale=softmax_scale, causal=causal,
            causal_alignment="bottom_right", window_size=tuple(window_size), softcap=softcap,
            alibi_slopes=None if slopes is None else slopes[b : b + 1],
        )
        outs.append(out[0])
        lses.append(lse[0])
    out = np.stack(outs) if outs else np.zeros(q.shape)
    lse = np.stack(lses) if lses else np.zeros((0, q.shape[2], seqlen_q))
    return out, lse, kc, vc


# ---- validation ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Problem:
    """One call's dimensions, after validation."""

    batch: int
    seqlen_q: int
    num_heads: int
    num_heads_kv: int
    head_dim: int
    seqlen_new: int
    capacity: int
    page_size: int  # 0: contiguous cache
    num_pages: int  # pages (paged) or cache batch entries (contiguous)
    rotary_dim: int
    seqlen_ro: int

    @property
    def group(self) -> int:
        return self.num_heads // self.num_heads_kv

    @property
    def rows_per_head(self) -> int:
        return self.group * self.seqlen_q


_ARRAYS = ("q", "k_cache", "v_cache", "k", "v", "cache_seqlens", "block_table", "cache_batch_idx", "cache_leftpad",
           "rotary_cos", "rotary_sin", "alibi_slopes")
_INDEX_ARRAYS = ("cache_seqlens", "block_table", "cache_batch_idx", "cache_leftpad")


def _host_values(ref: ArrayRef | None) -> np.ndarray | None:
    """An index array's values when they can be read without a device sync."""
    if ref is None or ref.device.kind != "cpu":
        return None
    return np.asarray(ref.view)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check(refs: dict[str, ArrayRef], scalars: dict[str, Any], on_host: bool) -> Problem:
    """Every problem with the arguments, in one ValidationError; the dimensions otherwise.
    Index arrays held on the host (cache_seqlens, block_table, cache_batch_idx,
    cache_leftpad) are also checked value by value: appends past the capacity, pages out of
    range, batch entries out of range. Device-resident ones are not read (that would need
    a sync): the kernels clamp what they read and never leave the cache."""
    reasons: list[str] = []
    r = refs
    q, kc, vc, kn, vn = r["q"], r["k_cache"], r["v_cache"], r.get("k"), r.get("v")
    opts = make_options(softmax_scale=scalars["softmax_scale"], causal=scalars["causal"],
                        window_size=scalars["window_size"], softcap=scalars["softcap"])
    reasons += option_errors(opts)
    for flag in ("rotary_interleaved", "return_lse"):
        if not isinstance(scalars.get(flag, False), (bool, np.bool_)):
            reasons.append(f"{flag}={scalars[flag]!r} must be a bool")
    num_splits = scalars["num_splits"]
    if not _is_int(num_splits) or not 0 <= num_splits <= MAX_SPLITS:
        reasons.append(f"num_splits={num_splits!r} must be an int in [0, {MAX_SPLITS}] (0: chosen from the GPU and the shape)")

    # Structure first: without it the shapes below cannot be read.
    structural = len(reasons)
    # One device; small index arrays may also come from the host for a GPU call.
    devices = {ref.device for name, ref in r.items() if not (name in _INDEX_ARRAYS and ref.device.kind == "cpu")}
    if len(devices) > 1:
        reasons.append("all arrays must be on one device; got " + ", ".join(f"{n} on {a.device}" for n, a in r.items()))
    for name in ("q", "k_cache", "v_cache", "k", "v"):
        a = r.get(name)
        if a is not None and a.view.ndim != 4:
            reasons.append(f"{name} must have 4 dimensions; got shape={a.shape}")
    if (kn is None) != (vn is None):
        reasons.append("k and v must be given together (new keys and values to append) or both be None")
    if len(reasons) > structural:
        raise ValidationError(WHERE, reasons, list(r.values()))

    batch, seqlen_q, heads, head_dim = q.shape
    paged = "block_table" in r
    n_entries, cache_rows, heads_kv, cache_dim = kc.shape

    # dtypes (a big-endian array is reported as such, not as an unsupported dtype)
    for name, a in r.items():
        if not a.dtype.isnative:
            native = a.dtype.newbyteorder("=")
            reasons.append(f"{name}.dtype={a.dtype.str!r} is {dtype_name(native)} in non-native (big-endian) byte "
                           f"order; cuflash reads the machine's byte order: pass {name}.astype({dtype_name(native)!r})")
    if any(not a.dtype.isnative for a in r.values()):
        raise ValidationError(WHERE, reasons, list(r.values()))
    floats = [a for a in (q, kc, vc, kn, vn) if a is not None]
    kernel_dtypes = tuple(d for d in (np.dtype(np.float16), BFLOAT16) if d is not None)
    allowed = kernel_dtypes + ((np.dtype(np.float32), np.dtype(np.float64)) if on_host else ())
    for a in floats:
        if a.dtype not in allowed:
            where = "on the host" if on_host else "on the GPU"
            reasons.append(f"{a.name}.dtype={dtype_name(a.dtype)} is not supported {where} (supported: "
                           + ", ".join(dtype_name(d) for d in allowed) + ")")
    if len({a.dtype for a in floats}) > 1:
        reasons.append("q, k_cache, v_cache (and k, v) must share one dtype; got "
                       + ", ".join(f"{a.name}={dtype_name(a.dtype)}" for a in floats))

    # shapes
    if vc.shape != kc.shape:
        reasons.append(f"v_cache.shape={vc.shape} must equal k_cache.shape={kc.shape}")
    if cache_dim != head_dim:
        reasons.append(f"k_cache head_dim={cache_dim} must equal q's head_dim={head_dim}")
    if not 0 < head_dim <= MAX_HEAD_DIM:
        reasons.append(f"head_dim={head_dim} must be in [1, {MAX_HEAD_DIM}]")
    elif not on_host and head_dim % 8:
        reasons.append(f"head_dim={head_dim} must be a multiple of 8 on the GPU (16-byte rows)")
    if heads_kv == 0 or heads % heads_kv:
        reasons.append(f"heads={heads} must be a multiple of heads_kv={heads_kv} (k_cache.shape[2])")
    seqlen_new = 0
    if kn is not None:
        want = (batch, kn.shape[1], heads_kv, head_dim)
        for a in (kn, vn):
            if a.shape != want:
                reasons.append(f"{a.name}.shape={a.shape} must be (batch, seqlen_new, heads_kv, head_dim) = {want}")
        seqlen_new = kn.shape[1]

    # paging and batch entries
    page_size = 0
    if paged:
        bt = r["block_table"]
        page_size = cache_rows
        if page_size <= 0 or page_size % PAGE_MULTIPLE:
            reasons.append(f"page_size={page_size} (k_cache.shape[1] of a paged cache) must be a positive multiple of {PAGE_MULTIPLE}")
        if bt.view.ndim != 2 or bt.shape[0] != batch:
            reasons.append(f"block_table.shape={bt.shape} must be (batch={batch}, max_pages)")
        if bt.dtype != np.int32:
            reasons.append(f"block_table.dtype={dtype_name(bt.dtype)} must be int32")
        if "cache_batch_idx" in r:
            reasons.append("cache_batch_idx cannot be combined with block_table (the block table already maps sequences to pages)")
        capacity = (bt.shape[1] if bt.view.ndim == 2 else 0) * page_size
    else:
        capacity = cache_rows
        if "cache_batch_idx" not in r and n_entries != batch:
            reasons.append(f"k_cache.shape[0]={n_entries} must equal batch={batch} (or pass cache_batch_idx)")
    if capacity > _MAX_INT:
        reasons.append(f"the cache holds {capacity} rows per sequence; at most {_MAX_INT} are supported")
    for name in ("cache_batch_idx", "cache_leftpad"):
        a = r.get(name)
        if a is not None and (a.shape != (batch,) or a.dtype != np.int32):
            reasons.append(f"{name} must be int32 of shape (batch={batch},); got shape={a.shape} dtype={dtype_name(a.dtype)}")
    seqlens = r.get("cache_seqlens")
    if seqlens is not None and (seqlens.shape != (batch,) or seqlens.dtype != np.int32):
        reasons.append(f"cache_seqlens must be an int or int32 of shape (batch={batch},); got shape={seqlens.shape} "
                       f"dtype={dtype_name(seqlens.dtype)}")
    const = scalars.get("seqlens_const")
    if seqlens is None and (not _is_int(const) or not 0 <= const <= _MAX_INT):
        reasons.append(f"cache_seqlens={const!r} must be a non-negative int (at most {_MAX_INT}) or an int32 array of shape (batch,)")

    # rotary
    rotary_dim = seqlen_ro = 0
    cos, sin = r.get("rotary_cos"), r.get("rotary_sin")
    if (cos is None) != (sin is None):
        reasons.append("rotary_cos and rotary_sin must be given together")
    elif cos is not None:
        if kn is None:
            reasons.append("rotary_cos/rotary_sin need new keys and values (k, v) to append, as in FlashAttention-2")
        if cos.view.ndim != 2 or cos.shape != sin.shape:
            reasons.append(f"rotary_cos.shape={cos.shape} and rotary_sin.shape={sin.shape} must be one (seqlen_ro, rotary_dim / 2)")
        else:
            seqlen_ro, rotary_dim = cos.shape[0], 2 * cos.shape[1]
            if not 0 < rotary_dim <= head_dim:
                reasons.append(f"rotary_dim={rotary_dim} (2 * rotary_cos.shape[1]) must be in [2, head_dim={head_dim}]")
        rot_ok = (np.dtype(np.float32),) + ((q.dtype,) if q.dtype in kernel_dtypes else ())
        for a in (cos, sin):
            if on_host and a.dtype.kind != "f" and a.dtype != BFLOAT16:
                reasons.append(f"{a.name}.dtype={dtype_name(a.dtype)} must be a floating dtype")
            elif not on_host and a.dtype not in rot_ok:
                reasons.append(f"{a.name}.dtype={dtype_name(a.dtype)} must be q's dtype or float32")

    slopes = r.get("alibi_slopes")
    if slopes is not None:
        if slopes.shape not in ((heads,), (batch, heads)):
            reasons.append(f"alibi_slopes.shape={slopes.shape} must be (heads={heads},) or (batch={batch}, heads={heads})")
        if not on_host and slopes.dtype != np.float32:
            reasons.append(f"alibi_slopes.dtype={dtype_name(slopes.dtype)} must be float32")
        elif on_host and slopes.dtype.kind != "f":
            reasons.append(f"alibi_slopes.dtype={dtype_name(slopes.dtype)} must be float32 or float64")

    # memory layout: unit last stride; 16-byte rows on the GPU
    for name, a in r.items():
        if a.view.ndim >= 1 and a.view.size and a.shape[-1] > 1 and a.strides[-1] != 1:
            reasons.append(f"{name} must have a unit stride in its last dimension; got strides={a.strides}")
    if not on_host:
        for a in (q, kc, vc, kn, vn):
            if a is None or not a.view.size:
                continue
            vector = 16 // a.dtype.itemsize
            if int(a.view.data.ptr) % 16 or any(s % vector for s in a.strides[:-1]):
                reasons.append(f"{a.name} must start on a 16-byte boundary with strides that are multiples of "
                               f"{vector} elements; got strides={a.strides}")

    # values held on the host
    if kn is not None and kn.view.size:
        _aliasing_errors(r, reasons)
    lens = _host_values(seqlens)
    if seqlens is None and _is_int(const) and 0 <= const <= _MAX_INT:
        lens = np.full(batch, int(const), np.int64)
    if lens is not None and lens.shape == (batch,):
        lens = lens.astype(np.int64)
        if (lens < 0).any():
            reasons.append(f"cache_seqlens={lens.tolist()} must be >= 0")
        ends = lens + seqlen_new
        if (ends > capacity).any():
            b = int(np.argmax(ends > capacity))
            reasons.append(f"cache_seqlens[{b}]={int(lens[b])} + seqlen_new={seqlen_new} exceeds the cache's capacity of "
                           f"{capacity} rows per sequence")
        pads = _host_values(r.get("cache_leftpad"))
        if pads is not None and pads.shape == (batch,) and ((pads < 0) | (pads > lens)).any():
            b = int(np.argmax((pads < 0) | (pads > lens)))
            reasons.append(f"cache_leftpad[{b}]={int(pads[b])} must be in [0, cache_seqlens[{b}]={int(lens[b])}]")
        if seqlen_ro and kn is not None:
            sequential = opts.causal or opts.window_size != (-1, -1)
            last = ends - 1 if seqlen_new else lens
            if sequential:
                last = np.maximum(last, lens + seqlen_q - 1)
            if batch and int(last.max()) >= seqlen_ro:
                b = int(np.argmax(last))
                reasons.append(f"rotary position {int(last[b])} (sequence {b}) is past rotary_cos.shape[0]={seqlen_ro}")
        table = _host_values(r.get("block_table"))
        if paged and page_size > 0 and table is not None and table.ndim == 2 and table.shape[0] == batch:
            for b in range(batch):
                used = table[b, : min(table.shape[1], -(-int(ends[b]) // page_size))]
                bad = (used < 0) | (used >= n_entries)
                if bad.any():
                    j = int(np.argmax(bad))
                    reasons.append(f"block_table[{b}, {j}]={int(used[j])} is not a page of k_cache (num_pages={n_entries})")
                    break
        if seqlen_new and not reasons:
            _collision_errors(lens, seqlen_new, page_size, table if paged else None,
                              None if paged else _host_values(r.get("cache_batch_idx")), reasons)
    idx = _host_values(r.get("cache_batch_idx"))
    if idx is not None and idx.shape == (batch,) and ((idx < 0) | (idx >= n_entries)).any():
        b = int(np.argmax((idx < 0) | (idx >= n_entries)))
        reasons.append(f"cache_batch_idx[{b}]={int(idx[b])} must be in [0, k_cache.shape[0]={n_entries})")
    if reasons:
        raise ValidationError(WHERE, reasons, list(r.values()))
    return Problem(batch, seqlen_q, heads, heads_kv, head_dim, seqlen_new, capacity, page_size, n_entries,
                   rotary_dim, seqlen_ro)


def _byte_span(a: ArrayRef) -> tuple[int, int, bool]:
    """(first, last) byte address an array's elements occupy (any strides, negative
    included), and whether the elements fill that span with no gap (dense)."""
    view = a.view
    start = int(view.ctypes.data) if isinstance(view, np.ndarray) else int(view.data.ptr)
    low = high = start
    for n, stride in zip(a.shape, view.strides):
        if n > 1:
            reach = (n - 1) * stride
            low, high = (low + reach, high) if reach < 0 else (low, high + reach)
    high += a.dtype.itemsize - 1
    return low, high, high - low + 1 == view.size * a.dtype.itemsize


def _aliasing_errors(r: dict[str, ArrayRef], reasons: list[str]) -> None:
    """Appending writes into k_cache and v_cache before the attention reads q, k, v and the
    caches: a cache sharing memory with the other cache or with q, k, v would be read
    after (or while) it is overwritten. Only certain overlaps are refused: the same first
    element, or a dense array whose span holds the other's first or last element (both are
    elements). Interleaved views that never touch (k_cache = kv[:, 0], v_cache = kv[:, 1])
    stay allowed."""
    spans = {name: _byte_span(r[name]) for name in ("q", "k_cache", "v_cache", "k", "v") if r[name].view.size}

    def overlap(a: tuple[int, int, bool], b: tuple[int, int, bool]) -> bool:
        (lo, hi, dense), (olo, ohi, odense) = a, b
        if not (lo <= ohi and olo <= hi):
            return False
        if lo == olo:
            return True
        ends_in = lambda x, y: y[0] <= x[0] <= y[1] or y[0] <= x[1] <= y[1]  # noqa: E731
        return (dense and ends_in(b, a)) or (odense and ends_in(a, b))

    pairs = [("k_cache", "v_cache")] + [(cache, other) for cache in ("k_cache", "v_cache") for other in ("q", "k", "v")]
    for cache, other in pairs:
        if cache in spans and other in spans and overlap(spans[cache], spans[other]):
            reasons.append(f"{other} shares memory with {cache}: appending k and v writes into the caches "
                           f"in place, so {other} would be overwritten during the call; pass separate arrays")


def _collision_errors(lens, seqlen_new: int, page_size: int, table, entries, reasons: list[str]) -> None:
    """Two sequences appending to the same cache row (a page or a cache_batch_idx entry
    shared by both) race on the GPU; only the written rows are compared, so sequences
    that share read-only prefix pages stay allowed."""
    batch = lens.shape[0]
    if table is None and entries is None:
        return
    owner: dict[tuple[int, int], int] = {}
    for b in range(batch):
        rows = int(lens[b]) + np.arange(seqlen_new)
        if table is not None:
            slots = zip(table[b, rows // page_size].tolist(), (rows % page_size).tolist())
        else:
            slots = ((int(entries[b]), int(row)) for row in rows)
        for slot in slots:
            first = owner.setdefault(slot, b)
            if first != b:
                where = f"page {slot[0]}" if table is not None else f"cache entry {slot[0]} (cache_batch_idx)"
                reasons.append(f"sequences {first} and {b} both append to row {slot[1]} of {where}: "
                               "each appended row must belong to one sequence")
                return


# ---- the device path ------------------------------------------------------------------------


def _ptr(a: Any) -> int:
    return 0 if a is None else int(a.data.ptr)


def _strides(a: Any) -> tuple[int, ...]:
    return tuple(s // a.itemsize for s in a.strides)


_occupancy: dict[tuple, int] = {}
_sm_counts: dict[int, tuple[int, int]] = {}
_lock = threading.Lock()


def _device_info(index: int) -> tuple[int, int]:
    """(SM count, shared memory per SM) of a device."""
    info = _sm_counts.get(index)
    if info is None:
        import cupy

        attrs = cupy.cuda.Device(index).attributes
        info = (int(attrs["MultiProcessorCount"]), int(attrs["MaxSharedMemoryPerMultiprocessor"]))
        with _lock:
            _sm_counts[index] = info
    return info


def _blocks_per_sm(kernel: Any, threads: int, smem: int, smem_per_sm: int) -> int:
    key = (id(kernel), threads, smem)
    found = _occupancy.get(key)
    if found is None:
        try:
            from cupy_backends.cuda.api import driver

            found = int(driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.kernel.ptr, threads, smem))
        except Exception:  # noqa: BLE001 - an estimate from shared memory alone
            found = max(1, min(4, smem_per_sm // (smem + 1024)))
        _occupancy[key] = max(found, 1)
    return _occupancy[key]


def choose_splits(blocks: int, tiles: int, sms: int, per_sm: int) -> int:
    """Key splits per (batch, kv head, query tile): enough blocks to fill the GPU in whole
    waves. The smallest split count whose wave efficiency (blocks / (waves x slots)) is
    within 85% of the best, as few as possible because each split costs a partial output
    and the merge; never more splits than key tiles."""
    slots = sms * per_sm
    if blocks <= 0 or blocks >= 0.8 * slots:
        return 1
    limit = max(1, min(MAX_SPLITS, tiles))
    eff = []
    for s in range(1, limit + 1):
        total = blocks * s
        eff.append(total / (math.ceil(total / slots) * slots))
    best = max(eff)
    for s, e in enumerate(eff, start=1):
        if e >= 0.85 * best:
            return s
    return 1


@dataclasses.dataclass(frozen=True)
class _Launch:
    kernel: Any
    blocks: int
    threads: int
    smem: int


_MAX_GRID = 2**31 - 1
_POINTERS = ("q", "k_cache", "v_cache", "k_new", "v_new", "cache_seqlens", "block_table", "cache_batch_idx",
             "cache_leftpad", "rotary_cos", "rotary_sin", "alibi", "out", "lse", "q_rot", "o_accum", "lse_accum")


@dataclasses.dataclass
class Plan:
    """The launches of one call and its record; `outputs` are what the call allocates:
    (name, shape, dtype) of out, lse and the workspaces."""

    launches: tuple[_Launch, ...]
    words: np.ndarray  # the record as 8-byte words
    outputs: tuple[tuple[str, tuple[int, ...], np.dtype], ...]

    def argument(self, pointers: dict[str, int], seqlens_const: int) -> np.ndarray:
        words = self.words.copy()
        for name, value in pointers.items():
            words[_SLOTS[name]] = value
        words.view(np.int32)[_CONST_SLOT] = seqlens_const
        return words.view(np.dtype((np.void, RECORD.itemsize)))

    def run(self, stream: Any, argument: np.ndarray) -> None:
        for k in self.launches:
            if k.blocks > _MAX_GRID:
                raise ValueError(f"{k.blocks} thread blocks exceed the grid limit {_MAX_GRID}")
            if k.blocks:
                k.kernel((k.blocks,), (k.threads,), (argument,), shared_mem=k.smem, stream=stream)


_SLOTS = {name: RECORD.fields[name][1] // 8 for name in _POINTERS}
_CONST_SLOT = RECORD.fields["seqlens_const"][1] // 4
_kernels: dict[tuple[int, str, int], Any] = {}


def _kernel(mod: Any, name: str, smem: int) -> Any:
    key = (id(mod), name, smem)
    k = _kernels.get(key)
    if k is None:
        k = mod.get_function(name)
        if smem > 48 * 1024:
            k.max_dynamic_shared_size_bytes = smem
        _kernels[key] = k
    return k


def plan(views: dict[str, Any], prob: Problem, scalars: dict[str, Any], device_index: int) -> Plan:
    """The launches and record for a call whose device views (CuPy arrays; None where
    absent) are `views`. Pointers of the outputs are filled in per call."""
    from ._launch import smem_limit

    dtype = np.dtype(views["q"].dtype)
    variant, tiles, smem = decode_variant(dtype, prob.head_dim, smem_limit(device_index))
    mod = _build.module(variant, device_index)
    main = _kernel(mod, "cuflash_decode", smem)
    M = prob.rows_per_head
    m_blocks = -(-M // 16)
    base_blocks = prob.batch * prob.num_heads_kv * m_blocks
    splits = int(scalars["num_splits"])
    key_tiles = -(-max(prob.capacity, 1) // tiles.block_n)
    if splits == 0:
        sms, smem_per_sm = _device_info(device_index)
        splits = choose_splits(base_blocks, key_tiles, sms, _blocks_per_sm(main, tiles.threads, smem, smem_per_sm))
    f32 = np.dtype(np.float32)
    outputs = [("out", (prob.batch, prob.seqlen_q, prob.num_heads, prob.head_dim), dtype),
               ("lse", (prob.batch, prob.num_heads, prob.seqlen_q), f32)]
    rotary = views.get("rotary_cos") is not None
    if rotary:
        outputs.append(("q_rot", (prob.batch, prob.seqlen_q, prob.num_heads, prob.head_dim), dtype))
    if splits > 1:
        outputs.append(("o_accum", (splits, prob.batch, prob.num_heads_kv, M, prob.head_dim), f32))
        outputs.append(("lse_accum", (splits, prob.batch, prob.num_heads_kv, M), f32))

    p: dict[str, Any] = {}
    q = views["q"]
    p["q_batch_stride"], p["q_row_stride"], p["q_head_stride"] = _strides(q)[:3]
    h, d = prob.num_heads, prob.head_dim
    p["qr_batch_stride"], p["qr_row_stride"], p["qr_head_stride"] = prob.seqlen_q * h * d, h * d, d
    p["o_batch_stride"], p["o_row_stride"], p["o_head_stride"] = prob.seqlen_q * h * d, h * d, d
    p["lse_batch_stride"], p["lse_head_stride"] = h * prob.seqlen_q, prob.seqlen_q
    for prefix, name in (("kc", "k_cache"), ("vc", "v_cache"), ("kn", "k_new"), ("vn", "v_new")):
        a = views.get(name)
        if a is not None:
            p[f"{prefix}_batch_stride"], p[f"{prefix}_row_stride"], p[f"{prefix}_head_stride"] = _strides(a)[:3]
    flags = 0
    bt = views.get("block_table")
    if bt is not None:
        flags |= FLAGS["PAGED"]
        p["block_table_batch_stride"] = _strides(bt)[0]
    if views.get("k_new") is not None and prob.seqlen_new > 0:
        flags |= FLAGS["APPEND"]
    left, right = scalars["window_size"]
    causal = bool(scalars["causal"])
    if rotary:
        flags |= FLAGS["ROTARY"]
        if scalars["rotary_interleaved"]:
            flags |= FLAGS["ROTARY_INTERLEAVED"]
        if causal or (left, right) != (-1, -1):
            flags |= FLAGS["ROTARY_Q_SEQUENTIAL"]
        if np.dtype(views["rotary_cos"].dtype) == np.float32:
            flags |= FLAGS["ROTARY_F32"]
        p["rotary_row_stride"] = _strides(views["rotary_cos"])[0]
    if scalars["softcap"] > 0:
        flags |= FLAGS["SOFTCAP"]
    alibi = views.get("alibi")
    if alibi is not None:
        flags |= FLAGS["ALIBI"]
        p["alibi_batch_stride"] = h if alibi.ndim == 2 else 0
    if causal:
        right = 0
    span = prob.seqlen_q + prob.capacity
    p["window_left"] = -1 if left > span else left
    p["window_right"] = -1 if right > span else right
    scale = scalars["softmax_scale"]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    p.update(batch=prob.batch, seqlen_q=prob.seqlen_q, num_heads=h, num_heads_kv=prob.num_heads_kv, group=prob.group,
             head_dim=d, seqlen_new=prob.seqlen_new, capacity=prob.capacity, page_size=prob.page_size,
             num_pages=prob.num_pages, batch_cache=prob.num_pages, num_splits=splits, rows_per_head=M,
             num_m_blocks=m_blocks, flags=flags, rotary_dim=prob.rotary_dim, seqlen_ro=prob.seqlen_ro,
             softmax_scale=scale, scale_log2=scale * math.log2(math.e), softcap=float(scalars["softcap"]))
    record = np.array(tuple(p.get(name, 0) for name in RECORD.names), dtype=RECORD)

    launches = []
    append_blocks = (prob.batch * prob.seqlen_new if flags & FLAGS["APPEND"] else 0)
    append_blocks += prob.batch * prob.seqlen_q if rotary else 0
    if append_blocks:
        launches.append(_Launch(_kernel(mod, "cuflash_decode_append", 0), append_blocks, 128, 0))
    launches.append(_Launch(main, base_blocks * splits, tiles.threads, smem))
    if splits > 1:
        rows = prob.batch * prob.num_heads_kv * M
        launches.append(_Launch(_kernel(mod, "cuflash_decode_combine", 0), -(-rows // 4), 128, 0))
    return Plan(tuple(launches), record.reshape(1).view(np.uint64).copy(), tuple(outputs))


# ---- the plan cache -------------------------------------------------------------------------

_plans: dict[tuple, tuple[Plan, int, int]] = {}
_MAX_PLANS = 256


def clear_plans() -> None:
    with _lock:
        _plans.clear()


def _fast_signature(arrays: dict[str, Any], scalars: tuple) -> tuple | None:
    """The plan-cache key of a call on PyTorch or CuPy CUDA arrays; None otherwise (those
    calls always take the full path)."""
    from . import _fast

    first = type(arrays["q"])
    library = _fast._library_of(first)
    if library is None:
        return None
    metas = []
    for name in _ARRAYS:
        a = arrays.get(name)
        if a is None:
            metas.append(None)
            continue
        if type(a) is not first:
            return None
        meta = library.signature(a)
        if not meta[-1]:
            return None
        metas.append(meta)
    key = ("kvcache", library.name, tuple(metas), scalars, tuple(map(type, scalars)))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _run_cached(key: tuple, arrays: dict[str, Any], seqlens_const: int) -> tuple | None:
    entry = _plans.get(key)
    if entry is None:
        return None
    plan_, device_index, capacity_left = entry
    if seqlens_const > capacity_left:  # an int length the full path must judge
        return None
    from . import _fast

    library = _fast._library_of(type(arrays["q"]))
    pointers = {}
    for name in ("q", "k_cache", "v_cache", "k", "v"):
        a = arrays.get(name)
        if a is not None:
            ptr = library.pointer(a)
            if ptr % 16:
                return None  # the full path raises the alignment error
            pointers[{"k": "k_new", "v": "v_new"}.get(name, name)] = ptr
    for name in ("cache_seqlens", "block_table", "cache_batch_idx", "cache_leftpad", "rotary_cos", "rotary_sin"):
        a = arrays.get(name)
        if a is not None:
            pointers[name] = library.pointer(a)
    if arrays.get("alibi_slopes") is not None:
        pointers["alibi"] = library.pointer(arrays["alibi_slopes"])
    import cupy

    with cupy.cuda.Device(device_index):
        stream = library.stream(device_index)
        outs = {}
        for name, shape, dtype in plan_.outputs:
            outs[name] = _fast.empty(library.name, arrays["q"], shape, library.dtype(dtype))
            pointers[name] = library.pointer(outs[name])
        plan_.run(stream, plan_.argument(pointers, seqlens_const))
    return outs["out"], outs["lse"]


# ---- the API ---------------------------------------------------------------------------------


@lists_valid_keywords(WHERE)
def attention_with_kvcache(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    k: Any = None,
    v: Any = None,
    *,
    cache_seqlens: Any,
    block_table: Any = None,
    cache_batch_idx: Any = None,
    cache_leftpad: Any = None,
    rotary_cos: Any = None,
    rotary_sin: Any = None,
    rotary_interleaved: bool = True,
    num_splits: int = 0,
    return_lse: bool = False,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Any = None,
) -> Any:
    """Attention of q over a KV cache, after appending k and v to it (in place).

    Returns out (q's shape and dtype), or (out, lse) with return_lse=True, lse float32
    (batch, heads, seqlen_q) and -inf on rows with no key; in the caller's array type. See
    the module documentation for the shapes and the semantics, and `reference` for them in
    code. cache_seqlens: an int, or int32 (batch,), on the host or the GPU. Lengths,
    pages and batch indices held on the GPU are not checked before launch (that would
    need a sync): the kernels clamp them to the cache, so a bad value gives wrong
    attention for that sequence but never a read or write outside the cache, and an
    append past the capacity is dropped."""
    if window_size is None:
        window_size = (-1, -1)
    window = tuple(window_size) if isinstance(window_size, (list, tuple)) else window_size
    # A Python or NumPy scalar is a length shared by every sequence (an int, judged by check
    # with the others); anything else is an array.
    scalar = cache_seqlens is not None and not hasattr(cache_seqlens, "shape") and not isinstance(
        cache_seqlens, (list, tuple)) or isinstance(cache_seqlens, np.generic)
    seqlens_const = cache_seqlens if scalar else None
    arrays = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, block_table=block_table,
                  cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad, rotary_cos=rotary_cos,
                  rotary_sin=rotary_sin, alibi_slopes=alibi_slopes)
    if seqlens_const is None:
        arrays["cache_seqlens"] = cache_seqlens
    scalars = dict(softmax_scale=softmax_scale, causal=causal, window_size=window, softcap=softcap,
                   rotary_interleaved=rotary_interleaved, num_splits=num_splits, seqlens_const=seqlens_const,
                   return_lse=return_lse)
    # return_lse is part of the key so that a cached plan is only reused for a value the
    # full path has judged.
    key_scalars = (softmax_scale, causal, window, softcap, rotary_interleaved, num_splits, seqlens_const is None,
                   return_lse)
    key = _fast_signature(arrays, key_scalars)
    if key is not None and (seqlens_const is None or _is_int(seqlens_const)):
        done = _run_cached(key, arrays, 0 if seqlens_const is None else int(seqlens_const))
        if done is not None:
            return done if return_lse else done[0]
    out, lse = _full_path(arrays, scalars, key)
    return (out, lse) if return_lse else out


def _import(arrays: dict[str, Any]) -> tuple[dict[str, ArrayRef], Device, Any]:
    reasons = []
    devices = {}
    for name, obj in arrays.items():
        if obj is None:
            continue
        try:
            devices[name] = _interop.device_of(obj)
        except InteropError as exc:
            reasons.append(f"{name}: {exc}")
    if reasons:
        raise ValidationError(WHERE, reasons, [])
    device = devices["q"]
    stream = None
    if device.kind != "cpu":
        from ._api import _require_cupy

        _require_cupy(WHERE)
        stream = _interop.caller_stream(arrays["q"], device)
    refs = {}
    for name, obj in arrays.items():
        if obj is None:
            continue
        if isinstance(obj, (list, tuple)):
            obj = np.asarray(obj, dtype=np.int32 if name in _INDEX_ARRAYS else np.float32)
        refs[name] = _interop.import_array(name, obj, stream if devices[name].kind != "cpu" else None)
    return refs, device, stream


def _full_path(arrays: dict[str, Any], scalars: dict[str, Any], key: tuple | None) -> tuple[Any, Any]:
    refs, device, stream = _import(arrays)
    on_host = device.kind == "cpu"
    prob = check(refs, scalars, on_host)
    if on_host:
        return _host_path(refs, prob, scalars)
    return _device_path(refs, prob, scalars, device, stream, key)


def appended_slots(seqlen_new: int, page_size: int, cache_seqlens: Any, block_table: Any, cache_batch_idx: Any, b: int):
    """Index of the cache rows sequence b's new keys go to: (entries or pages, rows)."""
    lens = np.asarray(cache_seqlens).reshape(-1)
    rows = int(lens[b if lens.size > 1 else 0]) + np.arange(seqlen_new)
    if block_table is not None:
        table = np.asarray(block_table)
        return table[b, rows // page_size], rows % page_size
    entry = b if cache_batch_idx is None else int(np.asarray(cache_batch_idx)[b])
    return np.full(rows.shape, entry), rows


def _host_path(refs: dict[str, ArrayRef], prob: Problem, scalars: dict[str, Any]) -> tuple[Any, Any]:
    view = {name: ref.view for name, ref in refs.items()}
    q = refs["q"]
    lens = view.get("cache_seqlens", scalars["seqlens_const"])
    storage = None if q.dtype == np.float64 else q.dtype
    # A window side wider than every key distance is unbounded (the device path's rule);
    # it keeps the reference's index arithmetic within int64 for windows given as 2**70.
    span = prob.seqlen_q + prob.capacity
    window = tuple(-1 if w > span else int(w) for w in scalars["window_size"])
    out, lse, kc, vc = reference(
        view["q"], view["k_cache"], view["v_cache"], view.get("k"), view.get("v"), cache_seqlens=lens,
        block_table=view.get("block_table"), cache_batch_idx=view.get("cache_batch_idx"),
        cache_leftpad=view.get("cache_leftpad"), rotary_cos=view.get("rotary_cos"), rotary_sin=view.get("rotary_sin"),
        rotary_interleaved=bool(scalars["rotary_interleaved"]), softmax_scale=scalars["softmax_scale"],
        causal=scalars["causal"], window_size=window, softcap=scalars["softcap"],
        alibi_slopes=view.get("alibi_slopes"), storage_dtype=storage,
    )
    if prob.seqlen_new and "k" in refs:
        for name, new in (("k_cache", kc), ("v_cache", vc)):
            target = view[name]
            if not target.flags.writeable:
                raise ValidationError(WHERE, [f"{name} is read-only (a JAX array?): appending needs a writable cache; "
                                              "use cuflash.jax.attention_with_kvcache for JAX"], [refs[name]])
            for b in range(prob.batch):
                at = appended_slots(prob.seqlen_new, prob.page_size, lens, view.get("block_table"), view.get("cache_batch_idx"), b)
                target[at] = new[at].astype(target.dtype)
    lse_dtype = np.float64 if q.dtype == np.float64 else np.float32
    return _interop.to_caller(out.astype(q.dtype), q), _interop.to_caller(lse.astype(lse_dtype), q)


def _device_path(refs: dict[str, ArrayRef], prob: Problem, scalars: dict[str, Any], device: Device, stream: Any,
                 key: tuple | None) -> tuple[Any, Any]:
    import cupy

    q = refs["q"]
    with _interop.on_device(device, stream):
        views: dict[str, Any] = {}
        # Small index arrays given on the host for a GPU call were checked value by value;
        # they move to the GPU here (an allocation: give device arrays for CUDA-graph capture).
        for name, ref in refs.items():
            target = {"k": "k_new", "v": "v_new", "alibi_slopes": "alibi"}.get(name, name)
            view = ref.view
            if isinstance(view, np.ndarray):
                view = cupy.asarray(view)
            views[target] = view
        if prob.batch == 0 or prob.seqlen_q == 0 or prob.num_heads == 0:
            out_obj, out = _interop.empty(q.shape, q.dtype, q, stream)
            lse_obj, lse = _interop.empty((prob.batch, prob.num_heads, prob.seqlen_q), np.dtype(np.float32), q, stream)
            return _result(out_obj, out, q), _result(lse_obj, lse, q)
        plan_ = plan(views, prob, scalars, device.index)
        allocated = {}
        for name, shape, dtype in plan_.outputs:
            obj, view = _interop.empty(shape, dtype, q, stream)
            allocated[name] = (obj, view)
        pointers = {name: _ptr(views.get(name)) for name in _POINTERS if name in views}
        pointers.update({name: _ptr(view) for name, (_, view) in allocated.items()})
        const = scalars["seqlens_const"]
        plan_.run(stream, plan_.argument(pointers, 0 if const is None else int(const)))
    host_indices = any(isinstance(refs[n].view, np.ndarray) for n in _INDEX_ARRAYS if n in refs)
    if key is not None and not host_indices:
        with _lock:
            if len(_plans) >= _MAX_PLANS:
                _plans.clear()
            _plans[key] = (plan_, device.index, prob.capacity - prob.seqlen_new)
    return _result(*allocated["out"], q), _result(*allocated["lse"], q)


def _result(obj: Any, view: Any, like: ArrayRef) -> Any:
    return obj if obj is not None else _interop.to_caller(view, like)
