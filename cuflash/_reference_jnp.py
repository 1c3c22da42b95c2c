"""The reference semantics of cuflash.reference, written in jax.numpy.

cuflash.jax computes with this on platforms without the CUDA kernels (CPU), so code that
uses cuflash.jax runs, jits, differentiates and vmaps anywhere. It follows
cuflash/reference.py formula for formula (read that module's docstring for the
semantics) and, like it, materialises the whole score matrix; it computes in float32
(float64 for float64 inputs) instead of always in float64.

`forward` and `backward` mirror the kernels' contract: backward uses the analytic
gradient with the GIVEN out and lse, and returns the dense score gradient (what the
kernels write into their dbias workspace) for the caller to reduce to the bias's shape.

Fully masked rows: lse = -inf, output 0, and every gradient through them 0, never NaN.
Each -inf that could meet a derivative sits behind the double `where` (the inner `where`
makes the unused branch finite, so its derivative is finite and the outer `where` can
zero it), which also keeps `jax.grad` of `forward` itself NaN-free.

Varlen batches (cu_seqlens_q/k) are one packed problem: every query row is scored
against every key row and rows of different sequences are masked, with positions,
bias, mask, ALiBi slopes and dropout indexed in each sequence's own coordinates. The
cu_seqlens may be traced arrays; only max_seqlen_q/k must be static.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _philox_jnp, reference
from ._options import Options

_HIGHEST = lax.Precision.HIGHEST


def compute_dtype(dtype: Any) -> np.dtype:
    """float32 for half and single precision inputs, float64 for float64."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


@dataclasses.dataclass
class _Geometry:
    """Where each score sits: heads-first operands and the index arrays of the mask.

    Dense: scores (B, H, Nq, Nk). Varlen: one packed problem, scores (1, H, total_q,
    total_k). `aligned` (rows, 1) is the key each query is aligned with (i + off, local
    to its sequence), `key` (1, cols) each key's local position; `slopes`, `bias`, `mask`
    and `keep` are broadcastable to the scores; `same` (varlen only) says which (query,
    key) pairs belong to one sequence."""

    q: Any
    k: Any
    v: Any
    group: int
    scale: float
    aligned: Any
    key: Any
    slopes: Any = None
    bias: Any = None
    mask: Any = None
    keep: Any = None
    same: Any = None
    # varlen only: to scatter the score gradient back to (B, H, max_seqlen_q, max_seqlen_k)
    seg_q: Any = None
    pos_q: Any = None
    pos_k: Any = None


