"""On the GPU: non-finite inputs, global positions (position_offsets) and the dropout
state read from device memory (rng_state), for every kernel family.

Each promise is checked against the float64 reference, which tests/test_nonfinite_positions.py
pins to plain softmax(QKᵀ)V on the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuflash
from cuflash import _tiles, reference

from _tolerance import BF16
from test_kernels_gpu import Case, dev, host, run_case

pytestmark = pytest.mark.gpu

FAMILIES = ("planned", "portable")  # planned: the Hopper family where it serves the call


@pytest.fixture(params=FAMILIES)
def family(request, monkeypatch):
    if request.param == "portable":
        monkeypatch.setattr(_tiles, "WGMMA_ENABLED", False)
    return request.param


# ---- non-finite inputs ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32])
@pytest.mark.parametrize("where,value", [("q", np.nan), ("k", np.nan), ("q", np.inf), ("k", -np.inf)])
def test_non_finite_q_or_k_reaches_every_row_it_touches(family, dtype, where, value):
    """A NaN or inf in q row i (k row j) makes NaN exactly the output rows whose scores it
    touches, as the float64 reference (plain softmax(QKᵀ)V) does; the rest match it. Causal
    masking hides the bad key from the rows before it."""
    import cupy

    rng = np.random.default_rng()
    b, nq, nk, h, d = 1, 150, 150, 2, 64
    arrays = {n: rng.standard_normal(s).astype(np.float32) for n, s in
              (("q", (b, nq, h, d)), ("k", (b, nk, h, d)), ("v", (b, nk, h, d)), ("dout", (b, nq, h, d)))}
    row = 70
    arrays[where][0, row, 1, 5] = value
    arrays = {n: a.astype(dtype) for n, a in arrays.items()}
    q, k, v = (cupy.asarray(arrays[n]) for n in "qkv")
    out, lse = cuflash.forward(q, k, v, causal=True)
    ref_out, ref_lse = reference.forward(*(arrays[n].astype(np.float64) for n in "qkv"), causal=True)
    got_nan = np.isnan(host(out)).any(axis=-1)
    want_nan = np.isnan(ref_out).any(axis=-1)
    assert want_nan.any(), "the reference must show the NaN rows"
    if dtype == np.float32 and np.isinf(value):
        # fp32 runs on the tensor cores as three bf16 terms, and 0 * inf among their
        # products is NaN: an infinity gives NaN in every row it touches (see mma.cuh's
        # split3), a superset of the exact NaN rows; untouched rows stay exact.
        touched = np.zeros_like(want_nan)
        if where == "q":
            touched[0, row, 1] = True
        else:
            touched[0, row:, 1] = True  # causal: the rows from `row` on see key `row`
        assert np.array_equal(got_nan, touched) and not (want_nan & ~touched).any()
        want_nan = touched
    else:
        assert np.array_equal(got_nan, want_nan)
        assert np.array_equal(np.isnan(host(lse)), np.isnan(ref_lse))
    finite = ~want_nan
    assert np.allclose(host(out)[finite], ref_out[finite], atol=3e-2)
    dq, dk, dv = cuflash.backward(cupy.asarray(arrays["dout"]), q, k, v, out, lse, causal=True)
    assert np.isnan(host(dq)).any() and np.isnan(host(dk)).any() and np.isnan(host(dv)).any()


def test_fully_masked_rows_stay_zero_next_to_nan_rows(family):
    """Masking removes keys, NaN does not: a row whose keys are all masked keeps output 0
    and LSE -inf even when another row is NaN."""
    import cupy

    rng = np.random.default_rng()
    q = rng.standard_normal((1, 40, 2, 64)).astype(np.float16)
    k = rng.standard_normal((1, 20, 2, 64)).astype(np.float16)
    v = rng.standard_normal((1, 20, 2, 64)).astype(np.float16)
    q[0, 35, 0, 0] = np.nan
    out, lse = cuflash.forward(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), causal=True)  # bottom-right
    out, lse = host(out), host(lse)
    assert np.all(out[0, :20] == 0) and np.all(lse[0, :, :20] == -np.inf)
    assert np.isnan(out[0, 35, 0]).all() and not np.isnan(out[0, 35, 1]).any()


# ---- position offsets -------------------------------------------------------------------


POSITION_CASES = [
    Case(seqlen_q=96, seqlen_k=128, causal=True, alignment="top_left", positions=(128, 64), dtype="bf16"),
    Case(seqlen_q=77, seqlen_k=130, causal=True, positions=(300, 17), dtype="fp16"),
    Case(seqlen_q=64, seqlen_k=64, window=(40, 8), positions=(0, 70), dtype="bf16", head_dim=128),
    Case(seqlen_q=100, seqlen_k=90, alibi="h", causal=True, alignment="top_left", positions=(256, 200), dtype="fp16"),
    Case(seqlen_q=80, seqlen_k=96, dropout_p=0.2, positions=(160, 34), dtype="bf16"),
    Case(seqlen_q=65, seqlen_k=200, causal=True, deterministic=True, positions=(1024, 900), dtype="fp32"),
    Case(varlen=((30, 50), (0, 7), (45, 45)), causal=True, positions=(48, 12), dtype="bf16"),
    Case(seqlen_q=300, seqlen_k=333, heads=4, heads_kv=2, head_dim=256, causal=True, alignment="top_left",
         positions=(333, 0), dtype="bf16"),
]


@pytest.mark.parametrize("case", POSITION_CASES, ids=lambda c: f"{c.dtype}-{c.seqlen_q}x{c.seqlen_k}-{c.positions}")
def test_position_offsets_match_float64_within_tolerance(family, case):
    run_case(case, seed=int(np.random.default_rng().integers(2**31)))


def test_chunks_with_positions_merge_to_the_whole_causal_attention(family):
    """Causal attention over a 512-token sequence, computed as the four (query chunk, key
    chunk) pairs of 256 with their global positions and merged through the LSE, equals the
    whole computation (the identity context parallelism rests on)."""
    import cupy

    rng = np.random.default_rng()
    n, c = 512, 256
    q, k, v = (cupy.asarray(rng.standard_normal((1, n, 2, 64)).astype(np.float16)) for _ in range(3))
    whole, _ = cuflash.forward(q, k, v, causal=True)
    for qi in range(2):
        parts = []
        for ki in range(qi + 1):
            qs, ks = slice(qi * c, (qi + 1) * c), slice(ki * c, (ki + 1) * c)
            o, l = cuflash.forward(q[:, qs], k[:, ks], v[:, ks], causal=True, causal_alignment="top_left",
                                   position_offsets=(qi * c, ki * c))
            parts.append((host(o), host(l)))
        lse = np.logaddexp.reduce([l for _, l in parts], axis=0)
        merged = sum(o * np.exp(l - lse).transpose(0, 2, 1)[..., None] for o, l in parts)
        assert np.allclose(merged, host(whole)[:, qi * c:(qi + 1) * c], atol=2e-3)


# ---- dropout state in device memory -------------------------------------------------------


def test_rng_state_on_the_device_gives_the_reference_mask():
    """The kernels read [seed, offset] from device memory: the mask is the reference's for
    that pair, bit for bit (identity V makes each output element a keep decision)."""
    import cupy

    b, h, nq, nk, p = 1, 2, 96, 64, 0.25
    rng = np.random.default_rng()
    q = rng.standard_normal((b, nq, h, nk), dtype=np.float32) * 0.1
    k = rng.standard_normal((b, nk, h, nk), dtype=np.float32) * 0.1
    v = np.broadcast_to(np.eye(nk, dtype=np.float32)[None, :, None, :], (b, nk, h, nk)).copy()
    seed, offset = int(rng.integers(2**63)), int(rng.integers(2**32))
    state = cupy.asarray(np.array([seed, offset], dtype=np.uint64))
    out, _ = cuflash.forward(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), dropout_p=p, rng_state=state)
    kept = host(out).transpose(0, 2, 1, 3) > 0
    assert np.array_equal(kept, reference.dropout_keep_mask(seed, p, (b, h, nq, nk), offset=offset))
    # The state is read when the kernel runs: change it on the device, get another mask.
    state[1] += 1
    again, _ = cuflash.forward(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), dropout_p=p, rng_state=state)
    assert np.array_equal(host(again).transpose(0, 2, 1, 3) > 0,
                          reference.dropout_keep_mask(seed, p, (b, h, nq, nk), offset=offset + 1))


def test_torch_dropout_is_fresh_on_each_cuda_graph_replay_and_reproducible_eagerly():
    torch = pytest.importorskip("torch")
    import cuflash.torch as cft

    q, k, v = (torch.randn(1, 128, 2, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    torch.manual_seed(11)
    first = cft.attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(11)
    assert torch.equal(first, cft.attention(q, k, v, dropout_p=0.3))  # eager: reproducible
    static_q = q.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cft.attention(static_q, k, v, dropout_p=0.3)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = cft.attention(static_q, k, v, dropout_p=0.3)
    outs = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        outs.append(static_out.clone())
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    for o in outs:  # each replay is a valid dropout draw: about 70% of the weights kept
        assert torch.isfinite(o).all()


def test_torch_dropout_gradient_uses_the_forwards_device_state():
    """The backward regenerates the forward's mask from the saved device pair: out and the
    gradients match the float64 reference given that pair (the adapter's draw is
    torch.randint on the device after torch.manual_seed, so the test can redraw it)."""
    torch = pytest.importorskip("torch")
    import cuflash.torch as cft

    rng = np.random.default_rng()
    arrays = [rng.standard_normal((1, 64, 2, 32)).astype(np.float32) for _ in range(4)]
    q, k, v = (torch.tensor(a, device="cuda", requires_grad=True) for a in arrays[:3])
    dout = torch.tensor(arrays[3], device="cuda")
    seed = int(rng.integers(2**31))
    info = torch.iinfo(torch.int64)
    torch.manual_seed(seed)
    pair = torch.randint(info.min, info.max, (2,), dtype=torch.int64, device="cuda").cpu().numpy().view(np.uint64)
    torch.manual_seed(seed)
    out = cft.attention(q, k, v, dropout_p=0.2)
    out.backward(dout)
    a64 = [a.astype(np.float64) for a in arrays]
    ref_out, ref_lse = reference.forward(*a64[:3], dropout_p=0.2, rng_state=pair)
    ref_grads = reference.backward(a64[3], *a64[:3], ref_out, ref_lse, dropout_p=0.2, rng_state=pair)
    assert np.allclose(out.detach().cpu().numpy(), ref_out, atol=1e-4)
    for got, want in zip((q.grad, k.grad, v.grad), ref_grads):
        assert np.allclose(got.cpu().numpy(), want, atol=1e-3)
