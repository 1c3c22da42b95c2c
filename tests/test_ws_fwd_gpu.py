"""The warp-specialised Hopper forward (flash_fwd_ws_sm90.cu) against the float64
reference, on the GPU, with the family forced (CUFLASH_FWD_FAMILY's switch) and every
case checking that the family really ran: plain, and compiled with the score modifiers
and dropout (CF_GENERAL). Same tolerance method, NaN-poisoned outputs and fresh random
inputs as tests/test_kernels_gpu.py, whose case machinery this reuses. Skips off Hopper:
the family exists only on sm_90."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_kernels_gpu import Case, case_seed, dev, host, poison_outputs, run_case, with_examples  # noqa: F401

import cuflash
from cuflash import _build, _fast, _tiles, reference
from cuflash._interop import BFLOAT16

pytestmark = pytest.mark.gpu

# Head dims the family serves: whole 16-byte rows, padded to 64, 128 or 256.
WS_HEAD_DIMS = (8, 40, 64, 72, 96, 128, 200, 224, 256)
LENGTHS = (1, 2, 17, 31, 97, 127, 128, 129, 131, 257, 509)


class _Recorded(list):
    """Kernel files of the modules loaded, in order; `variants` holds the variants."""

    def __init__(self):
        super().__init__()
        self.variants = []

    def clear(self):
        super().clear()
        self.variants.clear()

    def ran_ws(self, general: bool) -> bool:
        return any(v.kernel_file == _tiles.WS_FWD_FILE and dict(v.defines)["CF_GENERAL"] == int(general)
                   for v in self.variants)


@pytest.fixture
def kernels_run(monkeypatch):
    """Forces the family and records the kernel file of every module loaded."""
    import cupy

    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the warp-specialised forward runs on sm_90 only")
    monkeypatch.setattr(_tiles, "FWD_FAMILY", "ws")
    _fast.clear()
    files = _Recorded()
    real = _build.module

    def recording(variant, device_index):
        files.append(variant.kernel_file)
        files.variants.append(variant)
        return real(variant, device_index)

    monkeypatch.setattr(_build, "module", recording)
    yield files
    _fast.clear()


def _general(case: Case) -> bool:
    return bool(case.softcap or case.alibi or case.bias_shape or case.mask_shape or case.dropout_p)


def _run_ws(case: Case, files: list, seed: int | None = None, backward: bool = False) -> None:
    files.clear()
    run_case(case, seed=case_seed(case) if seed is None else seed, backward=backward)
    lengths = case.varlen or ((case.seqlen_q, case.seqlen_k),)
    if not any(nq and nk for nq, nk in lengths):
        return  # no query sees a key: the outputs are filled without a kernel
    assert files.ran_ws(_general(case)), f"{case} did not run the warp-specialised forward: {files.variants}"


def _pinned() -> list[Case]:
    cases = []
    for d in (64, 128, 256):
        for dtype in ("fp16", "bf16"):
            for causal in (False, True):
                # several query and key tiles, the last of each partial; seqlen_q != seqlen_k
                cases.append(Case(batch=2, seqlen_q=257, seqlen_k=389, heads=2, heads_kv=2, head_dim=d, dtype=dtype,
                                  causal=causal))
                cases.append(Case(batch=1, seqlen_q=389, seqlen_k=131, heads=2, heads_kv=1, head_dim=d, dtype=dtype,
                                  causal=causal, alignment="top_left"))
    for nq, nk in ((1, 1), (2, 3), (17, 17), (127, 129), (1021, 1031)):
        cases.append(Case(batch=1, seqlen_q=nq, seqlen_k=nk, heads=3, heads_kv=1, head_dim=64, dtype="bf16", causal=nq > 100))
    for d in (8, 40, 72, 96, 200, 224):  # padded head dims: TMA zero-fills the columns past head_dim
        cases.append(Case(batch=1, seqlen_q=77, seqlen_k=130, heads=2, heads_kv=2, head_dim=d, dtype="fp16"))
    cases.append(Case(heads=4, heads_kv=1, dtype="bf16", layout="bhsd", seqlen_q=200, seqlen_k=300))  # MQA, bhsd
    cases.append(Case(heads=6, heads_kv=2, dtype="fp16", head_dim=128, seqlen_q=150, seqlen_k=150, causal=True))  # GQA
    for alignment in ("bottom_right", "top_left"):
        # seqlen_q > seqlen_k: under bottom-right alignment the first rows see no key (LSE -inf, O 0)
        cases.append(Case(seqlen_q=300, seqlen_k=40, causal=True, alignment=alignment, dtype="fp16"))
        cases.append(Case(seqlen_q=40, seqlen_k=300, causal=True, alignment=alignment, dtype="bf16", head_dim=128))
    # sliding windows, some leaving whole key tiles and whole rows without keys
    cases.append(Case(seqlen_q=500, seqlen_k=500, window=(37, 5), dtype="bf16", head_dim=128))
    cases.append(Case(seqlen_q=300, seqlen_k=700, window=(0, 0), dtype="fp16", head_dim=64, alignment="top_left"))
    cases.append(Case(seqlen_q=260, seqlen_k=260, window=(64, -1), causal=True, dtype="bf16", head_dim=256))
    # position offsets (a chunk of a longer sequence): the diagonal moves
    cases.append(Case(seqlen_q=130, seqlen_k=300, causal=True, positions=(170, 0), dtype="bf16", head_dim=128))
    cases.append(Case(seqlen_q=130, seqlen_k=300, causal=True, positions=(0, 100), dtype="fp16", head_dim=64))
    # softmax scales other than 1/sqrt(d): negative reverses the order, zero is uniform
    for scale in (0.3, -0.25, 0.0):
        cases.append(Case(seqlen_q=150, seqlen_k=150, causal=True, dtype="bf16", softmax_scale=scale))
    # variable-length batches: empty sequences, sequences shorter and longer than a tile
    cases.append(Case(heads=2, heads_kv=1, dtype="bf16", head_dim=128, varlen=((5, 7), (0, 9), (130, 1), (257, 300), (1, 0))))
    cases.append(Case(heads=4, heads_kv=2, dtype="fp16", head_dim=64, causal=True,
                      varlen=((200, 200), (131, 129), (17, 260))))
    cases.append(Case(heads=2, heads_kv=2, dtype="bf16", head_dim=256, window=(20, 3), varlen=((100, 90), (70, 130))))
    return cases


@pytest.mark.parametrize("case", _pinned(), ids=repr)
def test_pinned_cases_match_float64(case, kernels_run):
    _run_ws(case, kernels_run)


@st.composite
def ws_cases(draw):
    heads_kv = draw(st.sampled_from((1, 2)))
    return Case(
        batch=draw(st.integers(1, 2)),
        seqlen_q=draw(st.sampled_from(LENGTHS)),
        seqlen_k=draw(st.sampled_from(LENGTHS)),
        heads=heads_kv * draw(st.sampled_from((1, 2, 3))),
        heads_kv=heads_kv,
        head_dim=draw(st.sampled_from(WS_HEAD_DIMS)),
        dtype=draw(st.sampled_from(("fp16", "bf16"))),
        causal=draw(st.booleans()),
        alignment=draw(st.sampled_from(("bottom_right", "top_left"))),
        layout=draw(st.sampled_from(("bshd", "bhsd"))),
        window=draw(st.sampled_from(((-1, -1), (-1, -1), (50, 0), (3, 60)))),
        positions=draw(st.sampled_from(((0, 0), (0, 0), (64, 0), (0, 33)))),
        softmax_scale=draw(st.sampled_from((None, None, 0.5, -0.3))),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=ws_cases())
def test_property_cases_match_float64(case, kernels_run):
    _run_ws(case, kernels_run)


# ---- score modifiers and dropout (the family compiled with CF_GENERAL) -----------------------


def _pinned_features() -> list[Case]:
    cases = []
    for d in (64, 128, 256):
        for dtype in ("fp16", "bf16"):
            # several query and key tiles, the last of each partial, every modifier at once
            cases.append(Case(batch=2, seqlen_q=257, seqlen_k=389, heads=2, heads_kv=1, head_dim=d, dtype=dtype,
                              causal=d == 128, softcap=20.0, alibi="h", bias_shape=("b", "h", "q", "k"),
                              mask_shape=("b", "1", "1", "k")))
        cases.append(Case(batch=2, seqlen_q=200, seqlen_k=300, heads=2, heads_kv=2, head_dim=d, dtype="bf16",
                          dropout_p=0.1))
    cases += [
        Case(softcap=10.0, dtype="bf16", seqlen_q=150, seqlen_k=150),
        Case(softcap=5.0, dtype="fp16", seqlen_q=130, seqlen_k=140, causal=True, head_dim=128),
        Case(alibi="h", causal=True, dtype="fp16", seqlen_q=300, seqlen_k=300),
        Case(alibi="bh", dtype="bf16", seqlen_q=100, seqlen_k=257, head_dim=128, alignment="top_left", causal=True),
        # float biases of several broadcast shapes (bf16 and fp16, as the inputs)
        Case(bias_shape=("b", "h", "q", "k"), dtype="bf16", seqlen_q=131, seqlen_k=200),
        Case(bias_shape=("1", "h", "q", "k"), dtype="fp16", heads=4, heads_kv=2, seqlen_q=129, seqlen_k=129),
        Case(bias_shape=("b", "1", "1", "k"), dtype="bf16", head_dim=256, seqlen_q=70, seqlen_k=300),
        Case(bias_shape=("q", "k"), dtype="fp16", head_dim=128, seqlen_q=97, seqlen_k=170, causal=True),
        # boolean masks with a fully masked row (row 3, draw_inputs): output 0, LSE -inf
        Case(mask_shape=("b", "1", "1", "k"), dtype="bf16", seqlen_q=200, seqlen_k=260),
        Case(mask_shape=("b", "h", "q", "k"), seqlen_q=33, seqlen_k=70, dtype="fp16"),
        Case(mask_shape=("q", "k"), seqlen_q=140, seqlen_k=140, dtype="bf16", head_dim=128, window=(40, 10)),
        # dropout, with sliding windows and position offsets (q_start % 16 == 0, k_start even)
        Case(dropout_p=0.5, dtype="fp16", causal=True, seqlen_q=150, seqlen_k=150, head_dim=128),
        Case(dropout_p=0.2, dtype="bf16", positions=(32, 6), causal=True, seqlen_q=130, seqlen_k=200),
        Case(softcap=30.0, alibi="bh", positions=(48, 100), causal=True, dtype="bf16", seqlen_q=130, seqlen_k=300),
        # variable-length batches: empty sequences, sequences shorter and longer than a tile
        Case(varlen=((5, 9), (0, 4), (130, 200), (3, 0)), heads=4, heads_kv=2, dtype="bf16", causal=True,
             softcap=15.0, alibi="h"),
        Case(varlen=((40, 50), (17, 17), (150, 140)), dtype="fp16", bias_shape=("b", "h", "q", "k"), dropout_p=0.1,
             softcap=20.0, alibi="h", mask_shape=("b", "1", "1", "k"), window=(20, 5), head_dim=128),
        Case(varlen=((100, 90), (70, 130)), dtype="bf16", head_dim=256, dropout_p=0.3, mask_shape=("b", "h", "q", "k")),
    ]
    return cases


@pytest.mark.parametrize("case", _pinned_features(), ids=repr)
def test_feature_cases_match_float64(case, kernels_run):
    """Forward through the family compiled with the modifiers, then the (unchanged)
    backward from its output and LSE: the bias gradient, and dropout's gradients from the
    keep mask the backward regenerates, against float64 too."""
    _run_ws(case, kernels_run, backward=True)


@st.composite
def ws_feature_cases(draw):
    heads_kv = draw(st.sampled_from((1, 2)))
    varlen = None
    if draw(st.booleans()):
        varlen = tuple(draw(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 200)), min_size=1, max_size=3)))
    dropout_p = draw(st.sampled_from((0.0, 0.0, 0.1, 0.5)))
    positions = draw(st.sampled_from(((0, 0), (0, 0), (64, 0), (16, 34))))
    return Case(
        batch=draw(st.integers(1, 2)),
        seqlen_q=draw(st.sampled_from(LENGTHS)),
        seqlen_k=draw(st.sampled_from(LENGTHS)),
        heads=heads_kv * draw(st.sampled_from((1, 2))),
        heads_kv=heads_kv,
        head_dim=draw(st.sampled_from(WS_HEAD_DIMS)),
        dtype=draw(st.sampled_from(("fp16", "bf16"))),
        causal=draw(st.booleans()),
        alignment=draw(st.sampled_from(("bottom_right", "top_left"))),
        window=draw(st.sampled_from(((-1, -1), (-1, -1), (50, 0), (3, 60)))),
        positions=positions,
        softcap=draw(st.sampled_from((0.0, 5.0, 30.0))),
        alibi=draw(st.sampled_from(("", "", "h", "bh"))),
        bias_shape=draw(st.sampled_from((None, None, ("b", "h", "q", "k"), ("1", "h", "q", "k"), ("b", "1", "1", "k"),
                                         ("q", "k")))),
        mask_shape=draw(st.sampled_from((None, None, ("b", "h", "q", "k"), ("b", "1", "1", "k"), ("q", "k")))),
        dropout_p=dropout_p,
        varlen=varlen,
    )


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=ws_feature_cases())
def test_property_feature_cases_match_float64(case, kernels_run):
    _run_ws(case, kernels_run, backward=True)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("positions", [(0, 0), (32, 6)])
def test_dropout_keep_mask_is_numpy_philox_bit_for_bit(kernels_run, head_dim, dtype, positions):
    """With V the identity (Nk = head_dim, v[j] = e_j) each output element is
    p_ij * keep_ij / (1 - p): its sign is the kernel's keep decision, which must be the
    NumPy Philox's (reference.dropout_keep_mask), the portable kernel's and the backward's."""
    import cupy

    b, h, nq, nk, p = 2, 3, 200, head_dim, 0.3
    np_dtype = np.float16 if dtype == "fp16" else BFLOAT16
    rng = np.random.default_rng(head_dim)
    q = (rng.standard_normal((b, nq, h, head_dim), dtype=np.float32) * 0.1).astype(np_dtype)
    k = (rng.standard_normal((b, nk, h, head_dim), dtype=np.float32) * 0.1).astype(np_dtype)
    v = np.broadcast_to(np.eye(nk, dtype=np.float32)[None, :, None, :], (b, nk, h, head_dim)).astype(np_dtype)
    seed = 0x1234_5678_9ABC_DEF0
    opts = {"dropout_p": p, "seed": seed, "position_offsets": positions}
    out, _ = cuflash.forward(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), **opts)
    assert kernels_run.ran_ws(general=True)
    got = host(out).astype(np.float32).transpose(0, 2, 1, 3)  # (b, h, nq, nk)
    assert np.isfinite(got).all() and (got >= 0).all()
    kept = got > 0
    expected = reference.dropout_keep_mask(seed, p, (b, h, nq, nk), position_offsets=positions)
    assert np.array_equal(kept, expected)
    assert abs(kept.mean() - (1 - p)) < 0.02
    # the portable kernel (the family switched off): the same bits of keep decisions
    _fast.clear()
    kernels_run.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_tiles, "FWD_FAMILY", "sm90")
        portable, _ = cuflash.forward(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), **opts)
    assert "flash_fwd.cu" in kernels_run and _tiles.WS_FWD_FILE not in kernels_run
    assert np.array_equal(host(portable).astype(np.float32).transpose(0, 2, 1, 3) > 0, expected)