def _block_mask_elements(opts: Options, seqlen_q: int, seqlen_k: int):
    """(B|1, H|1, seqlen_q, seqlen_k) bool: each block of the block mask expanded."""
    bq, bk = opts.block_sparse_size
    blocks = opts.block_mask
    if hasattr(blocks, "kv_index"):  # compact lists back to boolean blocks (traceable)
        count, index = jnp.asarray(blocks.kv_count), jnp.asarray(blocks.kv_index)
        n = index.shape[-1]
        listed = (jnp.arange(n) < count[..., None])[..., None] & (index[..., None] == jnp.arange(n))
        blocks = jnp.any(listed, axis=-2)
    blocks = _pad4(jnp.asarray(blocks))
    nq, nk = -(-seqlen_q // bq), -(-seqlen_k // bk)
    blocks = jnp.broadcast_to(blocks, blocks.shape[:2] + (nq, nk))
    return jnp.repeat(jnp.repeat(blocks, bq, axis=2), bk, axis=3)[:, :, :seqlen_q, :seqlen_k]


def _heads_first(a, opts: Options, varlen: bool):
    if varlen:
        return jnp.transpose(a, (1, 0, 2))[None]  # (total, H, D) -> (1, H, total, D)
    return a if opts.layout == "bhsd" else jnp.transpose(a, (0, 2, 1, 3))


def _caller_layout(a, opts: Options, varlen: bool):
    if varlen:
        return jnp.transpose(a[0], (1, 0, 2))
    return a if opts.layout == "bhsd" else jnp.transpose(a, (0, 2, 1, 3))


def _pad4(a):
    return jnp.reshape(a, (1,) * (4 - a.ndim) + tuple(a.shape))


def _geometry(q, k, v, opts: Options, dtype: np.dtype) -> _Geometry:
    varlen = opts.is_varlen
    qh, kh, vh = (_heads_first(a, opts, varlen).astype(dtype) for a in (q, k, v))
    heads, heads_kv, head_dim = qh.shape[1], kh.shape[1], qh.shape[3]
    group = heads // heads_kv if heads_kv else 1
    scale = opts.scale_for(head_dim)
    slopes = None if opts.alibi_slopes is None else jnp.asarray(opts.alibi_slopes).astype(dtype)
    bias = None if opts.bias is None else _pad4(jnp.asarray(opts.bias).astype(dtype))
    mask = None if opts.mask is None else _pad4(jnp.asarray(opts.mask))
    if opts.block_mask is not None:
        # The block mask is the dense element mask expanding each block, in each
        # sequence's own coordinates: combined with `mask` before any varlen gather.
        seqlen_q = int(opts.max_seqlen_q) if varlen else qh.shape[2]
        seqlen_k = int(opts.max_seqlen_k) if varlen else kh.shape[2]
        blocks = _block_mask_elements(opts, seqlen_q, seqlen_k)
        mask = blocks if mask is None else mask & blocks
    if not varlen:
        batch, seqlen_q, seqlen_k = qh.shape[0], qh.shape[2], kh.shape[2]
        off = seqlen_k - seqlen_q if opts.causal_alignment == "bottom_right" else 0
        off += opts.position_offsets[0] - opts.position_offsets[1]
        keep = None
        if opts.dropout_p > 0:
            keep = _keep_mask(opts, (batch, heads, seqlen_q, seqlen_k))
        if slopes is not None:
            slopes = jnp.broadcast_to(slopes, (batch, heads))[:, :, None, None]
        return _Geometry(q=qh, k=kh, v=vh, group=group, scale=scale,
                         aligned=jnp.arange(seqlen_q)[:, None] + off, key=jnp.arange(seqlen_k)[None, :],
                         slopes=slopes, bias=bias, mask=mask, keep=keep)

    cu_q = jnp.asarray(opts.cu_seqlens_q).astype(jnp.int32)
    cu_k = jnp.asarray(opts.cu_seqlens_k).astype(jnp.int32)
    batch = cu_q.shape[0] - 1
    max_q, max_k = int(opts.max_seqlen_q), int(opts.max_seqlen_k)
    total_q, total_k = qh.shape[2], kh.shape[2]

    def segments(cu, total):
        rows = jnp.arange(total)
        seg = jnp.clip(jnp.searchsorted(cu, rows, side="right") - 1, 0, max(batch - 1, 0))
        inside = (rows >= cu[0]) & (rows < cu[-1])
        return seg, rows - cu[seg], inside

    seg_q, pos_q, in_q = segments(cu_q, total_q)
    seg_k, pos_k, in_k = segments(cu_k, total_k)
    if opts.causal_alignment == "bottom_right":
        off = (jnp.diff(cu_k) - jnp.diff(cu_q))[seg_q]
    else:
        off = jnp.zeros_like(seg_q)
    off = off + (opts.position_offsets[0] - opts.position_offsets[1])
    same = (seg_q[:, None] == seg_k[None, :]) & in_q[:, None] & in_k[None, :]
    # (B, H, max_q, max_k)-broadcastable arrays, read at [b, h, i, j] in sequence coordinates.
    row_q = jnp.clip(pos_q, 0, max(max_q - 1, 0))[:, None]
    row_k = jnp.clip(pos_k, 0, max(max_k - 1, 0))[None, :]

    def gather(full):
        full = jnp.broadcast_to(full, (batch, heads, max_q, max_k))
        return jnp.transpose(full[seg_q[:, None], :, row_q, row_k], (2, 0, 1))[None]  # (1, H, tq, tk)

    keep = None
    if opts.dropout_p > 0:
        keep = gather(jnp.asarray(_keep_mask(opts, (batch, heads, max_q, max_k))))
    if slopes is not None:
        slopes = jnp.transpose(jnp.broadcast_to(slopes, (batch, heads))[seg_q])[None, :, :, None]
    return _Geometry(q=qh, k=kh, v=vh, group=group, scale=scale,
                     aligned=(pos_q + off)[:, None], key=pos_k[None, :], slopes=slopes,
                     bias=None if bias is None else gather(bias),
                     mask=None if mask is None else gather(mask),
                     keep=keep, same=same, seg_q=seg_q, pos_q=pos_q, pos_k=pos_k)


def _keep_mask(opts: Options, shape: tuple[int, int, int, int]):
    """Dropout's keep mask (B, H, Nq, Nk), keyed by global coordinates exactly as the
    kernels key theirs. With a static seed it is the reference's own Philox mask, a
    trace-time constant; with rng_state (uint32 words [seed_lo, seed_hi, offset, 0],
    possibly traced) the same generator runs in jax.numpy on those words."""
    if opts.rng_state is not None:
        return _philox_jnp.keep_mask(opts.rng_state, opts.dropout_p, shape, opts.position_offsets)
    return reference.dropout_keep_mask(opts.seed, opts.dropout_p, shape, position_offsets=opts.position_offsets)


def _repeat_kv(x, group: int):
    return jnp.repeat(x, group, axis=1)


def _sum_groups(x, group: int):
    nb, heads, n, d = x.shape
    return jnp.sum(jnp.reshape(x, (nb, heads // group, group, n, d)), axis=2)


def _scores(g: _Geometry, opts: Options):
    """x = scaled q.k (before softcap) and s, the final score, -inf where not allowed."""
    x = g.scale * jnp.einsum("bhid,bhjd->bhij", g.q, _repeat_kv(g.k, g.group), precision=_HIGHEST)
    s = opts.softcap * jnp.tanh(x / opts.softcap) if opts.softcap > 0 else x
    if g.slopes is not None:
        s = s - g.slopes * jnp.abs(g.aligned - g.key).astype(s.dtype)
    if g.bias is not None:
        s = s + g.bias
    allowed = jnp.ones(s.shape, dtype=bool)
    if g.mask is not None:
        allowed &= g.mask
    if opts.causal:
        allowed &= g.key <= g.aligned
    left, right = opts.window_size
    # A side wider than every query-key distance bounds nothing; kept as given it would not
    # fit the int32 positions (window_size=(2**40, 0) is valid).
    span = g.aligned.shape[0] + g.key.shape[1] + abs(opts.position_offsets[0] - opts.position_offsets[1])
    if 0 <= left <= span:
        allowed &= g.key >= g.aligned - left
    if 0 <= right <= span:
        allowed &= g.key <= g.aligned + right
    if g.same is not None:
        allowed &= g.same
    # -inf, not a large negative number: a masked key then adds exactly nothing and a row
    # with no allowed key is recognised by its lse of -inf (as in cuflash.reference).
    return x, jnp.where(allowed, s, -jnp.inf)


def _logsumexp(s):
    row_max = jnp.max(s, axis=-1, initial=-jnp.inf)
    # Only rows with no allowed key are dead (lse -inf); a NaN or +inf score is no mask
    # and makes the row NaN, as softmax(QKᵀ)V evaluated directly does.
    live = row_max != -jnp.inf
    # lse does not depend on the shift, so it carries no gradient.
    shift = lax.stop_gradient(jnp.where(live, row_max, 0.0))
    total = jnp.sum(jnp.exp(s - shift[..., None]), axis=-1)
    return jnp.where(live, jnp.log(jnp.where(live, total, 1.0)) + shift, -jnp.inf)


def _probabilities(s, lse):
    """exp(s - lse), exactly 0 on rows whose lse is -inf."""
    live = (lse != -jnp.inf)[..., None]
    return jnp.where(live, jnp.exp(s - jnp.where(live, lse[..., None], 0.0)), 0.0)


def _dropped(g: _Geometry, opts: Options, a):
    if g.keep is None:
        return a
    return a * g.keep / (1.0 - opts.dropout_p)


def forward(q, k, v, opts: Options):
    """(out, lse) with cuflash.reference.forward's semantics; `opts` holds the option arrays
    (bias, mask, alibi_slopes, cu_seqlens_q/k) as JAX arrays and, for varlen, static
    max_seqlen_q/k. out has q's dtype; lse is float32 (float64 for float64 inputs)."""
    dtype = compute_dtype(q.dtype)
    g = _geometry(q, k, v, opts, dtype)
    _, s = _scores(g, opts)
    lse = _logsumexp(s)
    p = _dropped(g, opts, _probabilities(s, lse))
    out = jnp.einsum("bhij,bhjd->bhid", p, _repeat_kv(g.v, g.group), precision=_HIGHEST)
    varlen = opts.is_varlen
    return _caller_layout(out, opts, varlen).astype(q.dtype), (lse[0] if varlen else lse)


def backward(dout, q, k, v, out, lse, opts: Options):
    """(dq, dk, dv, dscores): the analytic gradients given out and lse, as the kernels
    compute them (see cuflash.reference.backward), and the score gradient dL/ds as a
    dense (B, H, seqlen_q, seqlen_k) array (None without a bias) for the caller to reduce
    to the bias's shape. dq, dk, dv have their inputs' dtypes."""
    dtype = compute_dtype(q.dtype)
    varlen = opts.is_varlen
    g = _geometry(q, k, v, opts, dtype)
    dout_h = _heads_first(dout, opts, varlen).astype(dtype)
    out_h = _heads_first(out, opts, varlen).astype(dtype)
    lse = jnp.asarray(lse).astype(dtype)
    lse = lse[None] if varlen else lse
    x, s = _scores(g, opts)
    p = _probabilities(s, lse)
    dv = jnp.einsum("bhij,bhid->bhjd", _dropped(g, opts, p), dout_h, precision=_HIGHEST)
    dp = _dropped(g, opts, jnp.einsum("bhid,bhjd->bhij", dout_h, _repeat_kv(g.v, g.group), precision=_HIGHEST))
    d_row = jnp.sum(dout_h * out_h, axis=-1)
    ds = p * (dp - d_row[..., None])
    dx = ds * (1.0 - jnp.tanh(x / opts.softcap) ** 2) if opts.softcap > 0 else ds
    dq = g.scale * jnp.einsum("bhij,bhjd->bhid", dx, _repeat_kv(g.k, g.group), precision=_HIGHEST)
    dk = g.scale * jnp.einsum("bhij,bhid->bhjd", dx, g.q, precision=_HIGHEST)
    grads = (
        _caller_layout(dq, opts, varlen).astype(q.dtype),
        _caller_layout(_sum_groups(dk, g.group), opts, varlen).astype(k.dtype),
        _caller_layout(_sum_groups(dv, g.group), opts, varlen).astype(v.dtype),
    )
    if opts.bias is None:
        return grads + (None,)
    if not varlen:
        return grads + (ds,)
    batch, heads = jnp.asarray(opts.cu_seqlens_q).shape[0] - 1, g.q.shape[1]
    max_q, max_k = int(opts.max_seqlen_q), int(opts.max_seqlen_k)
    ds_rows = jnp.transpose(jnp.where(g.same, ds, 0.0)[0], (1, 2, 0))  # (tq, tk, H)
    full = jnp.zeros((batch, heads, max_q, max_k), dtype)
    full = full.at[g.seg_q[:, None], :, g.pos_q[:, None], g.pos_k[None, :]].add(ds_rows, mode="drop")
    return grads + (full,)
