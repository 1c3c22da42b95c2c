"""Block-sparse attention: which (query block, key block) pairs are computed at all.

A block mask is a boolean array broadcastable to (batch, heads, ceil(Nq / block_q),
ceil(Nk / block_k)) with a block size from `BLOCK_SIZES`; True = the block is computed.
Its meaning is exactly the dense element mask that expands every block to block_q x
block_k elements, AND-ed with every other mask (causal, windows, `mask`): query i may
attend key j only if block_mask[b, h, i // block_q, j // block_k]. Blocks are in each
sequence's own coordinates (varlen) and local row numbers (position_offsets do not move
them). A row left with no key gives output 0 and LSE -inf.

The kernels read a compact form, `BlockSparse`: per (batch, head, query block) the count
and the ascending indices of its key blocks, and the transposed lists (per key block, its
query blocks) for the backward's dK/dV kernel. `compact` builds it from a boolean block
mask on the mask's own device (NumPy, CuPy, PyTorch, JAX) without synchronising; build it
once and pass it to every call and layer that shares the pattern. Passing a boolean block
mask to a call compacts it for that call.

Pattern helpers (`local_global`, `strided`, `document`, `random_blocks`) return boolean
block masks as NumPy arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ._options import is_real
from ._tiles import BLOCK_SIZES
from ._validate import ValidationError, sequence_option

__all__ = [
    "BLOCK_SIZES", "BlockSparse", "compact", "num_blocks", "expand", "local_global", "strided", "document",
    "random_blocks", "density",
]


def num_blocks(seqlen: int, block: int) -> int:
    return -(-int(seqlen) // int(block))


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _raise(where: str, errors: list[str]) -> None:
    """Bad arguments of a function of this module: one ValidationError (a ValueError), as
    every cuflash entry point raises, naming each bad value."""
    if errors:
        raise ValidationError(f"cuflash.block_sparse.{where}", errors, [])


def _count_errors(**values: Any) -> list[str]:
    """Reasons why any of `values` (name=value) is not an int >= 0."""
    return [f"{name}={value!r} must be an int >= 0" for name, value in values.items()
            if not _is_int(value) or value < 0]


def _pattern_size_errors(block_size: Any) -> list[str]:
    """The pattern helpers take any positive block size (the kernels' sizes are checked
    where a block mask is used)."""
    if not (isinstance(block_size, (tuple, list)) and len(block_size) == 2
            and all(_is_int(b) and b >= 1 for b in block_size)):
        return [f"block_size={block_size!r} must be a pair of positive ints (block_q, block_k)"]
    return []


def _flag_errors(**values: Any) -> list[str]:
    return [f"{name}={value!r} must be a bool" for name, value in values.items()
            if not isinstance(value, (bool, np.bool_))]


def block_size_errors(block_size: Any) -> list[str]:
    """Reasons why `block_size` is not one the kernels take (empty if it is)."""
    ok = (isinstance(block_size, (tuple, list)) and len(block_size) == 2
          and all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) for b in block_size))
    if not ok:
        return [f"block_size={block_size!r} must be a pair of ints (block_q, block_k)"]
    if not all(int(b) in BLOCK_SIZES for b in block_size):
        return [f"block_size={tuple(int(b) for b in block_size)!r}: block_q and block_k must each be one of "
                f"{BLOCK_SIZES} (the kernels' tiles divide these)"]
    return []


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSparse:
    """Compact block-sparse lists (int32 arrays of one library and device).

    kv_count (Bm, Hm, QB), kv_index (Bm, Hm, QB, KB): query block r of (b, h) computes key
    blocks kv_index[b, h, r, :kv_count[b, h, r]], ascending (entries past the count are
    ignored). q_count (Bm, Hm, KB), q_index (Bm, Hm, KB, QB): the same set, listed per key
    block. Bm is 1 or the batch, Hm 1 or the number of query heads (1 = shared by all).
    Built by `compact`; constructed by hand, its values are checked (on the host) the first
    time a call uses it."""

    block_size: tuple[int, int]
    kv_count: Any
    kv_index: Any
    q_count: Any
    q_index: Any
    verified: bool = dataclasses.field(default=False, repr=False)

    def __post_init__(self) -> None:
        errors = block_size_errors(self.block_size)
        for name, value in self.arrays().items():
            # Only plain sequences are refused: internal constructions carry stand-ins
            # (device pointers, JAX pytree leaves) that are not arrays either.
            if isinstance(value, (list, tuple)):
                errors.append(f"{name} given as a {type(value).__name__} must be an int32 array (NumPy, CuPy, "
                              "PyTorch or JAX)")
        _raise("BlockSparse", errors)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(Bm, Hm, query blocks, key blocks) of the block mask this describes."""
        return tuple(int(s) for s in self.kv_index.shape)  # type: ignore[return-value]

    def arrays(self) -> dict[str, Any]:
        return dict(kv_count=self.kv_count, kv_index=self.kv_index, q_count=self.q_count, q_index=self.q_index)

    def to_dense(self) -> np.ndarray:
        """The boolean block mask (NumPy, host), from the key-block lists."""
        count, index = _host(self.kv_count), _host(self.kv_index)
        return _dense_from_lists(count, index)

    def density(self) -> float:
        """The fraction of (batch, head, query block, key block) entries computed."""
        count = _host(self.kv_count)
        return float(count.sum()) / max(count.size * self.shape[3], 1)

    def value_errors(self) -> list[str]:
        """Reasons why the lists are inconsistent (copies them to the host)."""
        return _list_errors(self)


