"""Block-sparse attention on the host: the reference's meaning of a block mask, the compact
lists and their helpers, the tile plan's promise that every kernel tile sits in one block,
and bad block masks rejected before anything runs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import _reference_jnp, _tiles, block_sparse, reference
from cuflash._interop import BFLOAT16
from cuflash._options import make_options

SIZES = [(bq, bk) for bq in block_sparse.BLOCK_SIZES for bk in block_sparse.BLOCK_SIZES]


def element_mask(blocks: np.ndarray, size, nq: int, nk: int) -> np.ndarray:
    """The dense mask a block mask stands for, element by element (independent of
    block_sparse.expand): allowed[b, h, i, j] = blocks[b, h, i // bq, j // bk]."""
    b, h = blocks.shape[:2]
    i = np.arange(nq)[:, None] // size[0]
    j = np.arange(nk)[None, :] // size[1]
    return blocks[:, :, i, j].reshape(b, h, nq, nk)


@st.composite
def block_cases(draw):
    size = draw(st.sampled_from(SIZES))
    nq = draw(st.sampled_from((1, 63, 64, 65, 130, 200, 257)))
    nk = draw(st.sampled_from((1, 64, 100, 129, 256, 300)))
    qb, kb = block_sparse.num_blocks(nq, size[0]), block_sparse.num_blocks(nk, size[1])
    heads_kv = draw(st.sampled_from((1, 2)))
    heads = heads_kv * draw(st.sampled_from((1, 2)))
    batch = draw(st.integers(1, 2))
    lead = draw(st.sampled_from(((batch, heads), (1, heads), (batch, 1), (1, 1))))
    kind = draw(st.sampled_from(("random", "empty", "full", "empty_row", "empty_col")))
    density = draw(st.sampled_from((0.05, 0.3, 0.7)))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    blocks = rng.random(lead + (qb, kb)) < density
    if kind == "empty":
        blocks[:] = False
    elif kind == "full":
        blocks[:] = True
    elif kind == "empty_row":
        blocks[..., rng.integers(qb), :] = False
    elif kind == "empty_col":
        blocks[..., :, rng.integers(kb)] = False
    opts = dict(
        causal=draw(st.booleans()),
        causal_alignment=draw(st.sampled_from(("bottom_right", "top_left"))),
        window_size=draw(st.sampled_from(((-1, -1), (70, 0), (30, 20)))),
        softcap=draw(st.sampled_from((0.0, 5.0))),
    )
    if draw(st.booleans()):
        opts["mask"] = rng.random((batch, 1, nq, nk)) < 0.8
    if draw(st.booleans()):
        opts["bias"] = rng.standard_normal((1, heads, nq, nk))
    if draw(st.booleans()):
        opts["alibi_slopes"] = rng.uniform(0.01, 0.3, heads)
    if draw(st.booleans()):
        opts["dropout_p"], opts["seed"] = 0.2, int(rng.integers(0, 2**32))
    if draw(st.booleans()):
        opts["position_offsets"] = (16 * int(rng.integers(0, 8)), 2 * int(rng.integers(0, 40)))
    return batch, heads, heads_kv, nq, nk, size, blocks, opts, seed


def _inputs(batch, heads, heads_kv, nq, nk, seed, d=8):
    rng = np.random.default_rng(seed + 1)
    q = rng.standard_normal((batch, nq, heads, d))
    k = rng.standard_normal((batch, nk, heads_kv, d))
    v = rng.standard_normal((batch, nk, heads_kv, d))
    dout = rng.standard_normal((batch, nq, heads, d))
    return q, k, v, dout


def _with_element_mask(opts, blocks, size, batch, heads, nq, nk):
    dense = np.broadcast_to(element_mask(np.broadcast_to(blocks, (batch, heads) + blocks.shape[2:]), size, nq, nk),
                            (batch, heads, nq, nk))
    out = dict(opts)
    out["mask"] = dense if "mask" not in opts else dense & opts["mask"]
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@example(case=(1, 1, 1, 130, 256, (64, 128), np.zeros((1, 1, 3, 2), bool), {}, 0))
@example(case=(2, 2, 1, 200, 129, (128, 64), np.ones((1, 2, 2, 3), bool), {"causal": True}, 1))
@given(case=block_cases())
def test_block_mask_equals_its_dense_element_mask_forward_and_backward(case):
    """Every option combined with a block mask gives exactly what the equivalent dense
    element mask (AND-ed with the other masks) gives, gradients and bias gradient too."""
    batch, heads, heads_kv, nq, nk, size, blocks, opts, seed = case
    q, k, v, dout = _inputs(batch, heads, heads_kv, nq, nk, seed)
    out, lse = reference.forward(q, k, v, block_mask=blocks, block_size=size, **opts)
    dense_opts = _with_element_mask(opts, blocks, size, batch, heads, nq, nk)
    out_d, lse_d = reference.forward(q, k, v, **dense_opts)
    np.testing.assert_array_equal(out, out_d)
    np.testing.assert_array_equal(lse, lse_d)
    grads = reference.backward(dout, q, k, v, out, lse, block_mask=blocks, block_size=size, **opts)
    grads_d = reference.backward(dout, q, k, v, out_d, lse_d, **dense_opts)
    for g, gd in zip(grads, grads_d):
        np.testing.assert_array_equal(g, gd)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=block_cases())
