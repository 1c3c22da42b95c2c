"""Non-finite inputs, global positions (position_offsets) and a dropout state given as an
array (rng_state), on the host path: the specification the kernels are held to.

Non-finite inputs follow softmax(QKᵀ)V evaluated directly (PyTorch's math backend): a NaN in
q or k reaches every output row whose scores it touches; only masking removes a key.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuflash
from cuflash import reference


def _direct(q, k, v, allowed):
    """softmax(QKᵀ/sqrt(d))V with no special cases, (b, s, h, d) layout, masked scores -inf."""
    d = q.shape[-1]
    s = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(d)
    s = np.where(allowed, s, -np.inf)
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        p = p / p.sum(axis=-1, keepdims=True)
        return np.einsum("bhij,bjhd->bihd", p, v)


def _qkv(rng, nq=12, nk=12, h=2, d=8):
    return (rng.standard_normal((1, nq, h, d)), rng.standard_normal((1, nk, h, d)),
            rng.standard_normal((1, nk, h, d)))


@pytest.mark.parametrize("where,value", [("q", np.nan), ("k", np.nan), ("q", np.inf), ("k", np.inf), ("k", -np.inf)])
def test_non_finite_q_or_k_gives_nan_where_direct_softmax_does(where, value):
    rng = np.random.default_rng()
    q, k, v = _qkv(rng)
    {"q": q, "k": k}[where][0, 5, 1, 3] = value
    # An infinite entry gives a +inf score (so a NaN row) only where its partner entry has
    # its sign: fix one partner so that the case cannot come out all-finite by chance.
    # (Row 11 attends key 5; row 5 attends key 0.)
    sign = -1.0 if value == -np.inf else 1.0
    if where == "k":
        q[0, 11, 1, 3] = sign
    else:
        k[0, 0, 1, 3] = sign
    causal = np.tril(np.ones((12, 12), dtype=bool))
    out, lse = cuflash.forward(q, k, v, causal=True)
    want = _direct(q, k, v, causal)
    assert np.array_equal(np.isnan(out), np.isnan(want))
    assert np.isnan(want).any()
    ok = ~np.isnan(want)
    np.testing.assert_allclose(out[ok], want[ok], atol=1e-12)
    # The LSE is NaN exactly on the NaN rows.
    assert np.array_equal(np.isnan(lse), np.isnan(want).any(axis=-1).transpose(0, 2, 1))


def test_nan_in_v_reaches_the_rows_that_attend_its_key():
    """(Rows that mask the key are not promised anything: 0 * NaN is NaN in a product, so
    whether they see it depends on what a kernel skips. Masked keys' values should be finite.)"""
    rng = np.random.default_rng()
    q, k, v = _qkv(rng)
    v[0, 7, 0, 0] = np.nan
    out, _ = cuflash.forward(q, k, v, causal=True)
    assert np.isnan(out[0, 7:, 0, 0]).all() and not np.isnan(out[0, :, 1]).any()


def test_gradients_follow_non_finite_inputs():
    rng = np.random.default_rng()
    q, k, v = _qkv(rng)
    q[0, 4, 0, 1] = np.nan
    out, lse = cuflash.forward(q, k, v)
    dq, dk, dv = cuflash.backward(np.ones_like(out), q, k, v, out, lse)
    assert np.isnan(dq[0, 4, 0]).all() and not np.isnan(dq[0, 3]).any()
    assert np.isnan(dk[:, :, 0]).all() and np.isnan(dv[:, :, 0]).all()
    assert not np.isnan(dk[:, :, 1]).any()


def test_fully_masked_rows_stay_zero_whatever_other_rows_hold():
    rng = np.random.default_rng()
    q, k, v = _qkv(rng, nq=10, nk=6)
    q[0, 9, 0, 0] = np.nan
    out, lse = cuflash.forward(q, k, v, causal=True)  # bottom-right: rows 0-3 see no key
    assert np.all(out[0, :4] == 0) and np.all(lse[0, :, :4] == -np.inf)
    assert np.isnan(out[0, 9, 0]).all()


def test_a_masked_nan_key_changes_nothing():
    rng = np.random.default_rng()
    q, k, v = _qkv(rng)
    clean, _ = cuflash.forward(q, k, v, causal=True)
    k[0, 11, :, :] = np.nan  # the last key: only the last row may attend it
    dirty, _ = cuflash.forward(q, k, v, causal=True)
    np.testing.assert_array_equal(dirty[0, :11], clean[0, :11])
    assert np.isnan(dirty[0, 11]).all()


# ---- position_offsets ---------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    dict(causal=True),
    dict(window_size=(9, 3)),
    dict(causal=True, alibi=True),
    dict(dropout_p=0.3, seed=1234),
])
def test_a_chunk_with_its_positions_is_that_block_of_the_whole_problem(options):
    """Query rows [a, a + m) against keys [b, b + n) of a longer sequence, given
    position_offsets=(a, b), equal the whole sequence's attention restricted to those keys:
    masks, ALiBi distances and dropout draws all use global positions."""
    rng = np.random.default_rng()
    n, h, d = 64, 2, 8
    a, m, b, nk = 32, 16, 14, 30
    q, k, v = (rng.standard_normal((1, n, h, d)) for _ in range(3))
    opts = dict(options)
    if opts.pop("alibi", False):
        opts["alibi_slopes"] = rng.uniform(0.1, 0.5, h)
    whole_probs = reference.probabilities(q, k, v, causal_alignment="top_left",
                                          **{o: x for o, x in opts.items() if o not in ("dropout_p", "seed")})
    # The block's own attention: the whole problem's scores for these keys, renormalised.
    block = whole_probs[:, :, a:a + m, b:b + nk]
    with np.errstate(invalid="ignore"):
        renorm = np.where(block.sum(-1, keepdims=True) > 0, block / block.sum(-1, keepdims=True), 0.0)
    if opts.get("dropout_p"):
        keep = reference.dropout_keep_mask(opts["seed"], opts["dropout_p"], (1, h, n, n))[:, :, a:a + m, b:b + nk]
        renorm = renorm * keep / (1 - opts["dropout_p"])
    want = np.einsum("bhij,bjhd->bihd", renorm, v[:, b:b + nk])
    got, _ = cuflash.forward(q[:, a:a + m], k[:, b:b + nk], v[:, b:b + nk], causal_alignment="top_left",
                             position_offsets=(a, b), **opts)
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_dropout_mask_with_positions_is_the_global_masks_block():
    whole = reference.dropout_keep_mask(99, 0.4, (2, 3, 80, 90))
    for a, b in ((0, 0), (16, 2), (48, 30), (64, 88)):
        part = reference.dropout_keep_mask(99, 0.4, (2, 3, 80 - a, 90 - b), position_offsets=(a, b))
        assert np.array_equal(part, whole[:, :, a:, b:])


