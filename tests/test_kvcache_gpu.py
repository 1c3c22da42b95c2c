"""The KV-cache kernels (cuda_src/flash_decode.cu) against the float64 reference, on the GPU.

Outputs and workspaces start as NaN (every element must be written); every cache slot the
call must not write is NaN or a known value and must come back bit for bit; attention is
judged by the tolerance method (tests/_tolerance.py) against the float64 reference run on
the same rounded inputs.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuflash
from cuflash import _fast, _interop, _kvcache

from _tolerance import BF16, check_all, compare, naive_attention

pytestmark = pytest.mark.gpu

F16 = np.dtype(np.float16)


def dev(a: np.ndarray):
    import cupy

    if a.dtype == BF16:
        return cupy.asarray(a.view(np.uint16)).view(BF16)
    return cupy.asarray(a)


def host(x) -> np.ndarray:
    """CuPy array -> host array of the same dtype (bf16 through its bits)."""
    import cupy

    if x.dtype == BF16:
        return cupy.asnumpy(x.view(np.uint16)).view(BF16)
    return cupy.asnumpy(x)


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a.view(np.uint32)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every output and workspace the call allocates starts as NaN."""
    real_empty = _interop.empty

    def poisoned(shape, dtype, like, stream=None):
        obj, view = real_empty(shape, dtype, like, stream)
        view.fill(np.nan)
        return obj, view

    monkeypatch.setattr(_interop, "empty", poisoned)
    real_fast_empty = _fast.empty

    def poisoned_fast(library, like, shape, dtype):
        arr = real_fast_empty(library, like, shape, dtype)
        if library == "torch":
            arr.fill_(float("nan"))
        else:
            arr.fill(np.nan)
        return arr

    monkeypatch.setattr(_fast, "empty", poisoned_fast)
    _kvcache.clear_plans()


def _rounded(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype)