def test_jnp_reference_agrees_with_the_numpy_reference(case):
    """The two references implement the block mask independently (np.repeat of the
    blocks there, jnp.repeat here, both cut to the sequence lengths)."""
    batch, heads, heads_kv, nq, nk, size, blocks, opts, seed = case
    q, k, v, _ = _inputs(batch, heads, heads_kv, nq, nk, seed)
    out, lse = reference.forward(q, k, v, block_mask=blocks, block_size=size, **opts)
    o = make_options(block_mask=blocks, block_size=size, **opts)
    out_j, lse_j = _reference_jnp.forward(q, k, v, o)
    np.testing.assert_allclose(np.asarray(out_j), out, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse_j)), np.isneginf(lse))


def test_rows_with_no_block_give_zero_output_and_lse_minus_inf_and_no_gradient():
    rng = np.random.default_rng(3)
    q, k, v, dout = _inputs(1, 2, 2, 200, 150, 5)
    blocks = rng.random((1, 2, 4, 3)) < 0.6
    blocks[0, 0, 1, :] = False  # query rows 64..127 of head 0 see nothing
    blocks[0, 1, :, 2] = False  # keys 128..149 of head 1 are seen by no one
    out, lse = cuflash.forward(q, k, v, block_mask=blocks, block_size=(64, 64))
    assert np.all(out[0, 64:128, 0] == 0) and np.all(np.isneginf(lse[0, 0, 64:128]))
    dq, dk, dv = cuflash.backward(dout, q, k, v, out, lse, block_mask=blocks, block_size=(64, 64))
    assert np.all(dq[0, 64:128, 0] == 0)
    assert np.all(dk[0, 128:, 1] == 0) and np.all(dv[0, 128:, 1] == 0)


def test_varlen_blocks_are_in_each_sequences_own_coordinates():
    """Sequence b's query i and key j use blocks[b, h, i // bq, j // bk] with i, j local."""
    rng = np.random.default_rng(4)
    lens = [(70, 130), (150, 60)]
    cq = np.array([0, 70, 220], np.int32)
    ck = np.array([0, 130, 190], np.int32)
    q = rng.standard_normal((220, 2, 8))
    k = rng.standard_normal((190, 1, 8))
    v = rng.standard_normal((190, 1, 8))
    blocks = rng.random((2, 2, 3, 3)) < 0.5
    out, lse = reference.forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, block_mask=blocks, block_size=(64, 64),
                                 causal=True)
    for b, (nq, nk) in enumerate(lens):
        rq, rk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        mask = element_mask(blocks[b:b + 1], (64, 64), nq, nk)
        o1, l1 = reference.forward(q[rq][None], k[rk][None], v[rk][None], mask=mask, causal=True)
        np.testing.assert_array_equal(out[rq], o1[0])
        np.testing.assert_array_equal(lse[:, rq], l1[0])


def test_api_takes_compact_lists_and_boolean_blocks_alike():
    rng = np.random.default_rng(5)
    q, k, v, dout = _inputs(2, 4, 2, 257, 300, 6)
    blocks = rng.random((2, 4, 3, 3)) < 0.5
    compact = block_sparse.compact(blocks, (128, 128))
    a = cuflash.forward(q, k, v, block_mask=blocks, block_size=(128, 128), causal=True)
    b = cuflash.forward(q, k, v, block_mask=compact, causal=True)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    ga = cuflash.backward(dout, q, k, v, *a, block_mask=blocks, block_size=(128, 128), causal=True)
    gb = cuflash.backward(dout, q, k, v, *a, block_mask=compact, causal=True)
    for x, y in zip(ga, gb):
        np.testing.assert_array_equal(x, y)
    p = cuflash.probabilities(q, k, v, block_mask=compact, causal=True)
    allowed = element_mask(blocks, (128, 128), 257, 300)
    assert np.all(p[~allowed] == 0)


