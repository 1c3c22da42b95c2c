"""The float64 reference: the semantics every cuflash kernel must match.

Short and obviously right rather than fast. Every input is converted to float64 and each
option is one line of the score formula. The score matrix is formed a block of query rows
at a time (at most BLOCK_ELEMENTS scores per block), each block exactly as the whole
matrix would be: a row's softmax needs only its own scores, the backward sums dk, dv and a
broadcast bias gradient over the blocks, and dropout keys on global coordinates. Memory is
O(N * block), not O(N^2), beyond outputs that are N x N by definition (probabilities(), a
full-size bias gradient). For batch b, query head h (kv head h // group), query i and key j, local to the sequence:

    off     = Nk - Nq for causal_alignment="bottom_right" (FlashAttention), 0 for "top_left"
              (PyTorch's is_causal), plus q_start - k_start (position_offsets: query i
              sits at global position q_start + i, key j at k_start + j); query i is
              aligned with key i + off
    x       = softmax_scale * q[b, i, h] . k[b, j, h // group]      (scale: 1/sqrt(D))
    s       = softcap * tanh(x / softcap)                            (if softcap > 0)
            - slope[b, h] * |i + off - j|                            (ALiBi)
            + bias[b, h, i, j]                                       (bias broadcasts)
    allowed = mask[b, h, i, j] and block_mask[b, h, i // block_q, j // block_k]
              and (not causal or j <= i + off)
              and (left == -1 or j >= i + off - left) and (right == -1 or j <= i + off + right)
    s       = -inf where not allowed
    lse     = log(sum_j exp(s))         (-inf for a row with no allowed key)
    p       = exp(s - lse)              (0 on such a row)

Non-finite inputs are not masks: a NaN score makes its row's lse and p NaN, and a +inf
score gives p = exp(inf - inf) = NaN, as softmax(QKᵀ)V evaluated directly does. Dropout
draws by global coordinates (b, h, q_start + i, k_start + j); an rng_state [seed, offset]
stands for seed and dropout_offset (its offset's low 32 bits).
    out     = sum_j p * keep / (1 - dropout_p) * v[b, j, h // group]

Varlen (cu_seqlens_q/k given) is defined as running each sequence alone, with bias, mask
and dropout_mask indexed [b, h, i, j] in the sequence's own coordinates. backward() uses
the analytic gradient with the given out and lse, exactly as a kernel does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ._options import make_options, option_errors
from ._philox import philox_words

_DEFAULTS: dict[str, Any] = dict(
    softmax_scale=None,
    causal=False,
    causal_alignment="bottom_right",
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    bias=None,
    mask=None,
    block_mask=None,
    block_size=None,
    dropout_p=0.0,
    seed=None,
    rng_state=None,
    position_offsets=(0, 0),
    dropout_mask=None,
    dropout_offset=0,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    layout="bshd",
    deterministic=False,
    q_descale=None,
    k_descale=None,
    v_descale=None,
)


def forward(q, k, v, *, softmax_scale=None, causal=False, causal_alignment="bottom_right",
            window_size=(-1, -1), softcap=0.0, alibi_slopes=None, bias=None, mask=None,
            block_mask=None, block_size=None, dropout_p=0.0, seed=None, rng_state=None, position_offsets=(0, 0), dropout_mask=None, dropout_offset=0,
            cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
            layout="bshd", deterministic=False, q_descale=None, k_descale=None,
            v_descale=None) -> tuple[np.ndarray, np.ndarray]:
    """Attention output and log-sum-exp, both float64.

    Shapes: layout "bshd": q (B, Nq, H, D), k/v (B, Nk, Hkv, D); "bhsd": q (B, H, Nq, D),
    k/v (B, Hkv, Nk, D); out has q's layout and lse is (B, H, Nq). Varlen (layout ignored):
    q (total_q, H, D), k/v (total_k, Hkv, D), out (total_q, H, D), lse (H, total_q).
    `deterministic` is accepted and ignored: the reference has no reduction order to fix.
    float8_e4m3fn inputs stand for q * q_descale, k * k_descale, v * v_descale (None means
    1; shapes in cuflash.fp8), dequantised exactly in float64.
    """
    options = {name: value for name, value in locals().items() if name not in ("q", "k", "v")}
    problem = _Problem.build(q, k, v, options)
    outs, lses = [], []
    for seg in problem.segments:
        q_seg, k_seg, v_seg = seg.take(problem, q=problem.q, k=problem.k, v=problem.v)
        k_rep, v_rep = _repeat_kv(k_seg, problem.group), _repeat_kv(v_seg, problem.group)
        nb, heads, seqlen_q = q_seg.shape[:3]
        out = np.zeros((nb, heads, seqlen_q, problem.value_dim))
        lse = np.empty((nb, heads, seqlen_q))
        for rows in _row_blocks(q_seg, k_seg):
            _, s = _scores(problem, seg, q_seg[:, :, rows], k_rep, rows, seqlen_q)
            lse[:, :, rows] = _logsumexp(s)
            keep = _keep(problem, seg, rows, s.shape)
            p_drop = _dropped(problem, keep, _probabilities(s, lse[:, :, rows]))
            out[:, :, rows] = np.einsum("bhij,bhjd->bhid", p_drop, v_rep)
        outs.append(out)
        lses.append(lse)
    out_shape = problem.q.shape[:-1] + (problem.value_dim,)
    return problem.put(outs, out_shape, "rows_q"), problem.put_lse(lses)


def backward(dout, q, k, v, out, lse, **options) -> tuple[np.ndarray, ...]:
    """Gradients (dq, dk, dv), plus dbias (bias's own shape) when a bias is given; float64.

    Takes forward()'s options. Uses the analytic formulas with the GIVEN out and lse, as a
    kernel does:  p = exp(s - lse) (0 where lse = -inf),  dv = p_drop^T dout,
    dp = (dout v^T) * keep / (1 - dropout_p),  ds = p * (dp - rowsum(dout * out)),
    dx = ds * (1 - tanh(x / softcap)**2) (ds without softcap),  dq = scale * dx k,
    dk = scale * dx^T q;  dk and dv summed over the query heads of each kv group.
    """
    problem = _Problem.build(q, k, v, _with_defaults(options), dout=dout, out=out, lse=lse)
    softcap = problem.options["softcap"]
    # The bias gradient in the bias's own shape (left-padded to 4-D), summed block by block
    # over the axes the bias was broadcast along.
    dbias = None if problem.bias is None else np.zeros((1,) * (4 - len(problem.bias_shape)) + problem.bias_shape)
    dqs, dks, dvs = [], [], []
    for seg in problem.segments:
        q_seg, k_seg, v_seg, dout_seg, out_seg = seg.take(
            problem, q=problem.q, k=problem.k, v=problem.v, dout=problem.dout, out=problem.out
        )
        k_rep, v_rep = _repeat_kv(k_seg, problem.group), _repeat_kv(v_seg, problem.group)
        lse_seg = seg.take_lse(problem)
        seqlen_q = q_seg.shape[2]
        d_row = np.sum(dout_seg * out_seg, axis=-1)
        dq = np.zeros(q_seg.shape)
        dk, dv = np.zeros(k_rep.shape), np.zeros(v_rep.shape)
        for rows in _row_blocks(q_seg, k_seg):
            x, s = _scores(problem, seg, q_seg[:, :, rows], k_rep, rows, seqlen_q)
            p = _probabilities(s, lse_seg[:, :, rows])
            keep = _keep(problem, seg, rows, s.shape)
            dv += np.einsum("bhij,bhid->bhjd", _dropped(problem, keep, p), dout_seg[:, :, rows])
            dp = _dropped(problem, keep, np.einsum("bhid,bhjd->bhij", dout_seg[:, :, rows], v_rep))
            ds = p * (dp - d_row[:, :, rows, None])  # dL/ds: the score after softcap, ALiBi and bias
            dx = ds * (1.0 - np.tanh(x / softcap) ** 2) if softcap > 0 else ds
            dk += problem.scale * np.einsum("bhij,bhid->bhjd", dx, q_seg[:, :, rows])
            dq[:, :, rows] = problem.scale * np.einsum("bhij,bhjd->bhid", dx, k_rep)
            if dbias is not None:
                _add_to_broadcast(dbias, ds, seg.batch, rows)
        dqs.append(dq)
        dks.append(_sum_groups(dk, problem.heads_kv))
        dvs.append(_sum_groups(dv, problem.heads_kv))
    grads = (
        problem.put(dqs, problem.q.shape, "rows_q"),
        problem.put(dks, problem.k.shape, "rows_k"),
        problem.put(dvs, problem.v.shape, "rows_k"),
    )
    if dbias is None:
        return grads
    return grads + (dbias.reshape(problem.bias_shape),)


def probabilities(q, k, v, **options) -> np.ndarray:
    """Softmax probabilities P (B, H, Nq, Nk) before dropout, float64; 0 on fully masked
    rows. Takes forward()'s options; not defined for varlen (ValueError)."""
    options = _with_defaults(options)
    if options["cu_seqlens_q"] is not None or options["cu_seqlens_k"] is not None:
        raise ValueError("probabilities() is not defined for varlen (cu_seqlens_q/k given)")
    problem = _Problem.build(q, k, v, options)
    (seg,) = problem.segments
    q_seg, k_seg = seg.take(problem, q=problem.q, k=problem.k)
    k_rep = _repeat_kv(k_seg, problem.group)
    seqlen_q = q_seg.shape[2]
    probs = np.zeros(q_seg.shape[:3] + (k_seg.shape[2],))
    for rows in _row_blocks(q_seg, k_seg):
        _, s = _scores(problem, seg, q_seg[:, :, rows], k_rep, rows, seqlen_q)
        probs[:, :, rows] = _probabilities(s, _logsumexp(s))
    return probs


def dropout_keep_mask(seed: int, dropout_p: float, shape: tuple[int, int, int, int],
                      offset: int = 0, batch_offset: int = 0,
                      position_offsets: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Which attention probabilities dropout keeps: a bool array of `shape` = (B, H, Nq, Nk).

    Keyed by global coordinates only, never by tiling, so kernels with any block sizes (and
    forward and backward) regenerate the same mask. Element (b, h, i, j) is kept when

        word = Philox4x32-10(counter, key)[2 * ((i >> 3) & 1) + (j & 1)] >= threshold
        counter = (j >> 1, (i >> 4) * 8 + (i & 7), (batch_offset + b) * H + h, offset)
        key = (seed & 0xffffffff, seed >> 32),  threshold = floor(dropout_p * 2**32)

    (every counter word mod 2**32), where i and j are global positions: the local row and
    column plus position_offsets (q_start, k_start). One Philox call serves rows i, i + 8 of a 16-row group
    and columns j, j + 1: exactly the four accumulator elements one thread holds in an
    m16n8 tensor-core fragment, so a kernel thread makes one call per fragment.
    """
    if seed is None or not _is_int(seed) or not 0 <= seed < 2**64:
        raise ValueError(f"seed={seed!r} must be an int in [0, 2**64)")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p!r} must satisfy 0 <= dropout_p < 1")
    if len(shape) != 4 or any(n < 0 for n in shape):
        raise ValueError(f"shape={shape!r} must be (batch, heads, seqlen_q, seqlen_k)")
    batch, heads, seqlen_q, seqlen_k = (int(n) for n in shape)
    q_start, k_start = (int(x) for x in position_offsets)
    return _keep_rows(seed, dropout_p, batch, heads, q_start + np.arange(seqlen_q), seqlen_k, offset, batch_offset,
                      k_start)


def _keep_rows(seed: int, dropout_p: float, batch: int, heads: int, rows: np.ndarray, seqlen_k: int,
               offset: int, batch_offset: int, col0: int = 0) -> np.ndarray:
    """dropout_keep_mask's rows `rows` (global query positions) against keys col0 ..
    col0 + seqlen_k - 1, (B, H, len(rows), Nk): each element is a function of its own
    coordinates, so any block of rows is the same slice of the whole mask."""
    # dropout_p * 2**32 is exact in float64 (a power-of-two scaling), so floor is exact.
    threshold = min(math.floor(dropout_p * 2**32), 2**32 - 1)
    cols = col0 + np.arange(seqlen_k)
    pair0 = col0 >> 1  # the first column pair (one Philox counter serves columns 2c, 2c + 1)
    row_counter = (rows >> 4) * 8 + (rows & 7)  # rows i and i + 8 share a counter
    counters, which = np.unique(row_counter, return_inverse=True)
    batch_head = (batch_offset * heads + np.arange(batch * heads)) % 2**32  # (b + offset) * H + h
    # One Philox call per distinct (batch * head, row counter, column pair) ...
    words = np.stack(
        philox_words(
            (pair0 + np.arange(((col0 + seqlen_k + 1) >> 1) - pair0))[None, None, :] % 2**32,
            counters[None, :, None] % 2**32,
            batch_head[:, None, None],
            offset % 2**32,
            seed & 0xFFFFFFFF,
            (seed >> 32) & 0xFFFFFFFF,
        ),
        axis=-1,
    )
    # ... then each element picks its word out of its call's four.
    word_index = 2 * ((rows[:, None] >> 3) & 1) + (cols[None, :] & 1)
    picked = words[:, which.reshape(-1)[:, None], ((cols >> 1) - pair0)[None, :], word_index]
    return (picked >= threshold).reshape(batch, heads, len(rows), seqlen_k)


# ---------------------------------------------------------------------------------------
# The math, on one segment: a batch (dense) or one sequence (varlen), heads first,
# q (nb, H, Nq, D), k and v (nb, Hkv, Nk, D).


# Scores per block of query rows: each block holds at most this many (nb * H * rows * Nk),
# and at least one row. 2**22 float64 scores are 32 MiB; a block makes a few such arrays.
BLOCK_ELEMENTS = 2**22


def _row_blocks(q: np.ndarray, k: np.ndarray) -> list[slice]:
    """Blocks of the query rows of q (nb, H, Nq, D) against k (nb, Hkv, Nk, D)."""
    nb, heads, seqlen_q = q.shape[:3]
    rows = max(1, BLOCK_ELEMENTS // max(1, nb * heads * k.shape[2]))
    return [slice(start, min(start + rows, seqlen_q)) for start in range(0, seqlen_q, rows)]


def _scores(problem: "_Problem", seg: "_Segment", q: np.ndarray, k_rep: np.ndarray, rows: slice,
            seqlen_q: int):
    """x = scaled q.k (before softcap) and the final score s with -inf where masked, both
    (nb, H, rows, Nk), for the query rows `rows` of a segment of seqlen_q queries; q holds
    those rows, k_rep every key with its heads repeated to the query heads."""
    opts = problem.options
    seqlen_k = k_rep.shape[2]
    x = problem.scale * np.einsum("bhid,bhjd->bhij", q, k_rep)
    softcap = opts["softcap"]
    s = softcap * np.tanh(x / softcap) if softcap > 0 else x
    off = seqlen_k - seqlen_q if opts["causal_alignment"] == "bottom_right" else 0
    q_start, k_start = opts["position_offsets"]
    off += q_start - k_start
    aligned = np.arange(rows.start, rows.stop)[:, None] + off  # the key each query is aligned with
    key = np.arange(seqlen_k)[None, :]
    if problem.slopes is not None:
        s = s - problem.slopes[seg.batch][:, :, None, None] * np.abs(aligned - key)
    if problem.bias is not None:
        s = s + problem.bias[seg.batch, :, rows, :seqlen_k]
    allowed = np.ones(s.shape, dtype=bool)
    if problem.mask is not None:
        allowed &= problem.mask[seg.batch, :, rows, :seqlen_k]
    if opts["causal"]:
        allowed &= key <= aligned
    left, right = opts["window_size"]
    # A side wider than every query-key distance bounds nothing (and kept as given it could
    # overflow the int64 index arithmetic: window_size=(2**70, 0) is valid).
    span = seqlen_q + seqlen_k + abs(q_start - k_start)
    if 0 <= left <= span:
        allowed &= key >= aligned - left
    if 0 <= right <= span:
        allowed &= key <= aligned + right
    # -inf, not a large negative number: exp(-inf) is exactly 0, so a masked key adds
    # nothing whatever the other scores are, and a row with no allowed key gets
    # lse = -inf, which is how fully masked rows are recognised (also in backward).
    return x, np.where(allowed, s, -np.inf)


def _logsumexp(s: np.ndarray) -> np.ndarray:
    """log(sum(exp(s))) over the last axis, shifted by the row max so exp cannot overflow.
    A row of only -inf (no allowed key, or Nk = 0) gives -inf, not NaN."""
    row_max = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    # Only a row of -inf (no allowed key) is shifted by 0; a NaN or +inf max (non-finite
    # scores, not masks) makes the lse NaN, as in softmax(QKᵀ)V evaluated directly.
    shift = np.where(row_max == -np.inf, 0.0, row_max)
    with np.errstate(divide="ignore", invalid="ignore"):  # log(0) = -inf on fully masked rows, on purpose
        return np.log(np.sum(np.exp(s - shift), axis=-1)) + shift[..., 0]


def _probabilities(s: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """p = exp(s - lse), and exactly 0 on rows whose lse is -inf (fully masked)."""
    lse = lse[..., None]
    live = lse != -np.inf  # NaN and +inf rows (non-finite scores) stay live and give NaN
    with np.errstate(over="ignore", invalid="ignore"):
        return np.where(live, np.exp(s - np.where(live, lse, 0.0)), 0.0)


def _keep(problem: "_Problem", seg: "_Segment", rows: slice, shape: tuple[int, ...]) -> np.ndarray | None:
    """Dropout's keep mask for the query rows `rows` of a segment, `shape` (nb, H, rows, Nk);
    None without dropout."""
    opts = problem.options
    seqlen_k = shape[3]
    if problem.dropout_mask is not None:
        return problem.dropout_mask[seg.batch, :, rows, :seqlen_k]
    if opts["dropout_p"] > 0:
        seed, offset = opts["seed"], opts["dropout_offset"]
        if opts["rng_state"] is not None:  # [seed, offset] as the kernels read it: the offset's low 32 bits
            state = np.asarray(opts["rng_state"]).astype(np.uint64)
            seed, offset = int(state[0]), int(state[1]) & 0xFFFFFFFF
        q_start, k_start = opts["position_offsets"]
        return _keep_rows(seed, opts["dropout_p"], shape[0], shape[1], q_start + np.arange(rows.start, rows.stop),
                          seqlen_k, offset, seg.batch.start, k_start)
    return None


def _dropped(problem: "_Problem", keep: np.ndarray | None, a: np.ndarray) -> np.ndarray:
    """a * keep / (1 - dropout_p); a unchanged without dropout."""
    if keep is None:
        return a
    return a * keep / (1.0 - problem.options["dropout_p"])


def _repeat_kv(x: np.ndarray, group: int) -> np.ndarray:
    """(nb, Hkv, N, D) -> (nb, H, N, D): query head h reads kv head h // group."""
    return np.repeat(x, group, axis=1)


def _sum_groups(x: np.ndarray, heads_kv: int) -> np.ndarray:
    """(nb, H, N, D) -> (nb, Hkv, N, D): sum the gradients of the query heads of a group."""
    nb, heads, n, d = x.shape
    group = heads // heads_kv if heads_kv else 0
    return x.reshape(nb, heads_kv, group, n, d).sum(axis=2)


def _add_to_broadcast(total: np.ndarray, ds: np.ndarray, batch: slice, rows: slice) -> None:
    """Add a block of score gradients ds (nb, H, rows, Nk), at batches `batch`, query rows
    `rows` and keys 0..Nk of the scores, into `total`: the gradient of a 4-D array that was
    broadcast to the scores, summed over the axes it was broadcast along (its size-1 axes)."""
    axes = tuple(a for a in range(4) if total.shape[a] == 1 and ds.shape[a] != 1)
    block = ds.sum(axis=axes, keepdims=True)
    where = (
        slice(None) if total.shape[0] == 1 else batch,
        slice(None),
        slice(None) if total.shape[2] == 1 else rows,
        slice(None) if total.shape[3] == 1 else slice(0, ds.shape[3]),
    )
    total[where] += block


# ---------------------------------------------------------------------------------------
# Shapes: checking, splitting into segments, and putting the results back.


@dataclasses.dataclass(frozen=True)
class _Segment:
    """The part of the problem run as one dense attention: all batches (dense) or one
    sequence (varlen), with its rows in the packed q and k (varlen only)."""

    batch: slice
    rows_q: slice
    rows_k: slice

    def take(self, problem: "_Problem", **arrays: np.ndarray) -> list[np.ndarray]:
        """This segment's part of each array, heads first: (nb, heads, N, D). Arrays named
        k and v are cut by rows_k, all others by rows_q."""
        taken = []
        for name, a in arrays.items():
            if not problem.varlen:
                taken.append(a if problem.options["layout"] == "bhsd" else a.transpose(0, 2, 1, 3))
            else:
                rows = self.rows_k if name in ("k", "v") else self.rows_q
                taken.append(a[rows].transpose(1, 0, 2)[None])
        return taken

    def take_lse(self, problem: "_Problem") -> np.ndarray:
        """This segment's lse, (nb, H, Nq)."""
        return problem.lse[:, self.rows_q][None] if problem.varlen else problem.lse


@dataclasses.dataclass
class _Problem:
    """Inputs as float64, the options with defaults filled in, and the segments."""

    options: dict[str, Any]
    varlen: bool
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    batch: int
    heads: int
    heads_kv: int
    seqlen_q: int  # max_seqlen_q for varlen
    seqlen_k: int
    value_dim: int
    scale: float
    segments: list[_Segment]
    slopes: np.ndarray | None = None  # (B, H)
    bias: np.ndarray | None = None  # broadcast view, (B, H, seqlen_q, seqlen_k)
    bias_shape: tuple[int, ...] = ()
    mask: np.ndarray | None = None  # broadcast view, (B, H, seqlen_q, seqlen_k)
    dropout_mask: np.ndarray | None = None  # broadcast view, (B, H, seqlen_q, seqlen_k)
    dout: np.ndarray | None = None
    out: np.ndarray | None = None
    lse: np.ndarray | None = None

    @property
    def group(self) -> int:
        return self.heads // self.heads_kv if self.heads_kv else 1

    @classmethod
    def build(cls, q, k, v, options, dout=None, out=None, lse=None) -> "_Problem":
        errors: list[str] = []
        from .fp8 import is_e4m3

        is_fp8 = any(is_e4m3(a) for a in (q, k, v))
        q, k, v = (_float64(a) for a in (q, k, v))
        opts = dict(options)
        scalar_opts = make_options(**{n: opts[n] for n in _SCALAR_OPTION_NAMES})
        # The canonical spellings (window_size as a tuple, None softcap as 0.0, ...).
        opts.update({n: getattr(scalar_opts, n) for n in _SCALAR_OPTION_NAMES})
        errors += option_errors(scalar_opts)
        offset = opts["dropout_offset"]
        if not _is_int(offset) or offset < 0:
            errors.append(f"dropout_offset={offset!r} must be a non-negative int")
        varlen = opts["cu_seqlens_q"] is not None or opts["cu_seqlens_k"] is not None
        if errors:
            _raise(errors)  # the shape checks below rely on sane options
        if varlen:
            dims, segments = _varlen_dims(q, k, v, opts, errors)
        else:
            dims, segments = _dense_dims(q, k, v, opts, errors)
        if errors:
            _raise(errors)
        batch, heads, heads_kv, seqlen_q, seqlen_k, head_dim, value_dim = dims
        q, k, v = _dequantized(q, k, v, opts, dims, varlen, is_fp8, dout is not None or out is not None, errors)
        if errors:
            _raise(errors)
        problem = cls(
            options=opts, varlen=varlen, q=q, k=k, v=v, batch=batch, heads=heads,
            heads_kv=heads_kv, seqlen_q=seqlen_q, seqlen_k=seqlen_k, value_dim=value_dim,
            scale=scalar_opts.scale_for(head_dim), segments=segments,
        )
        problem._attach_option_arrays(errors)
        problem._attach_gradient_inputs(dout, out, lse, errors)
        if errors:
            _raise(errors)
        return problem

    def _attach_option_arrays(self, errors: list[str]) -> None:
        opts = self.options
        scores_shape = (self.batch, self.heads, self.seqlen_q, self.seqlen_k)
        slopes = opts["alibi_slopes"]
        if slopes is not None:
            slopes = _float64(slopes)
            if slopes.shape not in ((self.heads,), (self.batch, self.heads)):
                errors.append(f"alibi_slopes has shape {slopes.shape}; expected "
                              f"({self.heads},) or ({self.batch}, {self.heads})")
            else:
                self.slopes = np.broadcast_to(slopes, (self.batch, self.heads))
        if opts["bias"] is not None:
            bias = _float64(opts["bias"])
            self.bias_shape = bias.shape
            self.bias = _broadcast("bias", bias, scores_shape, errors)
        if opts["block_mask"] is not None:
            self._attach_block_mask(scores_shape, errors)
        for name in ("mask", "dropout_mask"):
            if opts[name] is not None:
                array = np.asarray(opts[name])
                if array.dtype != np.bool_:
                    errors.append(f"{name} has dtype {array.dtype}; it must be bool "
                                  "(True = attend / keep)")
                else:
                    combined = _broadcast(name, array, scores_shape, errors)
                    if name == "mask" and self.mask is not None and combined is not None:
                        combined = combined & self.mask  # the block mask, expanded
                    setattr(self, name, combined)
        if opts["dropout_p"] > 0 and opts["dropout_mask"] is None and opts["seed"] is None and opts["rng_state"] is None:
            errors.append(f"seed=None but dropout_p={opts['dropout_p']!r} > 0: dropout needs "
                          "a seed (or an explicit dropout_mask)")

    def _attach_block_mask(self, scores_shape: tuple[int, ...], errors: list[str]) -> None:
        """The block mask as the dense element mask it stands for: every block expanded to
        block_q x block_k elements (in the sequence's own coordinates), cut to the
        sequence lengths; AND-ed with `mask` by the caller."""
        from . import block_sparse

        opts = self.options
        blocks = opts["block_mask"]
        size = getattr(blocks, "block_size", None) if hasattr(blocks, "kv_index") else opts["block_size"]
        found = block_sparse.block_size_errors(size)
        if found:
            errors += found
            return
        if hasattr(blocks, "kv_index"):
            blocks = blocks.to_dense()
        blocks = np.asarray(blocks)
        if blocks.dtype != np.bool_:
            errors.append(f"block_mask has dtype {blocks.dtype}; it must be bool (True = compute the block)")
            return
        want = scores_shape[:2] + (block_sparse.num_blocks(self.seqlen_q, size[0]),
                                   block_sparse.num_blocks(self.seqlen_k, size[1]))
        try:
            blocks = np.broadcast_to(blocks, want)
        except ValueError:
            errors.append(f"block_mask has shape {blocks.shape}, which does not broadcast to "
                          f"(batch, heads, query blocks, key blocks) = {want}")
            return
        self.mask = block_sparse.expand(blocks, size, self.seqlen_q, self.seqlen_k)

    def _attach_gradient_inputs(self, dout, out, lse, errors: list[str]) -> None:
        if dout is None and out is None and lse is None:
            return
        out_shape = self.q.shape[:-1] + (self.value_dim,)
        if self.varlen:
            lse_shape = (self.heads, self.q.shape[0])
        else:
            lse_shape = (self.batch, self.heads, self.seqlen_q)
        expected = (("dout", dout, out_shape), ("out", out, out_shape), ("lse", lse, lse_shape))
        for name, array, shape in expected:
            array = _float64(array)
            if array.shape != shape:
                errors.append(f"{name} has shape {array.shape}; expected {shape}")
            setattr(self, name, array)

    # Putting per-segment results (heads first) back into the caller's layout.

    def put(self, parts: list[np.ndarray], shape: tuple[int, ...], rows: str) -> np.ndarray:
        """Segments' results (nb, heads, N, dim) as one array of `shape` in the caller's
        layout; `rows` names the segment field ("rows_q" or "rows_k") that places them."""
        if not self.varlen:
            (part,) = parts
            return part if self.options["layout"] == "bhsd" else part.transpose(0, 2, 1, 3)
        # Rows past the last sequence (total > cu_seqlens[-1]) belong to no sequence: 0.
        packed = np.zeros(shape)
        for seg, part in zip(self.segments, parts):
            packed[getattr(seg, rows)] = part[0].transpose(1, 0, 2)
        return packed

    def put_lse(self, parts: list[np.ndarray]) -> np.ndarray:
        if not self.varlen:
            return parts[0]
        packed = np.full((self.heads, self.q.shape[0]), -np.inf)
        for seg, part in zip(self.segments, parts):
            packed[:, seg.rows_q] = part[0]
        return packed


_SCALAR_OPTION_NAMES = ("softmax_scale", "causal", "causal_alignment", "window_size",
                        "softcap", "dropout_p", "seed", "max_seqlen_q", "max_seqlen_k",
                        "deterministic", "layout", "position_offsets")


def _dense_dims(q, k, v, opts, errors):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        errors.append(f"q, k, v must be 4-D ({opts['layout']}); got shapes "
                      f"{q.shape}, {k.shape}, {v.shape}")
        return None, None
    if opts["layout"] == "bhsd":
        (batch, heads, seqlen_q, head_dim), (_, heads_kv, seqlen_k, _) = q.shape, k.shape
        v_heads, v_seqlen = v.shape[1], v.shape[2]
    else:
        (batch, seqlen_q, heads, head_dim), (_, seqlen_k, heads_kv, _) = q.shape, k.shape
        v_heads, v_seqlen = v.shape[2], v.shape[1]
    if not k.shape[0] == v.shape[0] == batch:
        errors.append(f"batch sizes differ: q {q.shape}, k {k.shape}, v {v.shape}")
    if (v_heads, v_seqlen) != (heads_kv, seqlen_k):
        errors.append(f"k {k.shape} and v {v.shape} differ in heads or seqlen ({opts['layout']})")
    _check_heads_and_dim(q.shape, k.shape, heads, heads_kv, head_dim, k.shape[-1], errors)
    dims = (batch, heads, heads_kv, seqlen_q, seqlen_k, head_dim, v.shape[-1])
    return dims, [_Segment(batch=slice(0, batch), rows_q=slice(None), rows_k=slice(None))]


def _varlen_dims(q, k, v, opts, errors):
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        errors.append(f"varlen q, k, v must be 3-D (total, heads, dim); got shapes "
                      f"{q.shape}, {k.shape}, {v.shape}")
        return None, None
    (total_q, heads, head_dim), (total_k, heads_kv, _) = q.shape, k.shape
    if v.shape[:2] != (total_k, heads_kv):
        errors.append(f"k {k.shape} and v {v.shape} differ in total_k or heads")
    _check_heads_and_dim(q.shape, k.shape, heads, heads_kv, head_dim, k.shape[-1], errors)
    cu = {}
    for name, total in (("cu_seqlens_q", total_q), ("cu_seqlens_k", total_k)):
        if opts[name] is None:
            errors.append(f"{name}=None: varlen needs both cu_seqlens_q and cu_seqlens_k")
            continue
        starts = np.asarray(opts[name])
        if starts.ndim != 1 or starts.size < 1 or not np.issubdtype(starts.dtype, np.integer):
            errors.append(f"{name} must be a 1-D integer array of length batch + 1; got "
                          f"shape {starts.shape}, dtype {starts.dtype}")
        elif starts[0] != 0 or np.any(np.diff(starts) < 0) or starts[-1] > total:
            errors.append(f"{name}={starts.tolist()} must start at 0, never decrease, and "
                          f"end at most at {total} (the rows given)")
        else:
            cu[name] = [int(n) for n in starts]
    if len(cu) == 2 and len(cu["cu_seqlens_q"]) != len(cu["cu_seqlens_k"]):
        errors.append(f"cu_seqlens_q has {len(cu['cu_seqlens_q'])} entries but cu_seqlens_k "
                      f"has {len(cu['cu_seqlens_k'])}; both must be batch + 1")
    if errors:
        return None, None
    cu_q, cu_k = cu["cu_seqlens_q"], cu["cu_seqlens_k"]
    batch = len(cu_q) - 1
    longest = {}
    for name, starts in (("max_seqlen_q", cu_q), ("max_seqlen_k", cu_k)):
        longest[name] = max((b - a for a, b in zip(starts, starts[1:])), default=0)
        given = opts[name]
        if given is not None and given < longest[name]:
            errors.append(f"{name}={given} is shorter than the longest sequence, {longest[name]}")
        longest[name] = longest[name] if given is None else int(given)
    segments = [
        _Segment(batch=slice(b, b + 1), rows_q=slice(cu_q[b], cu_q[b + 1]),
                 rows_k=slice(cu_k[b], cu_k[b + 1]))
        for b in range(batch)
    ]
    dims = (batch, heads, heads_kv, longest["max_seqlen_q"], longest["max_seqlen_k"],
            head_dim, v.shape[-1])
    return dims, segments


def _check_heads_and_dim(q_shape, k_shape, heads, heads_kv, head_dim, k_head_dim, errors):
    if heads_kv == 0 and heads != 0 or heads_kv and heads % heads_kv:
        errors.append(f"q has {heads} heads, k and v {heads_kv}: the kv heads must divide "
                      f"the query heads (q {q_shape}, k {k_shape})")
    if head_dim != k_head_dim:
        errors.append(f"q head dim {head_dim} != k head dim {k_head_dim} "
                      f"(q {q_shape}, k {k_shape})")


def _broadcast(name: str, array: np.ndarray, shape: tuple[int, ...], errors: list[str]):
    try:
        return np.broadcast_to(array, shape)
    except ValueError:
        errors.append(f"{name} has shape {array.shape}, which does not broadcast to "
                      f"(batch, heads, seqlen_q, seqlen_k) = {shape}")
        return None


def _dequantized(q64, k64, v64, opts, dims, varlen: bool, is_fp8: bool, backward: bool, errors: list[str]):
    """q, k, v times their descales (FP8 inputs; the float8 values are already exactly
    float64). FP8 inputs have no backward, and descales belong to FP8 inputs."""
    from . import fp8

    descales = {name: opts.get(name) for name in ("q_descale", "k_descale", "v_descale")}
    if not is_fp8 and all(d is None for d in descales.values()):
        return q64, k64, v64
    if backward:
        errors.append("float8 inputs or descales in backward(): FP8 attention is forward-only")
        return q64, k64, v64
    batch, heads, heads_kv, seqlen_q, seqlen_k, _, _ = dims
    lengths = {"q_descale": (heads, seqlen_q), "k_descale": (heads_kv, seqlen_k), "v_descale": (heads_kv, seqlen_k)}
    arrays = {}
    for name, value in descales.items():
        if value is None:
            continue
        array = np.asarray(value)
        own_heads, seqlen = lengths[name]
        errors += fp8.descale_errors(name, array.shape, None, batch=batch, heads=own_heads, heads_kv=heads_kv,
                                     seqlen=seqlen, varlen=varlen)
        arrays[name] = array
    if errors:
        return q64, k64, v64
    layout = "bshd" if varlen else opts["layout"]
    return tuple(fp8.apply_descale(x, arrays.get(name), layout)
                 for x, name in ((q64, "q_descale"), (k64, "k_descale"), (v64, "v_descale")))


def _float64(a: Any) -> np.ndarray:
    # np.asarray then astype handles ml_dtypes.bfloat16 and float16 exactly.
    return np.asarray(a).astype(np.float64)


def _with_defaults(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; the options are {list(_DEFAULTS)}")
    return {**_DEFAULTS, **options}


def _raise(errors: list[str]) -> None:
    raise ValueError("invalid attention inputs:\n  - " + "\n  - ".join(errors))


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