def compact(block_mask: Any, block_size: tuple[int, int], shape: tuple[int, int] | None = None) -> BlockSparse:
    """The compact lists of a boolean block mask (NumPy, CuPy, PyTorch or JAX; the result
    has the same library and device). `shape` = (query blocks, key blocks) broadcasts a
    mask given with size-1 block dimensions; batch and head dimensions of size 1 stay 1
    (shared). Raises cuflash.ValidationError (a ValueError) naming the bad value."""
    errors = block_size_errors(block_size)
    if isinstance(block_mask, (list, tuple)):
        # The core's rule for a block mask given as a list: bools only, rectangular.
        block_mask = sequence_option("block_mask", block_mask, errors)
        if block_mask is None:
            _raise("compact", errors)
    if not (hasattr(block_mask, "dtype") and hasattr(block_mask, "shape")):
        errors.append(f"block_mask must be a bool array (NumPy, CuPy, PyTorch or JAX); got {type(block_mask).__name__}")
        _raise("compact", errors)
    xp, kind = _namespace(block_mask)
    if str(block_mask.dtype) not in ("bool", "torch.bool"):
        errors.append(f"block_mask.dtype={block_mask.dtype} must be bool (True = compute the block)")
    if not 2 <= block_mask.ndim <= 4:
        errors.append(f"block_mask must be 2-D to 4-D (batch, heads, query blocks, key blocks); got shape {tuple(block_mask.shape)}")
    if shape is not None and not (isinstance(shape, (tuple, list)) and len(shape) == 2
                                  and all(_is_int(s) and s >= 0 for s in shape)):
        errors.append(f"shape={shape!r} must be a pair of ints >= 0 (query blocks, key blocks) or None")
    _raise("compact", errors)
    mask = block_mask
    while mask.ndim < 4:
        mask = mask[None]
    b, h, qb, kb = (int(s) for s in mask.shape)
    if shape is not None:
        want_q, want_k = (int(s) for s in shape)
        if qb not in (1, want_q) or kb not in (1, want_k):
            _raise("compact", [f"block_mask shape {tuple(block_mask.shape)} does not broadcast to {want_q} query "
                               f"blocks x {want_k} key blocks (shape={tuple(shape)!r})"])
        qb, kb = want_q, want_k
    mask = _broadcast(xp, kind, mask, (b, h, qb, kb))
    kv_count, kv_index = _lists(xp, kind, mask)
    q_count, q_index = _lists(xp, kind, _swap(xp, kind, mask))
    return BlockSparse((int(block_size[0]), int(block_size[1])), kv_count, kv_index, q_count, q_index, verified=True)