def test_general_calls_under_the_sm90_switch_take_the_portable_kernel(kernels_run, monkeypatch):
    """CUFLASH_FWD_FAMILY=sm90 keeps calls with modifiers on the portable kernel, so both
    paths stay testable on Hopper; the two agree within rounding of float64."""
    case = Case(batch=2, seqlen_q=257, seqlen_k=300, heads=2, heads_kv=1, head_dim=128, dtype="bf16", causal=True,
                softcap=20.0, alibi="bh", mask_shape=("b", "1", "1", "k"), dropout_p=0.1)
    _run_ws(case, kernels_run)
    monkeypatch.setattr(_tiles, "FWD_FAMILY", "sm90")
    _fast.clear()
    kernels_run.clear()
    run_case(case, seed=case_seed(case), backward=False)
    assert "flash_fwd.cu" in kernels_run and _tiles.WS_FWD_FILE not in kernels_run


def _persistent_cases() -> list[Case]:
    return [
        Case(batch=2, seqlen_q=1000, seqlen_k=1001, heads=3, heads_kv=1, head_dim=64, dtype="bf16", causal=True),
        Case(batch=3, seqlen_q=257, seqlen_k=389, heads=2, heads_kv=2, head_dim=128, dtype="fp16"),
        Case(batch=1, seqlen_q=389, seqlen_k=131, heads=4, heads_kv=2, head_dim=256, dtype="bf16", causal=True,
             alignment="top_left"),
        Case(seqlen_q=300, seqlen_k=40, causal=True, dtype="fp16", heads=4, heads_kv=4),  # rows without keys
        Case(seqlen_q=500, seqlen_k=500, window=(37, 5), dtype="bf16", head_dim=128),
        Case(heads=2, heads_kv=1, dtype="bf16", head_dim=128, varlen=((5, 7), (0, 9), (130, 1), (257, 300), (1, 0))),
        Case(heads=4, heads_kv=2, dtype="fp16", head_dim=64, causal=True, varlen=((200, 200), (131, 129), (17, 260))),
        Case(batch=2, seqlen_q=300, seqlen_k=257, heads=2, heads_kv=1, head_dim=128, dtype="bf16", causal=True,
             softcap=20.0, alibi="bh", bias_shape=("1", "h", "q", "k"), mask_shape=("b", "1", "1", "k"), dropout_p=0.2),
    ]