# ---- the compact lists ---------------------------------------------------------------------


def _check_lists(c: block_sparse.BlockSparse, blocks: np.ndarray):
    kv_count, kv_index = block_sparse._host(c.kv_count), block_sparse._host(c.kv_index)
    q_count, q_index = block_sparse._host(c.q_count), block_sparse._host(c.q_index)
    assert kv_count.dtype == kv_index.dtype == q_count.dtype == q_index.dtype == np.int32
    np.testing.assert_array_equal(kv_count, blocks.sum(-1))
    np.testing.assert_array_equal(q_count, blocks.sum(-2))
    for idx in np.ndindex(blocks.shape[:3]):
        np.testing.assert_array_equal(kv_index[idx][: kv_count[idx]], np.flatnonzero(blocks[idx]))
    t = np.swapaxes(blocks, -1, -2)
    for idx in np.ndindex(t.shape[:3]):
        np.testing.assert_array_equal(q_index[idx][: q_count[idx]], np.flatnonzero(t[idx]))
    np.testing.assert_array_equal(c.to_dense(), blocks)
    assert c.value_errors() == []


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(st.sampled_from((1, 2)), st.sampled_from((1, 3)), st.integers(1, 9), st.integers(1, 9)),
       density=st.sampled_from((0.0, 0.1, 0.5, 1.0)), seed=st.integers(0, 2**31))
def test_compact_lists_round_trip_and_transpose(shape, density, seed):
    blocks = np.random.default_rng(seed).random(shape) < density
    _check_lists(block_sparse.compact(blocks, (64, 128)), blocks)


def test_compact_works_on_torch_and_jax_arrays_and_broadcasts_block_dims():
    import jax.numpy as jnp
    import torch

    blocks = np.random.default_rng(0).random((2, 3, 5, 4)) < 0.4
    _check_lists(block_sparse.compact(torch.from_numpy(blocks), (64, 64)), blocks)
    _check_lists(block_sparse.compact(jnp.asarray(blocks), (64, 64)), blocks)
    row = np.array([[True, False, True]])
    c = block_sparse.compact(row, (64, 64), shape=(4, 3))
    _check_lists(c, np.broadcast_to(row, (1, 1, 4, 3)).copy())


def test_hand_built_lists_are_checked_once_and_named():
    blocks = np.random.default_rng(1).random((1, 2, 3, 3)) < 0.5
    blocks[0, 0, 0, :2] = True
    c = block_sparse.compact(blocks, (64, 64))
    q, k, v, _ = _inputs(1, 2, 2, 150, 150, 2)

    def hand(**changes):
        parts = {name: np.array(a) for name, a in c.arrays().items()}
        for name, fn in changes.items():
            fn(parts[name])
        return block_sparse.BlockSparse((64, 64), **parts)

    def first(a):
        a[0, 0, 0, 0] = 7

    def swap(a):
        a[0, 0, 0, :2] = a[0, 0, 0, 1::-1]

    def bump(a):
        a[0, 0, 0] -= 1  # the row has at least two blocks: its last one drops out of the key lists

    cases = [(hand(kv_index=first), "kv_index[(0, 0, 0, 0)]=7 is out of range [0, 3)"),
             (hand(kv_index=swap), "strictly ascending"),
             (hand(kv_count=bump), "counts are inconsistent")]
    for bad, words in cases:
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            cuflash.forward(q, k, v, block_mask=bad)
    good = hand()
    assert not good.verified
    cuflash.forward(q, k, v, block_mask=good)
    assert good.verified