def expand(block_mask: np.ndarray, block_size: tuple[int, int], seqlen_q: int, seqlen_k: int) -> np.ndarray:
    """The dense element mask (..., seqlen_q, seqlen_k) of a boolean block mask (NumPy)."""
    _raise("expand", _pattern_size_errors(block_size) + _count_errors(seqlen_q=seqlen_q, seqlen_k=seqlen_k))
    m = np.asarray(block_mask, dtype=bool)
    bq, bk = block_size
    m = np.broadcast_to(m, m.shape[:-2] + (num_blocks(seqlen_q, bq), num_blocks(seqlen_k, bk)))
    return np.repeat(np.repeat(m, bq, axis=-2), bk, axis=-1)[..., :seqlen_q, :seqlen_k]


def density(block_mask: Any) -> float:
    m = _host(block_mask).astype(bool)
    return float(m.mean()) if m.size else 0.0


# ---- patterns (boolean block masks, NumPy) ---------------------------------------------


def local_global(seqlen_q: int, seqlen_k: int, block_size: tuple[int, int], *, window_blocks: int = 1,
                 global_blocks: int = 1, causal: bool = False) -> np.ndarray:
    """Longformer / BigBird: each query block sees key blocks within `window_blocks` of its
    diagonal, the first `global_blocks` key blocks (global tokens), and the first
    `global_blocks` query blocks see every key block. (QB, KB); with `causal`, key blocks
    after the diagonal's block are dropped (AND it with causal=True for the element mask)."""
    _raise("local_global", _pattern_size_errors(block_size) + _flag_errors(causal=causal) + _count_errors(
        seqlen_q=seqlen_q, seqlen_k=seqlen_k, window_blocks=window_blocks, global_blocks=global_blocks))
    qb, kb = num_blocks(seqlen_q, block_size[0]), num_blocks(seqlen_k, block_size[1])
    rows, cols = _block_centres(qb, kb, block_size)
    m = np.abs(rows - cols) <= window_blocks
    m[:, :global_blocks] = True
    m[:global_blocks, :] = True
    if causal:
        m &= cols <= rows
    return m


def strided(seqlen_q: int, seqlen_k: int, block_size: tuple[int, int], *, stride: int = 4, local_blocks: int = 1,
            causal: bool = True) -> np.ndarray:
    """Sparse Transformer (fixed/strided): each query block sees the `local_blocks` key
    blocks around its diagonal and every `stride`-th key block (summary columns)."""
    errors = _pattern_size_errors(block_size) + _flag_errors(causal=causal) + _count_errors(
        seqlen_q=seqlen_q, seqlen_k=seqlen_k, local_blocks=local_blocks)
    if not _is_int(stride) or stride < 1:
        errors.append(f"stride={stride!r} must be an int >= 1 (every stride-th key block is a summary column)")
    _raise("strided", errors)
    qb, kb = num_blocks(seqlen_q, block_size[0]), num_blocks(seqlen_k, block_size[1])
    rows, cols = _block_centres(qb, kb, block_size)
    m = (np.abs(rows - cols) < local_blocks) | (np.arange(kb)[None, :] % stride == stride - 1)
    if causal:
        m &= cols <= rows
    return m