@pytest.mark.parametrize("blocks", [1, 3, 7])
@pytest.mark.parametrize("case", _persistent_cases(), ids=repr)
def test_persistent_blocks_walking_many_tiles_match_float64(case, blocks, kernels_run, monkeypatch):
    """The persistent grid with a few blocks, so each walks many query tiles: the K/V ring,
    the Q slot (which doubles as O's staging) and the consumers' turn order carry over
    from tile to tile, through tiles with no key at all."""
    from cuflash import _launch

    monkeypatch.setattr(_tiles, "WS_PERSISTENT", True)
    monkeypatch.setattr(_launch, "sm_count", lambda device_index: blocks)
    _run_ws(case, kernels_run)


def test_a_packed_sequences_neighbour_never_reaches_its_output(kernels_run):
    """The last key tile of a packed sequence runs into the next sequence's rows: inf and
    NaN there must change nothing (their scores are masked and their V rows zeroed)."""
    import cupy

    rng = np.random.default_rng(3)
    lens = (70, 200)  # sequence 0's only key tile is partial; sequence 1 holds the poison
    h, d = 2, 128
    total = sum(lens)
    q = rng.standard_normal((total, h, d), dtype=np.float32).astype(np.float16)
    k = rng.standard_normal((total, h, d), dtype=np.float32).astype(np.float16)
    v = rng.standard_normal((total, h, d), dtype=np.float32).astype(np.float16)
    cu = np.array([0, lens[0], total], np.int32)
    clean = cuflash.forward(dev(q), dev(k), dev(v), cu_seqlens_q=cupy.asarray(cu), cu_seqlens_k=cupy.asarray(cu))
    k[lens[0] + 3] = np.inf
    v[lens[0] + 1] = np.inf
    v[lens[0] + 2] = np.nan
    dirty = cuflash.forward(dev(q), dev(k), dev(v), cu_seqlens_q=cupy.asarray(cu), cu_seqlens_k=cupy.asarray(cu))
    assert _tiles.WS_FWD_FILE in kernels_run
    a, b = host(clean[0])[: lens[0]], host(dirty[0])[: lens[0]]
    assert np.isfinite(b).all() and np.array_equal(a, b)
    assert np.array_equal(host(clean[1])[:, : lens[0]], host(dirty[1])[:, : lens[0]])