@pytest.mark.parametrize("kwargs, words", [
    (dict(block_mask=np.ones((1, 1, 3, 3), bool), block_size=(32, 64)), "block_size=(32, 64)"),
    (dict(block_mask=np.ones((1, 1, 3, 3), bool), block_size=(64, 256)), "block_size=(64, 256)"),
    (dict(block_mask=np.ones((1, 1, 3, 3), bool)), "block_size=None with a boolean block_mask"),
    (dict(block_size=(64, 64)), "without a block_mask"),
    (dict(block_mask=np.ones((1, 1, 3, 3), np.int8), block_size=(64, 64)), "block_mask.dtype=int8"),
    (dict(block_mask=np.ones((1, 1, 2, 3), bool), block_size=(64, 64)), "block_mask shape (1, 1, 2, 3)"),
    (dict(block_mask=np.ones((3, 1, 3, 3), bool), block_size=(64, 64)), "block_mask shape (3, 1, 3, 3)"),
])
def test_bad_block_masks_are_named_before_anything_runs(kwargs, words):
    q, k, v, _ = _inputs(2, 2, 2, 150, 150, 3)
    with pytest.raises(ValueError) as info:
        cuflash.forward(q, k, v, **kwargs)
    assert words in str(info.value)


def test_bad_compact_lists_are_named():
    q, k, v, _ = _inputs(2, 2, 2, 150, 150, 3)
    c = block_sparse.compact(np.ones((2, 2, 3, 3), bool), (64, 64))
    with pytest.raises(ValueError, match=r"block_mask.kv_index.dtype=int64 must be int32"):
        cuflash.forward(q, k, v, block_mask=block_sparse.BlockSparse((64, 64), c.kv_count, c.kv_index.astype(np.int64),
                                                                     c.q_count, c.q_index, verified=True))
    with pytest.raises(ValueError, match=r"needs 3 x 3"):
        cuflash.forward(q, k, v, block_mask=block_sparse.compact(np.ones((2, 2, 2, 3), bool), (64, 64)))
    with pytest.raises(ValueError, match=r"differs from the compact block mask's block_size=\(64, 64\)"):
        cuflash.forward(q, k, v, block_mask=c, block_size=(128, 128))
    with pytest.raises(ValueError, match=r"batch and head dimensions \(3, 2\)"):
        cuflash.forward(q, k, v, block_mask=block_sparse.compact(np.ones((3, 2, 3, 3), bool), (64, 64)))
    with pytest.raises(ValueError, match=r"block_size=\(48, 64\)"):
        block_sparse.compact(np.ones((3, 3), bool), (48, 64))


ONE_BLOCK = np.ones((1, 1), bool)


@pytest.mark.parametrize("call, words", [
    (lambda: block_sparse.compact([[1, 0]], (64, 64)), "block_mask given as a list holds int64 values"),
    (lambda: block_sparse.compact("ab", (64, 64)), "block_mask must be a bool array (NumPy, CuPy, PyTorch or JAX)"),
    (lambda: block_sparse.compact(np.ones(3, bool), (64, 64)), "must be 2-D to 4-D"),
    (lambda: block_sparse.compact(ONE_BLOCK, (64, 64), shape=(-1, 2)), "shape=(-1, 2) must be a pair of ints >= 0"),
    (lambda: block_sparse.compact(ONE_BLOCK, (64, 64), shape="ab"), "shape='ab' must be a pair of ints >= 0"),
    (lambda: block_sparse.compact(np.ones((3, 2), bool), (64, 64), shape=(2, 2)),
     "block_mask shape (3, 2) does not broadcast"),
    (lambda: block_sparse.compact(np.ones((1, 1), np.int32), (48, 64)), "block_size=(48, 64)"),
    (lambda: block_sparse.expand(np.ones((2, 2), bool), (0, 64), 128, 128),
     "block_size=(0, 64) must be a pair of positive ints"),
    (lambda: block_sparse.expand(np.ones((2, 2), bool), (64, 64), -1, 128), "seqlen_q=-1 must be an int >= 0"),
    (lambda: block_sparse.local_global(256, 256, (64, 0)), "block_size=(64, 0) must be a pair of positive ints"),
    (lambda: block_sparse.local_global(-5, 256, (64, 64)), "seqlen_q=-5 must be an int >= 0"),
    (lambda: block_sparse.local_global(256, 256, (64, 64), window_blocks=1.5), "window_blocks=1.5 must be an int >= 0"),
    (lambda: block_sparse.strided(256, 256, (64, 64), stride=0), "stride=0 must be an int >= 1"),
    (lambda: block_sparse.strided(256, 256, (64, 64), causal="no"), "causal='no' must be a bool"),
    (lambda: block_sparse.document([100, -5], (64, 64)), "doc_lengths_q=[100, -5] must be a 1-D sequence of ints >= 0"),
    (lambda: block_sparse.document([100.5, 20], (64, 64)), "doc_lengths_q=[100.5, 20] must be a 1-D sequence"),
    (lambda: block_sparse.document([100, 20], (64, 64), [50, 2.5]), "doc_lengths_k=[50, 2.5]"),
    (lambda: block_sparse.document([100, 20], (64, 64), [50]), "doc_lengths_q has 2 documents and doc_lengths_k 1"),
    (lambda: block_sparse.random_blocks((2, 2), 2.0), "density=2.0 must be a number in [0, 1]"),
    (lambda: block_sparse.random_blocks((2, 2), float("nan")), "density=nan must be a number in [0, 1]"),
    (lambda: block_sparse.random_blocks((2, 2), "0.5"), "density='0.5' must be a number in [0, 1]"),
    (lambda: block_sparse.random_blocks((2, 2), 0.5, seed=-1), "seed=-1 must be an int in [0, 2**64)"),
    (lambda: block_sparse.random_blocks((2, 2), 0.5, seed=1.5), "seed=1.5 must be an int in [0, 2**64)"),
    (lambda: block_sparse.random_blocks((-2, 2), 0.5), "shape=(-2, 2) must be a tuple of at least two ints >= 0"),
])
def test_bad_arguments_of_the_helpers_are_named_as_validation_errors(call, words):
    """Every function of cuflash.block_sparse raises what the rest of cuflash raises for bad
    input (cuflash.ValidationError, a ValueError) naming the value, before any work: no
    ZeroDivisionError, no NumPy error, no silently wrong pattern."""
    with pytest.raises(cuflash.ValidationError) as info:
        call()
    assert words in str(info.value)