def document(doc_lengths_q, block_size: tuple[int, int], doc_lengths_k=None, *, causal: bool = False) -> np.ndarray:
    """Packed sequences: documents of the given lengths laid end to end; a block pair is
    computed when the two blocks share a document (the element mask that keeps attention
    inside each document still has to be given, e.g. as `mask` or by varlen; the block
    mask skips the work between documents)."""
    errors = _pattern_size_errors(block_size) + _flag_errors(causal=causal)
    lq = _lengths("doc_lengths_q", doc_lengths_q, errors)
    lk = lq if doc_lengths_k is None else _lengths("doc_lengths_k", doc_lengths_k, errors)
    if lq is not None and lk is not None and lq.shape != lk.shape:
        errors.append(f"doc_lengths_q has {lq.size} documents and doc_lengths_k {lk.size}: they must match")
    _raise("document", errors)
    sq, sk = int(lq.sum()), int(lk.sum())
    bq, bk = block_size
    doc_q = np.repeat(np.arange(lq.size), lq)
    doc_k = np.repeat(np.arange(lk.size), lk)
    qb, kb = num_blocks(sq, bq), num_blocks(sk, bk)
    # A block spans documents [first, last]; two blocks meet when their spans overlap.
    first_q = np.array([doc_q[r * bq] for r in range(qb)])
    last_q = np.array([doc_q[min((r + 1) * bq, sq) - 1] for r in range(qb)])
    first_k = np.array([doc_k[c * bk] for c in range(kb)])
    last_k = np.array([doc_k[min((c + 1) * bk, sk) - 1] for c in range(kb)])
    m = (first_q[:, None] <= last_k[None, :]) & (first_k[None, :] <= last_q[:, None])
    if causal:
        rows, cols = _block_centres(qb, kb, block_size)
        m &= cols <= rows
    return m


def random_blocks(shape: tuple[int, ...], density: float, *, seed: int | None = None, keep_diagonal: bool = True) -> np.ndarray:
    """Each block kept with probability `density` (BigBird's random blocks), over `shape`
    (..., QB, KB); with keep_diagonal, block (r, r) is always kept."""
    errors = _flag_errors(keep_diagonal=keep_diagonal)
    if not (isinstance(shape, (tuple, list)) and len(shape) >= 2 and all(_is_int(s) and s >= 0 for s in shape)):
        errors.append(f"shape={shape!r} must be a tuple of at least two ints >= 0 (..., query blocks, key blocks)")
    if not is_real(density) or not 0.0 <= density <= 1.0:
        errors.append(f"density={density!r} must be a number in [0, 1] (the probability of keeping a block)")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**64):
        errors.append(f"seed={seed!r} must be an int in [0, 2**64) or None")
    _raise("random_blocks", errors)
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng(None if seed is None else int(seed))
    m = rng.random(shape) < density
    if keep_diagonal:
        qb, kb = shape[-2], shape[-1]
        idx = np.arange(min(qb, kb))
        m[..., idx, idx] = True
    return m


def _lengths(name: str, value: Any, errors: list[str]) -> np.ndarray | None:
    """Document lengths as int64, or None with the reason added to `errors`: a 1-D
    sequence of ints >= 0 (a float length would be truncated, a negative one would make
    np.repeat fail)."""
    try:
        given = np.asarray(value)
    except ValueError:  # ragged nesting
        given = None
    if given is None or given.ndim != 1 or (given.size and given.dtype.kind not in "iu") or (
            given.size and given.min() < 0):
        errors.append(f"{name}={value!r} must be a 1-D sequence of ints >= 0 (document lengths)")
        return None
    return given.astype(np.int64)