def test_default_positions_change_nothing():
    rng = np.random.default_rng()
    q, k, v = _qkv(rng, nq=9, nk=13)
    for opts in (dict(causal=True), dict(window_size=(3, 2)), dict(alibi_slopes=np.array([0.2, 0.4]))):
        np.testing.assert_array_equal(cuflash.forward(q, k, v, **opts)[0],
                                      cuflash.forward(q, k, v, position_offsets=(0, 0), **opts)[0])


@pytest.mark.parametrize("value,message", [
    ((1, 2, 3), "must be a pair of ints"),
    ((1.5, 0), "must be a pair of ints"),
    ((-1, 0), "must lie in"),
    ((0, 2**31), "must lie in"),
])
def test_bad_position_offsets_are_rejected_naming_the_value(value, message):
    rng = np.random.default_rng()
    q, k, v = _qkv(rng)
    with pytest.raises(cuflash.ValidationError, match=message) as info:
        cuflash.forward(q, k, v, position_offsets=value)
    assert repr(tuple(value)) in str(info.value) or repr(value) in str(info.value)


def test_dropout_needs_positions_aligned_to_its_draws():
    rng = np.random.default_rng()
    q, k, v = _qkv(rng)
    with pytest.raises(cuflash.ValidationError, match=r"q_start % 16 == 0 and k_start % 2 == 0"):
        cuflash.forward(q, k, v, dropout_p=0.1, seed=1, position_offsets=(8, 0))
    cuflash.forward(q, k, v, dropout_p=0.1, seed=1, position_offsets=(32, 6))


# ---- rng_state ---------------------------------------------------------------------------------


def test_rng_state_stands_for_seed_and_offset():
    rng = np.random.default_rng()
    q, k, v = _qkv(rng, nq=40, nk=40)
    seed, offset = int(rng.integers(2**64, dtype=np.uint64)), int(rng.integers(2**32))
    state = np.array([seed, offset], dtype=np.uint64)
    got, lse = cuflash.forward(q, k, v, dropout_p=0.3, rng_state=state)
    want, _ = reference.forward(q, k, v, dropout_p=0.3, seed=seed, dropout_offset=offset)
    np.testing.assert_array_equal(got, want)
    # int64 holds the same 64 bits; the offset's low 32 bits count.
    signed = np.array([seed, offset + 2**40], dtype=np.uint64).view(np.int64)
    np.testing.assert_array_equal(cuflash.forward(q, k, v, dropout_p=0.3, rng_state=signed)[0], want)
    grads = cuflash.backward(np.ones_like(got), q, k, v, got, lse, dropout_p=0.3, rng_state=state)
    ref = reference.backward(np.ones_like(got), q, k, v, got, lse, dropout_p=0.3, seed=seed, dropout_offset=offset)
    for g, r in zip(grads, ref):
        np.testing.assert_array_equal(g, r)


@pytest.mark.parametrize("state,message", [
    (np.zeros(3, np.int64), r"rng_state shape \(3,\) must be \(2,\)"),
    (np.zeros(2, np.float32), r"rng_state.dtype=float32 must be int64 or uint64"),
    (np.zeros((2, 2), np.int64)[:, 0], "rng_state must be contiguous"),
])
def test_bad_rng_state_is_rejected_naming_it(state, message):
    rng = np.random.default_rng()
    q, k, v = _qkv(rng)
    with pytest.raises(cuflash.ValidationError, match=message):
        cuflash.forward(q, k, v, dropout_p=0.1, rng_state=state)


def test_seed_and_rng_state_together_are_rejected():
    rng = np.random.default_rng()
    q, k, v = _qkv(rng)
    with pytest.raises(cuflash.ValidationError, match="seed and rng_state are both given"):
        cuflash.forward(q, k, v, dropout_p=0.1, seed=3, rng_state=np.zeros(2, np.int64))


def test_jax_cpu_path_takes_positions():
    jax = pytest.importorskip("jax")
    import cuflash.jax as cfj

    rng = np.random.default_rng()
    q, k, v = (rng.standard_normal((1, 24, 2, 8)).astype(np.float32) for _ in range(3))
    for opts in (dict(causal=True, causal_alignment="top_left"), dict(window_size=(5, 2))):
        want, _ = reference.forward(q, k, v, position_offsets=(16, 4), **opts)
        got = jax.jit(lambda q, k, v: cfj.attention(q, k, v, position_offsets=(16, 4), **opts))(q, k, v)
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