def _close(got, ref, dtype) -> bool:
    """Within a few units of the dtype's rounding at the output's scale: loose next to the
    tolerance method, but an output computed from the wrong memory is off by O(1)."""
    eps = 2.0**-8 if dtype == "bf16" else 2.0**-11
    return bool(np.abs(got - ref).max() <= 8 * eps * max(1.0, float(np.abs(ref).max())))


def _fused_qkv(rng, b, n, h, d, dtype, extra):
    """q, k, v as slices of one (b, n, 3h + extra heads, d) buffer: strided rows."""
    buf = rng.standard_normal((b, n, 3 * h + extra, d), dtype=np.float32).astype(dtype)
    dbuf = dev(buf)
    return buf, dbuf, [(buf[:, :, i * h:(i + 1) * h], dbuf[:, :, i * h:(i + 1) * h]) for i in range(3)]


@pytest.mark.parametrize("causal", [False, True])
def test_strided_inputs_read_by_tma_match_float64(kernels_run, causal):
    rng = np.random.default_rng(4)
    _, _, parts = _fused_qkv(rng, 2, 257, 2, 64, np.float16, extra=1)
    (q, dq), (k, dk), (v, dv) = parts
    out, lse = cuflash.forward(dq, dk, dv, causal=causal)
    assert _tiles.WS_FWD_FILE in kernels_run
    ref_out, ref_lse = reference.forward(q, k, v, causal=causal)
    assert _close(host(out), ref_out, "fp16") and _close(host(lse), ref_lse, "fp16")