def _block_centres(qb: int, kb: int, block_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Query and key block indices on one scale (key-block units), for diagonal tests
    when block_q != block_k."""
    bq, bk = block_size
    rows = (np.arange(qb)[:, None] * bq) // bk
    cols = np.arange(kb)[None, :]
    return rows, cols


# ---- compaction, per array library ---------------------------------------------------------


def _namespace(a: Any) -> tuple[Any, str]:
    module = type(a).__module__.split(".")[0]
    if module == "torch":
        import torch

        return torch, "torch"
    if module in ("jax", "jaxlib"):
        import jax.numpy as jnp

        return jnp, "jax"
    if module == "cupy":
        import cupy

        return cupy, "cupy"
    return np, "numpy"


def _broadcast(xp: Any, kind: str, a: Any, shape: tuple[int, ...]) -> Any:
    if tuple(a.shape) == shape:
        return a
    if kind == "torch":
        return a.expand(shape)
    return xp.broadcast_to(a, shape)


def _swap(xp: Any, kind: str, a: Any) -> Any:
    return a.transpose(-1, -2) if kind == "torch" else xp.swapaxes(a, -1, -2)


def _lists(xp: Any, kind: str, mask: Any) -> tuple[Any, Any]:
    """(count, index) along the last axis: index lists the True columns ascending, then
    the False ones (a sort of keys col + n * (not allowed): no data-dependent shapes, so no
    synchronisation)."""
    n = int(mask.shape[-1])
    if kind == "torch":
        import torch

        cols = torch.arange(n, device=mask.device, dtype=torch.int32)
        keys = cols + n * (~mask).to(torch.int32)
        index = torch.sort(keys, dim=-1).values
        index = torch.where(index >= n, index - n, index).to(torch.int32).contiguous()
        count = mask.sum(dim=-1, dtype=torch.int32).contiguous()
        return count, index
    cols = xp.arange(n, dtype=xp.int32)
    keys = cols + n * (~mask).astype(xp.int32)
    index = xp.sort(keys, axis=-1)
    index = xp.where(index >= n, index - n, index).astype(xp.int32)
    count = mask.sum(axis=-1).astype(xp.int32)
    if kind != "jax":
        index, count = xp.ascontiguousarray(index), xp.ascontiguousarray(count)
    return count, index


def _host(a: Any) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    module = type(a).__module__.split(".")[0]
    if module == "torch":
        return a.detach().cpu().numpy()
    if module == "cupy":
        return a.get()
    return np.asarray(a)


def _dense_from_lists(count: np.ndarray, index: np.ndarray) -> np.ndarray:
    n = index.shape[-1]
    valid = np.arange(n) < count[..., None]
    dense = np.zeros(index.shape, dtype=bool)
    where = np.nonzero(valid)
    dense[where[:-1] + (np.clip(index[where], 0, n - 1),)] = True
    return dense


def _list_errors(bs: BlockSparse) -> list[str]:
    errors = []
    arrays = {name: _host(a) for name, a in bs.arrays().items()}
    dense = {}
    for side, count_name, index_name in (("key", "kv_count", "kv_index"), ("query", "q_count", "q_index")):
        count, index = arrays[count_name], arrays[index_name]
        n = index.shape[-1]
        bad = (count < 0) | (count > n)
        if bad.any():
            at = tuple(int(x) for x in np.argwhere(bad)[0])
            errors.append(f"{count_name}[{at}]={int(count[at])} must lie in [0, {n}] (the number of {side} blocks)")
            continue
        valid = np.arange(n) < count[..., None]
        out = valid & ((index < 0) | (index >= n))
        if out.any():
            at = tuple(int(x) for x in np.argwhere(out)[0])
            errors.append(f"{index_name}[{at}]={int(index[at])} is out of range [0, {n})")
            continue
        rising = np.diff(index, axis=-1) > 0
        unordered = valid[..., 1:] & ~rising
        if unordered.any():
            at = tuple(int(x) for x in np.argwhere(unordered)[0])
            nxt = at[:-1] + (at[-1] + 1,)
            errors.append(f"{index_name}[{at}]={int(index[at])} and [{nxt}]={int(index[nxt])}: each list must be "
                          "strictly ascending")
            continue
        dense[side] = _dense_from_lists(count, index)
    if len(dense) == 2 and not np.array_equal(dense["key"], np.swapaxes(dense["query"], -1, -2)):
        diff = np.argwhere(dense["key"] != np.swapaxes(dense["query"], -1, -2))[0]
        at = tuple(int(x) for x in diff)
        errors.append(f"the counts are inconsistent: block {at} is {'in' if dense['key'][at] else 'not in'} the key-block "
                      f"lists but {'in' if not dense['key'][at] else 'not in'} the transposed (query-block) lists")
    return errors