def test_helpers_take_what_they_took_before():
    """Valid spellings keep working: a list mask of bools, NumPy ints, an empty document
    list, a density of 0 or 1 and a NumPy seed."""
    _check_lists(block_sparse.compact([[True, False]], (64, 64), shape=(np.int64(3), 2)),
                 np.broadcast_to(np.array([[True, False]]), (1, 1, 3, 2)).copy())
    assert block_sparse.local_global(np.int64(256), 256, [np.int64(64), 64]).shape == (4, 4)
    assert block_sparse.document([], (64, 64)).shape == (0, 0)
    assert block_sparse.document(np.array([64, 0, 64]), (64, 64)).shape == (2, 2)
    assert not block_sparse.random_blocks((3, 3), 0, keep_diagonal=False).any()
    assert block_sparse.random_blocks((3, 3), 1.0).all()
    np.testing.assert_array_equal(block_sparse.random_blocks((4, 4), 0.5, seed=np.uint64(3)),
                                  block_sparse.random_blocks((4, 4), 0.5, seed=3))


# ---- patterns ------------------------------------------------------------------------------


def test_local_global_pattern():
    m = block_sparse.local_global(1024, 1024, (128, 128), window_blocks=1, global_blocks=1)
    assert m.shape == (8, 8)
    assert m[:, 0].all() and m[0, :].all()
    assert all(m[r, r] and m[r, max(r - 1, 0)] for r in range(8))
    assert not m[5, 2] and not m[2, 5]
    causal = block_sparse.local_global(1024, 1024, (128, 128), causal=True)
    assert not np.triu(causal, 1).any()


def test_strided_pattern_keeps_the_diagonal_and_every_stride_th_column():
    m = block_sparse.strided(1024, 1024, (64, 64), stride=4, local_blocks=1)
    assert m.shape == (16, 16)
    assert all(m[r, r] for r in range(16))
    assert m[15, 3] and m[15, 7] and not m[15, 5]
    assert not np.triu(m, 1).any()


def test_document_pattern_covers_exactly_the_block_pairs_sharing_a_document():
    lens = [100, 30, 200, 70]
    m = block_sparse.document(lens, (64, 64))
    doc = np.repeat(np.arange(4), lens)
    same = doc[:, None] == doc[None, :]
    n = sum(lens)
    want = np.zeros_like(m)
    for r in range(m.shape[0]):
        for c in range(m.shape[1]):
            want[r, c] = same[r * 64:min((r + 1) * 64, n), c * 64:min((c + 1) * 64, n)].any()
    np.testing.assert_array_equal(m, want)


