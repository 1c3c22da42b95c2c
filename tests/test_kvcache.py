"""Attention over a KV cache on the host: the float64 reference of the cache semantics
(append, rotary, paging, per-sequence lengths, left padding) against a dense float64
computation written independently here, the split-KV merge the kernels use, the checks
before launch, and the kernels' parameter record and variants (compiled without a GPU)."""

from __future__ import annotations

import math
import shutil
import subprocess
import textwrap

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import _build, _decode_tiles, _kvcache, _tiles
from cuflash._interop import BFLOAT16

from _compile import compile_all

# ---- an independent dense float64 model ---------------------------------------------------


def rotate_complex(x, cos, sin, pos, interleaved):
    """Rotary embedding as complex multiplication: each pair (a, b) is a + ib, turned by
    cos + i sin. x (n, heads, d), pos (n,)."""
    half = cos.shape[1]
    rd = 2 * half
    turn = (cos[pos] + 1j * sin[pos])[:, None, :]
    out = x.astype(np.float64).copy()
    if interleaved:
        z = (x[..., 0:rd:2] + 1j * x[..., 1:rd:2]) * turn
        out[..., 0:rd:2], out[..., 1:rd:2] = z.real, z.imag
    else:
        z = (x[..., :half] + 1j * x[..., half:rd]) * turn
        out[..., :half], out[..., half:rd] = z.real, z.imag
    return out