def run_case(*, dtype=BF16, batch=2, seqlen_q=1, heads=32, heads_kv=8, head_dim=128, capacity=300, lens=None,
             seqlen_new=1, page_size=None, num_splits=0, causal=False, window=(-1, -1), softcap=0.0, alibi=False,
             rotary=None, leftpad=False, batch_idx=False, seed=0):
    """One call on CuPy arrays, checked against the float64 reference. Returns (out, lse)
    as host arrays."""
    import cupy

    rng = np.random.default_rng(seed)
    if lens is None:
        lens = rng.integers(0, capacity - seqlen_new + 1, batch)
    lens = np.asarray(lens, np.int32)
    entries = batch + 1 if batch_idx else batch
    q = _rounded(rng, (batch, seqlen_q, heads, head_dim), dtype)
    kc = _rounded(rng, (entries, capacity, heads_kv, head_dim), dtype)
    vc = _rounded(rng, (entries, capacity, heads_kv, head_dim), dtype)
    k = _rounded(rng, (batch, seqlen_new, heads_kv, head_dim), dtype) if seqlen_new is not None else None
    v = _rounded(rng, (batch, seqlen_new, heads_kv, head_dim), dtype) if seqlen_new is not None else None
    sn = seqlen_new or 0
    idx = rng.permutation(entries)[:batch].astype(np.int32) if batch_idx else None
    pads = np.minimum(lens, rng.integers(0, 40, batch)).astype(np.int32) if leftpad else None
    # Poison every row past each sequence's end: the kernels must neither read it into a
    # result nor write it, except for the appended rows.
    used = np.zeros((entries, capacity), bool)
    for b in range(batch):
        used[b if idx is None else idx[b], : lens[b] + sn] = True
    kc[~used] = np.nan
    vc[~used] = np.nan
    table = None
    if page_size is not None:
        per = -(-capacity // page_size)
        pool = entries * per + 2
        order = rng.permutation(pool)
        table = order[: batch * per].reshape(batch, per).astype(np.int32)
        pk = np.full((pool, page_size, heads_kv, head_dim), np.nan, dtype=dtype)
        pv = pk.copy()
        for b in range(batch):
            for r in range(capacity):
                pk[table[b, r // page_size], r % page_size] = kc[b, r]
                pv[table[b, r // page_size], r % page_size] = vc[b, r]
        kc, vc = pk, pv
    cos = sin = None
    if rotary:
        theta = rng.uniform(0, 2 * np.pi, (capacity + seqlen_q, head_dim // 4))
        cos, sin = np.cos(theta).astype(dtype), np.sin(theta).astype(dtype)
    slopes = rng.uniform(0.01, 0.3, (batch, heads)).astype(np.float32) if alibi else None

    kc_d, vc_d = dev(kc), dev(vc)
    args = dict(cache_seqlens=dev(lens), block_table=None if table is None else dev(table),
                cache_batch_idx=None if idx is None else dev(idx), cache_leftpad=None if pads is None else dev(pads),
                rotary_cos=None if cos is None else dev(cos), rotary_sin=None if sin is None else dev(sin),
                rotary_interleaved=rotary == "interleaved", num_splits=num_splits, causal=causal,
                window_size=window, softcap=softcap, alibi_slopes=None if slopes is None else dev(slopes))
    out_d, lse_d = cuflash.attention_with_kvcache(dev(q), kc_d, vc_d, None if k is None else dev(k),
                                                  None if v is None else dev(v), return_lse=True, **args)
    cupy.cuda.runtime.deviceSynchronize()
    out, lse, kc_after, vc_after = host(out_d), host(lse_d), host(kc_d), host(vc_d)

    opts = dict(causal=causal, window_size=window, softcap=softcap)
    ref_out, ref_lse, ref_kc, ref_vc = cuflash.kvcache_reference(
        q, kc, vc, k, v, cache_seqlens=lens, block_table=table, cache_batch_idx=idx, cache_leftpad=pads,
        rotary_cos=cos, rotary_sin=sin, rotary_interleaved=rotary == "interleaved", alibi_slopes=slopes,
        storage_dtype=dtype, **opts)

    # The caches: appended rows as the reference stores them (rotary: within one unit in
    # the last place of the dtype, fp32 against float64 rotation), every other slot
    # unchanged bit for bit, NaN poison included.
    written = np.zeros(kc.shape[:2], bool)
    for b in range(batch):
        if sn and k is not None:
            written[_kvcache.appended_slots(sn, page_size or 0, lens, table, idx, b)] = True
    np.testing.assert_array_equal(bits(kc_after)[~written], bits(kc)[~written])
    np.testing.assert_array_equal(bits(vc_after)[~written], bits(vc)[~written])
    np.testing.assert_array_equal(vc_after[written].astype(np.float64), ref_vc[written])
    ulp = 2.0 ** (-7 if dtype == BF16 else -10)
    np.testing.assert_allclose(kc_after[written].astype(np.float64), ref_kc[written],
                               rtol=ulp if rotary else 0, atol=ulp * 1e-3 if rotary else 0)

    # Attention: the tolerance method, sequence by sequence (plain same-dtype attention
    # over the same stored keys is the baseline).
    scale = 1 / np.sqrt(head_dim)
    qr = q.astype(np.float64)
    if rotary:
        seq = causal or tuple(window) != (-1, -1)
        qr = np.stack([_kvcache._rotate(qr[b], cos.astype(np.float64), sin.astype(np.float64),
                                        lens[b] + (np.arange(seqlen_q) if seq else np.zeros(seqlen_q, int)),
                                        rotary == "interleaved") for b in range(batch)]).astype(dtype).astype(np.float64)
    naive_out, naive_lse = [], []
    for b in range(batch):
        start = 0 if pads is None else pads[b]
        rows = np.arange(start, lens[b] + sn)
        if table is not None:
            at = (table[b, rows // page_size], rows % page_size)
        else:
            at = (np.full(rows.shape, b if idx is None else idx[b]), rows)
        keys = ref_kc[at].astype(np.float64)
        values = ref_vc[at].astype(np.float64)
        res = naive_attention(np.swapaxes(qr[b : b + 1], 1, 2), np.swapaxes(keys[None], 1, 2),
                              np.swapaxes(values[None], 1, 2), None, dtype,
                              dict(softmax_scale=scale, alibi_slopes=None if slopes is None else slopes[b : b + 1], **opts))
        naive_out.append(np.swapaxes(res["out"][0], 0, 1))
        naive_lse.append(res["lse"][0])
    check_all([
        compare("out", out, ref_out, np.stack(naive_out), dtype, 2),
        compare("lse", lse, ref_lse, np.stack(naive_lse), dtype, 2),
    ])
    return out, lse


# ---- correctness ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("seqlen_q", [1, 4, 100])
@pytest.mark.parametrize("heads_kv", [8, 32])
def test_gqa_decode_and_chunked_prefill(dtype, seqlen_q, heads_kv):
    run_case(dtype=dtype, seqlen_q=seqlen_q, heads_kv=heads_kv, capacity=700, seqlen_new=seqlen_q, causal=True,
             seed=seqlen_q + heads_kv)


@pytest.mark.parametrize("head_dim", [40, 64, 96, 128, 192, 256])
def test_head_dims(head_dim):
    run_case(head_dim=head_dim, heads=8, heads_kv=2, seqlen_q=2, seqlen_new=2, capacity=333, causal=True, seed=head_dim)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 64])
def test_split_counts_including_empty_splits(num_splits):
    """64 splits of a 200-row cache leave most splits with no key tile at all."""
    run_case(num_splits=num_splits, capacity=200, lens=[0, 1, 199, 57], batch=4, seqlen_q=3, seqlen_new=1, causal=True,
             seed=num_splits)


def test_lengths_zero_one_and_full():
    """cache_seqlens 0 with no new keys: output 0 and LSE -inf; 1; and a full cache."""
    out, lse = run_case(batch=3, lens=[0, 1, 256], capacity=256, seqlen_new=None, seed=3)
    assert (out[0] == 0).all() and np.isneginf(lse[0]).all()
    assert np.isfinite(lse[1:]).all()


@pytest.mark.parametrize("page_size", [16, 48, 64, 256])
def test_paged_cache(page_size):
    run_case(page_size=page_size, capacity=600, seqlen_q=4, seqlen_new=4, causal=True, batch=3, seed=page_size)


@pytest.mark.parametrize("num_splits", [1, 5])
def test_paged_gives_the_contiguous_bits(num_splits):
    """Key tiles are aligned to absolute cache rows, so a paged cache runs the same
    arithmetic as a contiguous one: same bits."""
    a = run_case(capacity=512, num_splits=num_splits, seed=11, lens=[100, 500])
    b = run_case(capacity=512, num_splits=num_splits, seed=11, lens=[100, 500], page_size=32)
    np.testing.assert_array_equal(bits(a[0]), bits(b[0]))
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("options", [
    dict(window=(64, 0)), dict(window=(30, 5), seqlen_q=8, seqlen_new=8), dict(softcap=30.0), dict(alibi=True, causal=True),
    dict(rotary="interleaved", causal=True, seqlen_q=3, seqlen_new=3), dict(rotary="halves"),
    dict(leftpad=True, causal=True), dict(batch_idx=True), dict(leftpad=True, page_size=16),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_options(options):
    options = {"seqlen_q": 2, "seqlen_new": 2, **options}
    run_case(capacity=500, batch=3, seed=len(str(options)), **options)


# ---- never outside the cache -------------------------------------------------------------


def test_device_lengths_past_the_capacity_never_write_outside_the_cache():
    """cache_seqlens on the GPU is not checked before launch: an append past the end is
    dropped, and the memory around the cache is untouched."""
    import cupy

    rng = np.random.default_rng(0)
    guard = _rounded(rng, (4, 64, 2, 64), BF16)
    buf = dev(guard)
    kc, vc = buf[1:3], dev(guard)[1:3]
    q, k, v = (dev(_rounded(rng, s, BF16)) for s in ((2, 1, 4, 64), (2, 3, 2, 64), (2, 3, 2, 64)))
    lens = dev(np.array([62, 1000], np.int32))
    out = cuflash.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens)
    cupy.cuda.runtime.deviceSynchronize()
    after = host(buf)
    np.testing.assert_array_equal(bits(after[0]), bits(guard[0]))
    np.testing.assert_array_equal(bits(after[3]), bits(guard[3]))
    np.testing.assert_array_equal(bits(after[2]), bits(guard[2]))  # sequence 1: nothing fits
    np.testing.assert_array_equal(bits(after[1, :62]), bits(guard[1, :62]))
    np.testing.assert_array_equal(bits(after[1, 62:]), bits(host(k)[0, :2]))  # two of three rows fit
    assert np.isfinite(host(out).astype(np.float32)).all()


def test_device_block_table_out_of_range_never_leaves_the_pool():
    import cupy

    rng = np.random.default_rng(1)
    pool = _rounded(rng, (6, 16, 2, 64), BF16)
    buf = dev(pool)
    pages = buf[1:5]  # 4 pages; the guard pages 0 and 5 must stay as they are
    table = dev(np.array([[0, 1, 7, -3]], np.int32))
    q, k, v = (dev(_rounded(rng, s, BF16)) for s in ((1, 1, 4, 64), (1, 1, 2, 64), (1, 1, 2, 64)))
    out = cuflash.attention_with_kvcache(q, pages, dev(pool)[1:5], k, v, cache_seqlens=dev(np.array([40], np.int32)),
                                         block_table=table)
    cupy.cuda.runtime.deviceSynchronize()
    after = host(buf)
    np.testing.assert_array_equal(bits(after[[0, 5]]), bits(pool[[0, 5]]))
    np.testing.assert_array_equal(bits(after[1:5]), bits(pool[1:5]))  # row 40 is on page 7: dropped
    assert np.isfinite(host(out).astype(np.float32)).all()


# ---- PyTorch: the drop-in, the plan cache, CUDA graphs --------------------------------------


def test_torch_repeat_calls_take_the_plan_cache(monkeypatch):
    torch = pytest.importorskip("torch")
    from cuflash.torch import flash_attn_with_kvcache

    calls = []
    real = _kvcache._full_path
    monkeypatch.setattr(_kvcache, "_full_path", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q = torch.randn(2, 1, 8, 128, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(2, 64, 2, 128, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    k, v = torch.randn(2, 1, 2, 128, device="cuda", dtype=torch.bfloat16), torch.randn(2, 1, 2, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor([3, 9], dtype=torch.int32, device="cuda")
    first = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens)
    second = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens + 1)
    assert len(calls) == 1 and first.shape == second.shape == q.shape
    assert torch.isfinite(second).all()


def test_torch_cuda_graph_replays_with_new_lengths():
    """A captured decode step replays correctly as cache_seqlens, q, k and v change in
    place between replays: each replay appends at the new lengths and attends over them."""
    torch = pytest.importorskip("torch")
    from cuflash.torch import flash_attn_with_kvcache

    torch.manual_seed(0)
    b, h, hk, d, cap = 3, 8, 2, 128, 256
    kc = torch.randn(b, cap, hk, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(b, 1, hk, d, device="cuda", dtype=torch.bfloat16), torch.randn(b, 1, hk, d, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor([5, 0, 100], dtype=torch.int32, device="cuda")
    kc0, vc0 = kc.clone(), vc.clone()
    flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, causal=True)  # warm-up: compile, load, plan
    kc.copy_(kc0)
    vc.copy_(vc0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, causal=True)
    assert torch.equal(kc, kc0)  # capture runs nothing
    for step in range(3):
        q.copy_(torch.randn_like(q))
        k.copy_(torch.randn_like(k))
        v.copy_(torch.randn_like(v))
        new_lens = torch.tensor([5 + step, 17 * step, 100 + 50 * step], dtype=torch.int32)
        lens.copy_(new_lens)
        before_k, before_v = kc.clone(), vc.clone()
        graph.replay()
        torch.cuda.synchronize()

        def h64(t):
            return t.float().cpu().numpy().astype(np.float64)

        ref_out, _, ref_kc, ref_vc = cuflash.kvcache_reference(h64(q), h64(before_k), h64(before_v), h64(k), h64(v),
                                                               cache_seqlens=new_lens.numpy(), causal=True)
        np.testing.assert_array_equal(h64(kc), ref_kc)
        np.testing.assert_array_equal(h64(vc), ref_vc)
        err = np.abs(h64(out) - ref_out).max()
        assert err < 2e-2, f"replay {step}: max error {err}"