def test_inputs_tma_cannot_read_take_the_wgmma_kernel(kernels_run):
    """A q starting 2 bytes past a 16-byte boundary: the wgmma kernel serves the call."""
    import cupy

    rng = np.random.default_rng(5)
    b, n, h, d = 1, 130, 2, 64
    q = rng.standard_normal((b, n, h, d), dtype=np.float32).astype(np.float16)
    flat = cupy.empty(q.size + 1, dtype=cupy.float16)
    flat[1:] = dev(q).ravel()
    dq = flat[1:].reshape(q.shape)
    out, _ = cuflash.forward(dq, dev(q), dev(q))
    assert _tiles.WS_FWD_FILE not in kernels_run and "flash_fwd_sm90.cu" in kernels_run
    ref_out, _ = reference.forward(q, q, q)
    assert _close(host(out), ref_out, "fp16")


def test_repeat_calls_rebuild_descriptors_for_new_pointers(kernels_run):
    """The plan cache reuses a launch with new pointers: its descriptors must follow them
    (a stale descriptor would read the first call's tensors), and a pointer TMA cannot
    read sends the call back to the full path."""
    torch = pytest.importorskip("torch")

    gen = torch.Generator(device="cuda").manual_seed(6)
    shape = (2, 300, 4, 128)
    outs = []  # kept alive, so each call gets fresh output pointers too
    for _ in range(3):
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        out, _ = cuflash.forward(q, k, v, causal=True)
        ref_out, _ = reference.forward(*(t.float().cpu().numpy() for t in (q, k, v)), causal=True)
        assert _close(out.float().cpu().numpy(), ref_out, "bf16")
        outs.append(out)
    base = torch.randn((q.numel() + 8,), device="cuda", dtype=torch.bfloat16, generator=gen)
    q_odd = base[1 : 1 + q.numel()].view(shape)
    out, _ = cuflash.forward(q_odd, k, v, causal=True)
    ref_out, _ = reference.forward(*(t.float().cpu().numpy() for t in (q_odd, k, v)), causal=True)
    assert _close(out.float().cpu().numpy(), ref_out, "bf16")