def test_random_blocks_density_and_diagonal():
    m = block_sparse.random_blocks((4, 64, 64), 0.2, seed=0)
    assert 0.18 < block_sparse.density(m) < 0.25
    assert m[:, np.arange(64), np.arange(64)].all()


# ---- the tile plan -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_tile_lies_in_one_block(arch):
    """The kernels walk the listed blocks tile by tile: every tile they are planned with
    divides the block size, for every dtype, head dim and feature set."""
    limit = _tiles.SMEM_LIMIT[arch]
    for dtype in (np.float16, BFLOAT16, np.float32):
        for d in _tiles.HEAD_DIM_BUCKETS:
            for general in (False, True):
                for size in SIZES:
                    variant, t, _ = _tiles.forward_variant(dtype, d, general, limit, arch, block_size=size)
                    assert size[0] % t.block_m == 0 and size[1] % t.block_n == 0, (variant.tag, size)
                    assert ("CF_BLOCK_SPARSE", 1) in variant.defines
                    plan = _tiles.backward_variant(dtype, d, general, limit, arch, size)
                    for tiles in (plan.dkdv, plan.dq):
                        assert size[0] % tiles.block_m == 0 and size[1] % tiles.block_n == 0, (plan, size)
                    for v in (plan.variant, plan.dkdv_variant):
                        assert v is None or ("CF_BLOCK_SPARSE", 1) in v.defines
    dense, _, _ = _tiles.forward_variant(np.float16, 64, False, limit, arch)
    assert all(name != "CF_BLOCK_SPARSE" for name, _ in dense.defines)


def test_params_record_carries_the_lists_and_block_size():
    """fill() puts the four list pointers and (batch|1, heads|1, query blocks, key blocks,
    block_q, block_k) where the kernels read them (params.h's bs_* fields)."""
    import dataclasses

    from cuflash import _params
    from test_build import _views

    views = _views({name: 0x1000 * (i + 1) for i, name in enumerate(
        ("q", "k", "v", "out", "lse", "dout", "dq", "dk", "dv", "dsum", "lse_log2", "dq_accum"))})

    class Ptr:
        def __init__(self, ptr, shape):
            self.data = type("P", (), {"ptr": ptr})()
            self.shape = shape

    lists = block_sparse.BlockSparse((64, 128), Ptr(0xA000, (1, 4, 2)), Ptr(0xB000, (1, 4, 2, 1)),
                                     Ptr(0xC000, (1, 4, 1)), Ptr(0xD000, (1, 4, 1, 2)), verified=True)
    views = dataclasses.replace(views, block_sparse=lists)
    opts = make_options(block_mask=lists)
    dims = _params.Dims(batch=2, seqlen_q=70, seqlen_k=90, num_heads=4, num_heads_kv=2, head_dim=64)
    rec = _params.fill(views, opts, dims).pack()
    assert (int(rec["bs_kv_count"]), int(rec["bs_kv_index"]), int(rec["bs_q_count"]), int(rec["bs_q_index"])) == (
        0xA000, 0xB000, 0xC000, 0xD000)
    assert [int(rec[f]) for f in ("bs_batches", "bs_heads", "bs_q_blocks", "bs_k_blocks", "bs_block_q", "bs_block_k")] == [
        1, 4, 2, 1, 64, 128]
    dense = _params.fill(dataclasses.replace(views, block_sparse=None), make_options(), dims).pack()
    assert int(dense["bs_kv_index"]) == 0 and int(dense["bs_block_q"]) == 0


def test_a_block_size_that_is_not_a_pair_is_named_not_a_crash():
    q = np.zeros((1, 256, 2, 16))
    with pytest.raises(cuflash.ValidationError, match=r"block_size=128 must be a pair of ints"):
        cuflash.attention(q, q, q, block_mask=np.ones((2, 2), bool), block_size=128)


def test_block_sparse_lists_given_as_python_lists_are_named():
    from cuflash.block_sparse import BlockSparse

    index = np.zeros((1, 1, 2, 2), np.int32)
    with pytest.raises(ValueError, match=r"kv_count given as a list must be an int32 array"):
        BlockSparse((128, 128), [[[2, 2]]], index, np.zeros((1, 1, 2), np.int32), index)
    with pytest.raises(ValueError, match=r"block_size=\(100, 128\)"):
        BlockSparse((100, 128), np.zeros((1, 1, 2), np.int32), index, np.zeros((1, 1, 2), np.int32), index)