def dense_attention(q, keys, values, *, scale, causal, window, softcap, slopes):
    """One sequence: q (sq, h, d), keys/values (nk, hk, d); (out (sq, h, d), lse (h, sq))."""
    sq, h, d = q.shape
    nk, hk = keys.shape[:2]
    group = h // hk
    out = np.zeros((sq, h, d))
    lse = np.full((h, sq), -np.inf)
    for head in range(h):
        kh, vh = keys[:, head // group], values[:, head // group]
        for i in range(sq):
            pos = i + nk - sq  # bottom-right: the last query sees the last key
            scores = []
            for j in range(nk):
                allowed = (not causal or j <= pos) and (window[0] < 0 or j >= pos - window[0]) and (
                    window[1] < 0 or j <= pos + window[1])
                if not allowed:
                    scores.append(-np.inf)
                    continue
                x = scale * float(q[i, head] @ kh[j])
                if softcap:
                    x = softcap * math.tanh(x / softcap)
                if slopes is not None:
                    x -= slopes[head] * abs(pos - j)
                scores.append(x)
            scores = np.array(scores)
            if nk == 0 or np.all(np.isinf(scores)):
                continue
            m = scores.max()
            w = np.exp(scores - m)
            out[i, head] = (w / w.sum()) @ vh
            lse[head, i] = m + math.log(w.sum())
    return out, lse


def dense_model(q, kc, vc, k, v, lens, *, pads=None, entries=None, cos=None, sin=None, interleaved=True,
                scale=None, causal=False, window=(-1, -1), softcap=0.0, slopes=None):
    """Contiguous caches only: the sequence b is entry entries[b]; new rows appended by
    concatenation, rotary by complex multiplication."""
    batch, sq, h, d = q.shape
    scale = 1 / math.sqrt(d) if scale is None else scale
    outs, lses = [], []
    for b in range(batch):
        e = b if entries is None else entries[b]
        start = 0 if pads is None else pads[b]
        keys, values = kc[e, start : lens[b]].astype(np.float64), vc[e, start : lens[b]].astype(np.float64)
        qb = q[b].astype(np.float64)
        if k is not None:
            newk = k[b].astype(np.float64)
            if cos is not None:
                newk = rotate_complex(newk, cos, sin, lens[b] + np.arange(k.shape[1]), interleaved)
                seq = causal or tuple(window) != (-1, -1)
                qb = rotate_complex(qb, cos, sin, lens[b] + (np.arange(sq) if seq else np.zeros(sq, int)), interleaved)
            keys = np.concatenate([keys, newk])
            values = np.concatenate([values, v[b].astype(np.float64)])
        sl = None if slopes is None else (slopes if slopes.ndim == 1 else slopes[b])
        o, l = dense_attention(qb, keys, values, scale=scale, causal=causal, window=window, softcap=softcap, slopes=sl)
        outs.append(o)
        lses.append(l)
    return np.stack(outs), np.stack(lses)


def to_paged(kc, vc, page_size, rng, capacity_pages=None, spare=3):
    """The same caches as pages in a shuffled pool (plus unused spare pages of NaN)."""
    batch, seqlen = kc.shape[:2]
    per = capacity_pages or -(-seqlen // page_size)
    pool = batch * per + spare
    order = rng.permutation(pool)
    table = order[: batch * per].reshape(batch, per).astype(np.int32)
    pk = np.full((pool, page_size) + kc.shape[2:], np.nan)
    pv = np.full_like(pk, np.nan)
    for b in range(batch):
        for r in range(seqlen):
            pk[table[b, r // page_size], r % page_size] = kc[b, r]
            pv[table[b, r // page_size], r % page_size] = vc[b, r]
    return pk, pv, table


def make(rng, batch=2, sq=3, h=4, hk=2, d=16, seqlen=40, sn=2):
    q = rng.standard_normal((batch, sq, h, d))
    kc = rng.standard_normal((batch, seqlen, hk, d))
    vc = rng.standard_normal((batch, seqlen, hk, d))
    k = rng.standard_normal((batch, sn, hk, d)) if sn is not None else None
    v = rng.standard_normal((batch, sn, hk, d)) if sn is not None else None
    return q, kc, vc, k, v


def rotary_tables(rng, seqlen_ro, rotary_dim):
    theta = rng.uniform(0, 2 * np.pi, (seqlen_ro, rotary_dim // 2))
    return np.cos(theta), np.sin(theta)


# ---- the reference against the dense model ----------------------------------------------


@settings(max_examples=40)
@given(
    seed=st.integers(0, 2**31),
    lens=st.lists(st.integers(0, 30), min_size=1, max_size=3),
    sq=st.integers(1, 5),
    sn=st.sampled_from([None, 0, 1, 3]),
    group=st.sampled_from([1, 2, 4]),
    causal=st.booleans(),
    window=st.sampled_from([(-1, -1), (4, 0), (2, 3), (0, -1)]),
    softcap=st.sampled_from([0.0, 2.0]),
    alibi=st.booleans(),
    rotary=st.sampled_from([None, "interleaved", "halves"]),
)
@example(seed=1, lens=[0, 1, 30], sq=1, sn=None, group=4, causal=False, window=(-1, -1), softcap=0.0, alibi=False,
         rotary=None)  # lengths 0, 1 and full
@example(seed=2, lens=[0], sq=4, sn=0, group=1, causal=True, window=(-1, -1), softcap=0.0, alibi=False, rotary=None)
def test_reference_matches_a_dense_computation(seed, lens, sq, sn, group, causal, window, softcap, alibi, rotary):
    """Appending, rotary, per-sequence lengths and every score option: the reference gives
    the output and LSE of plain attention over the concatenated keys."""
    rng = np.random.default_rng(seed)
    batch, hk, d = len(lens), 2, 16
    capacity = 33
    if rotary is not None and sn is None:
        sn = 1  # rotary needs keys to append
    q, kc, vc, k, v = make(rng, batch, sq, hk * group, hk, d, capacity, sn)
    lens = np.array([min(n, capacity - (sn or 0)) for n in lens], np.int32)
    cos = sin = None
    if rotary:
        cos, sin = rotary_tables(rng, 64, 8)
    slopes = rng.uniform(0.1, 1.0, (batch, hk * group)) if alibi else None
    opts = dict(causal=causal, window_size=window, softcap=softcap)
    out, lse, new_k, new_v = cuflash.kvcache_reference(
        q, kc, vc, k, v, cache_seqlens=lens, rotary_cos=cos, rotary_sin=sin,
        rotary_interleaved=rotary == "interleaved", alibi_slopes=slopes, **opts)
    want_out, want_lse = dense_model(q, kc, vc, k, v, lens, cos=cos, sin=sin, interleaved=rotary == "interleaved",
                                     causal=causal, window=window, softcap=softcap, slopes=slopes)
    np.testing.assert_allclose(out, want_out, atol=1e-12)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(want_lse))
    np.testing.assert_allclose(lse[np.isfinite(lse)], want_lse[np.isfinite(want_lse)], atol=1e-12)
    # The caches change exactly at the appended rows.
    changed = np.zeros(kc.shape[:2], bool)
    for b in range(batch):
        changed[b, lens[b] : lens[b] + (sn or 0)] = True
    np.testing.assert_array_equal(new_k[~changed], kc[~changed])
    np.testing.assert_array_equal(new_v[~changed], vc[~changed])
    if sn:
        for b in range(batch):
            rows = slice(lens[b], lens[b] + sn)
            want = k[b] if cos is None else rotate_complex(k[b], cos, sin, lens[b] + np.arange(sn), rotary == "interleaved")
            np.testing.assert_allclose(new_k[b, rows], want, atol=1e-14)
            np.testing.assert_array_equal(new_v[b, rows], v[b])


@pytest.mark.parametrize("page_size", [16, 48, 64])
def test_paged_cache_gives_the_contiguous_result(page_size):
    """The same cache as shuffled pages: same output, same appended rows (in their pages),
    whatever the page size (multiples of 16, not only powers of two)."""
    rng = np.random.default_rng(page_size)
    q, kc, vc, k, v = make(rng, batch=3, sq=2, h=8, hk=2, d=16, seqlen=100, sn=3)
    lens = np.array([97, 0, 50], np.int32)
    pk, pv, table = to_paged(kc, vc, page_size, rng)
    out, lse, new_k, _ = cuflash.kvcache_reference(q, kc, vc, k, v, cache_seqlens=lens, causal=True)
    pout, plse, new_pk, _ = cuflash.kvcache_reference(q, pk, pv, k, v, cache_seqlens=lens, block_table=table, causal=True)
    np.testing.assert_allclose(pout, out, atol=1e-12)
    np.testing.assert_allclose(plse, lse, atol=1e-12)
    for b in range(3):
        for r in range(lens[b], lens[b] + 3):
            np.testing.assert_array_equal(new_pk[table[b, r // page_size], r % page_size], new_k[b, r])


def test_cache_batch_idx_and_left_padding():
    """Sequence b reads cache entry cache_batch_idx[b] from row cache_leftpad[b] on; its
    rotary positions are the cache's own row numbers."""
    rng = np.random.default_rng(5)
    q, kc, vc, k, v = make(rng, batch=2, sq=2, h=4, hk=2, d=16, seqlen=40, sn=2)
    kc3, vc3 = np.concatenate([kc, kc[:1]]), np.concatenate([vc, vc[:1]])
    entries = np.array([2, 0], np.int32)
    lens, pads = np.array([20, 9], np.int32), np.array([5, 9], np.int32)
    cos, sin = rotary_tables(rng, 64, 16)
    out, lse, new_k, _ = cuflash.kvcache_reference(q, kc3, vc3, k, v, cache_seqlens=lens, cache_batch_idx=entries,
                                                   cache_leftpad=pads, rotary_cos=cos, rotary_sin=sin, causal=True)
    want_out, want_lse = dense_model(q, kc3, vc3, k, v, lens, pads=pads, entries=entries, cos=cos, sin=sin, causal=True)
    np.testing.assert_allclose(out, want_out, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, atol=1e-12)
    assert not np.array_equal(new_k[2, 20:22], kc3[2, 20:22]) and np.array_equal(new_k[1], kc3[1])


def test_api_on_numpy_appends_in_place_and_rounds_as_stored():
    """The host path writes the appended rows into the caller's cache (rounded to its
    dtype) and nothing else, and attends over the stored values."""
    rng = np.random.default_rng(7)
    q, kc, vc, k, v = make(rng, batch=2, sq=1, h=4, hk=1, d=16, seqlen=20, sn=2)
    q, kc, vc, k, v = (a.astype(np.float16) for a in (q, kc, vc, k, v))
    kc[:, 10:] = np.nan  # poison every slot not written
    vc[:, 10:] = np.nan
    before_k, before_v = kc.copy(), vc.copy()
    lens = np.array([10, 3], np.int32)
    out, lse = cuflash.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, return_lse=True)
    assert out.dtype == np.float16 and lse.dtype == np.float32 and lse.shape == (2, 4, 1)
    np.testing.assert_array_equal(kc[0, 10:12], k[0])
    np.testing.assert_array_equal(kc[1, 3:5], k[1])
    np.testing.assert_array_equal(vc[1, 3:5], v[1])
    untouched = np.ones(kc.shape[:2], bool)
    untouched[0, 10:12] = untouched[1, 3:5] = False
    np.testing.assert_array_equal(kc[untouched], before_k[untouched])  # NaN compares equal position-wise
    assert np.isfinite(out).all()
    want, _ = dense_model(q, before_k, before_v, k, v, lens)
    np.testing.assert_allclose(out.astype(np.float64), want, atol=2e-3)


def test_torch_drop_in_on_cpu_tensors_writes_the_cache():
    torch = pytest.importorskip("torch")
    from cuflash.torch import flash_attn_with_kvcache

    rng = np.random.default_rng(8)
    q, kc, vc, k, v = (torch.from_numpy(a) for a in make(rng, batch=2, sq=1, h=4, hk=2, d=16, seqlen=20, sn=1))
    lens = torch.tensor([4, 7], dtype=torch.int32)
    kc0 = kc.clone()
    out, lse = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, causal=True, return_softmax_lse=True)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape and lse.shape == (2, 4, 1)
    assert torch.equal(kc[0, 4], k[0, 0]) and torch.equal(kc[1, 7], k[1, 0])
    assert torch.equal(kc[0, :4], kc0[0, :4]) and torch.equal(kc[0, 5:], kc0[0, 5:])
    want, _ = dense_model(q.numpy(), kc0.numpy(), vc.numpy(), k.numpy(), v.numpy(), lens.numpy(), causal=True)
    np.testing.assert_allclose(out.numpy(), want, atol=1e-12)


# ---- the split-KV merge ----------------------------------------------------------------------


def split_model(q, keys, values, *, block_n, num_splits, causal):
    """The kernels' split-KV arithmetic in float64 for one sequence (no padding): key tiles
    of block_n divided among num_splits (as DecodeKernel divides them), each split's
    normalised partial output and LSE, then the merge of cuflash_decode_combine."""
    sq, h, d = q.shape
    nk = keys.shape[0]
    tiles = -(-nk // block_n)
    per = -(-tiles // num_splits)
    parts = []
    for s in range(num_splits):
        lo, hi = min(nk, s * per * block_n), min(nk, (s + 1) * per * block_n)
        o = np.zeros((sq, h, d))
        lse = np.full((h, sq), -np.inf)
        if hi > lo:
            # keys outside [lo, hi) count as masked: attention over the sub-range with the
            # sequence's own alignment
            for head in range(h):
                for i in range(sq):
                    pos = i + nk - sq
                    js = [j for j in range(lo, hi) if not causal or j <= pos]
                    if not js:
                        continue
                    sc = np.array([q[i, head] @ keys[j, head] for j in js]) / math.sqrt(d)
                    m = sc.max()
                    w = np.exp(sc - m)
                    o[i, head] = (w / w.sum()) @ values[js, head]
                    lse[head, i] = m + math.log(w.sum())
        parts.append((o, lse))
    lses = np.stack([p[1] for p in parts])
    mx = lses.max(axis=0)
    safe = np.where(np.isfinite(mx), mx, 0.0)
    weights = np.where(np.isfinite(lses), np.exp(lses - safe), 0.0)
    total = weights.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where(total > 0, weights / total, 0.0)
        lse = np.where(total > 0, safe + np.log(total), -np.inf)
    out = sum(np.transpose(w[s], (1, 0))[..., None] * parts[s][0] for s in range(num_splits))
    return out, lse


@pytest.mark.parametrize("nk,num_splits", [(100, 1), (100, 3), (100, 7), (20, 8), (0, 4), (64, 2)])
def test_split_merge_reproduces_the_reference_including_empty_splits(nk, num_splits):
    """More splits than key tiles leave splits empty (LSE -inf, weight 0); no keys at all
    leaves every split empty: output 0, LSE -inf."""
    rng = np.random.default_rng(nk + num_splits)
    q = rng.standard_normal((3, 2, 16))
    keys, values = rng.standard_normal((nk, 2, 16)), rng.standard_normal((nk, 2, 16))
    out, lse = split_model(q, keys, values, block_n=16, num_splits=num_splits, causal=True)
    want_out, want_lse = dense_attention(q, keys, values, scale=1 / 4, causal=True, window=(-1, -1), softcap=0.0,
                                         slopes=None)
    np.testing.assert_allclose(out, want_out, atol=1e-12)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(want_lse))
    np.testing.assert_allclose(lse[np.isfinite(lse)], want_lse[np.isfinite(want_lse)], atol=1e-12)


def test_split_count_follows_wave_efficiency():
    # 8 blocks (batch 1, 8 kv heads) on 132 SMs x 2: split until the GPU is covered
    s = _kvcache.choose_splits(8, 2048, 132, 2)
    assert 8 * s >= 0.85 * 264 and 8 * s <= 264 * 1.0 + 8
    assert _kvcache.choose_splits(8, 3, 132, 2) <= 3  # never more splits than key tiles
    assert _kvcache.choose_splits(512, 2048, 132, 2) == 1  # already several waves
    assert _kvcache.choose_splits(0, 10, 132, 2) == 1
    for blocks in range(1, 300, 7):
        s = _kvcache.choose_splits(blocks, 10_000, 132, 2)
        assert 1 <= s <= _kvcache.MAX_SPLITS


# ---- bad input --------------------------------------------------------------------------


def _bad(match, **changes):
    rng = np.random.default_rng(0)
    q, kc, vc, k, v = make(rng, batch=2, sq=1, h=4, hk=2, d=16, seqlen=32, sn=2)
    args = dict(q=q, k_cache=kc, v_cache=vc, k=k, v=v, cache_seqlens=np.array([3, 4], np.int32))
    args.update(changes)
    with pytest.raises(cuflash.ValidationError, match=match) as info:
        cuflash.attention_with_kvcache(**args)
    return info.value


def test_append_past_capacity_is_an_error_naming_the_values():
    _bad(r"cache_seqlens\[1\]=31 \+ seqlen_new=2 exceeds the cache's capacity of 32", cache_seqlens=np.array([3, 31], np.int32))
    _bad(r"cache_seqlens\[0\]=31 \+ seqlen_new=2 exceeds", cache_seqlens=31)


def test_paged_cache_errors():
    rng = np.random.default_rng(1)
    q, kc, vc, k, v = make(rng, batch=2, sq=1, h=4, hk=2, d=16, seqlen=32, sn=1)
    pk, pv, table = to_paged(kc, vc, 16, rng)
    lens = np.array([3, 20], np.int32)
    bad_table = table.copy()
    bad_table[1, 1] = 99
    _bad(r"block_table\[1, 1\]=99 is not a page of k_cache \(num_pages=7\)", k_cache=pk, v_cache=pv,
         block_table=bad_table, cache_seqlens=lens, k=k[:, :1], v=v[:, :1])
    pk24, pv24, t24 = to_paged(kc, vc, 24, rng)
    _bad(r"page_size=24 .* must be a positive multiple of 16", k_cache=pk24, v_cache=pv24, block_table=t24,
         cache_seqlens=lens, k=k[:, :1], v=v[:, :1])
    _bad(r"block_table.dtype=int64 must be int32", k_cache=pk, v_cache=pv, block_table=table.astype(np.int64),
         cache_seqlens=lens, k=k[:, :1], v=v[:, :1])
    _bad("cache_batch_idx cannot be combined with block_table", k_cache=pk, v_cache=pv, block_table=table,
         cache_seqlens=lens, cache_batch_idx=np.array([0, 1], np.int32), k=k[:, :1], v=v[:, :1])


def test_shape_and_dtype_errors_name_their_values():
    rng = np.random.default_rng(2)
    q, kc, vc, k, v = make(rng, batch=2, sq=1, h=4, hk=2, d=16, seqlen=32, sn=2)
    _bad(r"k_cache head_dim=8 must equal q's head_dim=16", k_cache=kc[..., :8], v_cache=vc[..., :8])
    _bad(r"heads=4 must be a multiple of heads_kv=3", k_cache=np.zeros((2, 32, 3, 16)), v_cache=np.zeros((2, 32, 3, 16)),
         k=np.zeros((2, 2, 3, 16)), v=np.zeros((2, 2, 3, 16)))
    _bad(r"q, k_cache, v_cache \(and k, v\) must share one dtype", q=q.astype(np.float32))
    _bad(r"v_cache.shape=\(2, 30, 2, 16\) must equal k_cache.shape=\(2, 32, 2, 16\)", v_cache=vc[:, :30])
    _bad("k and v must be given together", v=None)
    _bad(r"k.shape=\(2, 2, 1, 16\) must be", k=k[:, :, :1], v=v[:, :, :1])
    _bad(r"cache_seqlens must be an int or int32 of shape \(batch=2,\)", cache_seqlens=np.array([1, 2, 3], np.int32))
    _bad(r"cache_seqlens=-1 must be a non-negative int", cache_seqlens=-1)
    _bad(r"k_cache.shape\[0\]=3 must equal batch=2", k_cache=np.zeros((3, 32, 2, 16)), v_cache=np.zeros((3, 32, 2, 16)))
    _bad(r"cache_batch_idx\[1\]=5 must be in \[0, k_cache.shape\[0\]=2\)", cache_batch_idx=np.array([0, 5], np.int32))
    _bad(r"cache_leftpad\[0\]=4 must be in \[0, cache_seqlens\[0\]=3\]", cache_leftpad=np.array([4, 0], np.int32))
    _bad(r"num_splits=-1 must be an int", num_splits=-1)
    _bad(r"window_size=\(-2, 0\)", window_size=(-2, 0))
    _bad(r"softcap=-1.0 must be", softcap=-1.0)


def test_rotary_errors():
    rng = np.random.default_rng(3)
    cos, sin = rotary_tables(rng, 4, 8)
    _bad(r"rotary position 5 \(sequence 1\) is past rotary_cos.shape\[0\]=4", rotary_cos=cos, rotary_sin=sin)
    cos, sin = rotary_tables(rng, 64, 8)
    _bad("rotary_cos/rotary_sin need new keys and values", rotary_cos=cos, rotary_sin=sin, k=None, v=None)
    _bad("rotary_cos and rotary_sin must be given together", rotary_cos=cos)
    cos, sin = rotary_tables(rng, 64, 20)
    _bad(r"rotary_dim=20 .* must be in \[2, head_dim=16\]", rotary_cos=cos, rotary_sin=sin)


def test_every_problem_is_reported_at_once():
    err = _bad("problem", cache_seqlens=np.array([3, 31], np.int32), num_splits=1000, softcap=-2.0)
    assert len(err.reasons) == 3


# ---- the kernels' record and variants (no GPU needed) --------------------------------------


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_decode_record_matches_the_c_struct(tmp_path):
    dtype = _kvcache.RECORD
    lines = [f'printf("%s %zu\\n", "{n}", offsetof(struct DecodeParams, {n}));' for n in dtype.names]
    program = textwrap.dedent(
        """
        #include <stdio.h>
        #include <stddef.h>
        #include "decode_params.h"
        int main(void) {
            printf("sizeof %zu\\n", sizeof(struct DecodeParams));
            %s
            return 0;
        }
        """
    ).replace("%s", "\n    ".join(lines))
    (tmp_path / "offsets.c").write_text(program)
    exe = tmp_path / "offsets"
    subprocess.run(["cc", "-I", str(_build.source_dir()), str(tmp_path / "offsets.c"), "-o", str(exe)], check=True)
    c_layout = dict(line.split() for line in subprocess.check_output([str(exe)]).decode().splitlines())
    assert int(c_layout.pop("sizeof")) == dtype.itemsize
    assert {k: int(v) for k, v in c_layout.items()} == {name: dtype.fields[name][1] for name in dtype.names}


def test_decode_tiles_fit_and_cover_every_head_dim():
    for arch, limit in _tiles.SMEM_LIMIT.items():
        if not _tiles.bf16_supported(arch):
            continue  # the KV-cache family is built on cp.async: Ampere and newer
        for dtype in _decode_tiles.DTYPES:
            for bucket in _tiles.HEAD_DIM_BUCKETS:
                variant, tiles, smem = _decode_tiles.decode_variant(dtype, bucket, limit)
                assert smem <= limit and tiles.block_n % (16 * tiles.warps) == 0 and tiles.stages >= 2
                assert dict(variant.defines)["CF_DEC_SMEM"] == smem
    with pytest.raises(_tiles.UnsupportedConfig, match="fp16 and bf16 only"):
        _decode_tiles.decode_variant(np.dtype(np.float32), 128, _tiles.SMEM_LIMIT["sm_90"])
    shipped = {v for arch in _tiles.ARCHES for v in _tiles.shipped_variants(arch)}
    assert set(_decode_tiles.shipped_variants("sm_90")) <= shipped


nvrtc_available = True
try:
    _build.nvrtc_version()
except Exception:  # noqa: BLE001
    nvrtc_available = False


@pytest.mark.skipif(not nvrtc_available, reason="needs NVRTC")
def test_decode_variants_for_small_shared_memory_parts_compile():
    """The shipped arches' variants are in the compile check (tests/test_build.py); the
    rows only ~100 KB parts reach are compiled here, for sm_80 code."""
    shipped = {v for arch in _tiles.ARCHES for v in _tiles.shipped_variants(arch)}
    extra = [(v, "sm_80") for v in _decode_tiles.all_variants() if v not in shipped]
    assert extra  # the d<=256 32-key row
    done = compile_all([v for v, _ in extra], "sm_80", max_workers=4)
    assert not done.failures, "\n".join(done.failures)
    for tag, entry in done.report.items():
        assert entry["kernels"] and all(k["spill_stores"] == 0 for k in entry["kernels"].values()), (tag, entry)


# ---- bad input a demanding user gives ------------------------------------------------------


@pytest.mark.parametrize("changes,match", [
    (dict(cache_seqlens=2**70), r"cache_seqlens=1180591620717411303424 must be a non-negative int"),
    (dict(cache_seqlens=3.0), r"cache_seqlens=3.0 must be"),
    (dict(cache_seqlens=True), r"cache_seqlens=True must be"),
    (dict(return_lse="no"), r"return_lse='no' must be a bool"),
    (dict(return_lse=1), r"return_lse=1 must be a bool"),
    (dict(q=np.zeros((2, 1, 4, 16), ">f8")), r"q.dtype='>f8' is float64 in non-native \(big-endian\) byte order"),
    (dict(alibi_slopes=np.ones(4, np.int32)), r"alibi_slopes.dtype=int32 must be float32 or float64"),
])
def test_scalars_and_dtypes_are_judged_not_converted(changes, match):
    _bad(match, **changes)


def test_integer_rotary_tables_are_refused_on_the_host_as_on_the_gpu():
    cos = np.ones((64, 4), np.int32)
    _bad(r"rotary_cos.dtype=int32 must be a floating dtype", rotary_cos=cos, rotary_sin=cos)


def test_window_none_is_unbounded_and_a_huge_window_equals_an_unbounded_one():
    rng = np.random.default_rng(5)
    q, kc, vc, _, _ = make(rng, batch=2, sq=2, h=4, hk=2, d=16, seqlen=32, sn=None)
    lens = np.array([7, 30], np.int32)
    want = cuflash.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, window_size=(-1, -1))
    for window in (None, (2**70, 2**70)):
        got = cuflash.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, window_size=window)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("alias", ["k_cache_is_v_cache", "q_in_k_cache", "k_in_k_cache", "v_in_v_cache"])
def test_appending_refuses_inputs_that_share_memory_with_the_caches(alias):
    rng = np.random.default_rng(6)
    q, kc, vc, k, v = make(rng, batch=2, sq=1, h=2, hk=2, d=16, seqlen=32, sn=2)
    args = dict(q=q, k_cache=kc, v_cache=vc, k=k, v=v)
    if alias == "k_cache_is_v_cache":
        args["v_cache"], match = kc, "v_cache shares memory with k_cache"
    elif alias == "q_in_k_cache":
        args["q"], match = kc[:, 20:21], "q shares memory with k_cache"
    elif alias == "k_in_k_cache":
        args["k"], match = kc[:, 3:5], "k shares memory with k_cache"
    else:
        args["v"], match = vc[:, 4:6], "v shares memory with v_cache"
    before_k, before_v = kc.copy(), vc.copy()
    with pytest.raises(cuflash.ValidationError, match=match):
        cuflash.attention_with_kvcache(**args, cache_seqlens=np.array([3, 4], np.int32))
    np.testing.assert_array_equal(kc, before_k)  # nothing written before the error
    np.testing.assert_array_equal(vc, before_v)


def test_interleaved_k_and_v_caches_of_one_buffer_are_allowed():
    """k_cache = kv[:, :, 0] and v_cache = kv[:, :, 1] of one (batch, seqlen, 2, heads, d)
    buffer: their byte spans overlap, their elements never do."""
    rng = np.random.default_rng(8)
    q, kc, vc, k, v = make(rng, batch=2, sq=1, h=2, hk=2, d=16, seqlen=32, sn=2)
    kv = np.stack([kc, vc], axis=2)
    lens = np.array([3, 9], np.int32)
    got = cuflash.attention_with_kvcache(q, kv[:, :, 0], kv[:, :, 1], k, v, cache_seqlens=lens)
    want = cuflash.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(kv[:, :, 0], kc)  # both appended in place alike
    np.testing.assert_array_equal(kv[:, :, 1], vc)


def test_two_sequences_appending_to_one_row_are_refused_but_shared_prefixes_are_not():
    rng = np.random.default_rng(7)
    q, kc, vc, k, v = make(rng, batch=2, sq=1, h=2, hk=2, d=16, seqlen=32, sn=2)
    pool_k, pool_v = rng.standard_normal((3, 32, 2, 16)), rng.standard_normal((3, 32, 2, 16))
    _bad(r"sequences 0 and 1 both append to row 5 of cache entry 1 \(cache_batch_idx\)", k_cache=pool_k,
         v_cache=pool_v, cache_batch_idx=np.array([1, 1], np.int32), cache_seqlens=np.array([5, 5], np.int32))
    # One entry, disjoint rows: allowed.
    cuflash.attention_with_kvcache(q, pool_k, pool_v, k, v, cache_seqlens=np.array([3, 10], np.int32),
                                   cache_batch_idx=np.array([1, 1], np.int32))
    pk, pv = rng.standard_normal((7, 16, 2, 16)), rng.standard_normal((7, 16, 2, 16))
    shared_last = np.array([[0, 1, 2], [3, 4, 2]], np.int32)
    _bad(r"sequences 0 and 1 both append to row 3 of page 2", k_cache=pk, v_cache=pv, block_table=shared_last,
         cache_seqlens=np.array([35, 35], np.int32))
    # A shared read-only prefix page (page 0) while each appends to its own page: allowed.
    shared_prefix = np.array([[0, 1, 2], [0, 4, 5]], np.int32)
    cuflash.attention_with_kvcache(q, pk, pv, k, v, cache_seqlens=np.array([20, 20], np.int32),
                                   block_table=shared_prefix)


def test_torch_drop_in_passes_options_to_the_core_unchanged():
    torch = pytest.importorskip("torch")
    from cuflash.torch import flash_attn_with_kvcache

    rng = np.random.default_rng(9)
    q, kc, vc, k, v = (torch.from_numpy(a) for a in make(rng, batch=2, sq=1, h=4, hk=2, d=16, seqlen=32, sn=1))
    lens = torch.tensor([4, 7], dtype=torch.int32)
    for changes, match in ((dict(causal="no"), r"causal='no' must be a bool"),
                           (dict(softcap="1"), r"softcap='1' must be"),
                           (dict(num_splits=2.7), r"num_splits=2.7 must be an int"),
                           (dict(num_splits=True), r"num_splits=True must be an int"),
                           (dict(rotary_interleaved="no"), r"rotary_interleaved='no' must be a bool"),
                           (dict(return_softmax_lse="no"), r"\n  - return_softmax_lse='no' must be a bool"),
                           (dict(return_softmax_lse=1, causal="no"),
                            r"causal='no' must be a bool(.|\n)*return_softmax_lse=1 must be a bool"),
                           (dict(cache_seqlens=None), r"cache_seqlens=None with new keys k")):
        kc0 = kc.clone()
        with pytest.raises(cuflash.ValidationError, match=match):
            flash_attn_with_kvcache(q, kc, vc, k, v, **{"cache_seqlens": lens, **changes})
        assert torch.equal(kc, kc0)
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) \['foo'\]; it takes \[.*'cache_seqlens'"):
        flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, foo=1)