def test_offsets_beyond_2_pow_31_elements(kernels_run):
    """A batch stride past 2^31 elements (a TMA byte stride past 2^32)."""
    import cupy

    n, h, d = 200, 2, 64
    stride = 2**31 + 4096
    buf = cupy.empty(stride + n * h * d, dtype=cupy.float16)
    rng = np.random.default_rng(7)
    data = rng.standard_normal((2, n, h, d), dtype=np.float32).astype(np.float16)
    view = cupy.lib.stride_tricks.as_strided(buf, shape=(2, n, h, d), strides=(stride * 2, h * d * 2, d * 2, 2))
    view[0] = cupy.asarray(data[0])
    view[1] = cupy.asarray(data[1])
    out, _ = cuflash.forward(view, view, view, causal=True)
    assert _tiles.WS_FWD_FILE in kernels_run
    ref_out, _ = reference.forward(data, data, data, causal=True)
    assert _close(host(out), ref_out, "fp16")
    del buf, view


def test_both_families_agree_on_a_long_causal_problem(kernels_run, monkeypatch):
    """Many key tiles (the ring wraps many times): the two Hopper families give results
    within rounding of each other and of float64."""
    case = Case(batch=1, seqlen_q=4099, seqlen_k=4099, heads=2, heads_kv=1, head_dim=128, dtype="bf16", causal=True)
    _run_ws(case, kernels_run, seed=8)
    monkeypatch.setattr(_tiles, "FWD_FAMILY", "sm90")
    _fast.clear()
    kernels_run.clear()
    run_case(dataclasses.replace(case), seed=8, backward=False)
    assert "flash_fwd_sm90.cu" in kernels_run and _tiles.WS_FWD_FILE not in kernels_run
