"""cuflash.jax dropout from a traced key, on the CPU: the jax.numpy Philox and keep mask
equal the NumPy ones bit for bit, a jitted step draws a fresh mask per key without
retracing, and forward and gradients equal the float64 reference given the same words.

The identity-V trick reads a mask out of the forward: with head_dim = seqlen_k and
v[j] = e_j, out[i, j] = p_ij * keep_ij / (1 - p), nonzero exactly where kept (p_ij > 0
for every key when nothing masks it).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cuflash
import cuflash.jax as fa
from cuflash import _philox, _philox_jnp, reference

from _tolerance import assert_close_at_scale


@pytest.fixture(autouse=True)
def on_cpu():
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def seed_and_offset(words) -> tuple[int, int]:
    """rng_state_from_key's uint32 [seed_lo, seed_hi, offset, 0] as (seed, offset)."""
    w = [int(x) for x in np.asarray(words)]
    assert w[3] == 0 and all(0 <= x < 2**32 for x in w)
    return w[0] | (w[1] << 32), w[2]


def identity_v(batch: int, seqlen_k: int, heads: int, layout: str = "bshd") -> np.ndarray:
    eye = np.eye(seqlen_k, dtype=np.float32)
    if layout == "bhsd":
        return np.broadcast_to(eye[None, None], (batch, heads, seqlen_k, seqlen_k)).copy()
    return np.broadcast_to(eye[None, :, None, :], (batch, seqlen_k, heads, seqlen_k)).copy()


def kept(out, layout: str = "bshd") -> np.ndarray:
    out = np.asarray(out)
    return (out if layout == "bhsd" else out.transpose(0, 2, 1, 3)) != 0


def qk(seed: int, batch: int, seqlen_q: int, seqlen_k: int, heads: int, layout: str = "bshd"):
    rng = np.random.default_rng(seed)
    if layout == "bhsd":
        shapes = (batch, heads, seqlen_q, seqlen_k), (batch, heads, seqlen_k, seqlen_k)
    else:
        shapes = (batch, seqlen_q, heads, seqlen_k), (batch, seqlen_k, heads, seqlen_k)
    return tuple((0.1 * rng.standard_normal(s)).astype(np.float32) for s in shapes)


# ---- the generator ------------------------------------------------------------------------------


def test_jnp_philox_equals_numpy_philox_on_random_words():
    rng = np.random.default_rng(0)
    counter = rng.integers(0, 2**32, (4096, 4), dtype=np.uint64)
    key = rng.integers(0, 2**32, (4096, 2), dtype=np.uint64)
    # The extremes of every word (the 16-bit-half carries of mulhi and the key bump's wrap).
    counter[:8] = [[0xFFFFFFFF] * 4, [0] * 4, [0xFFFF0000] * 4, [0x0000FFFF] * 4,
                   [0xFFFFFFFF, 0, 0xFFFFFFFF, 0], [1, 2, 3, 4], [0x80000000] * 4, [0x7FFFFFFF] * 4]
    key[:4] = [[0xFFFFFFFF, 0xFFFFFFFF], [0, 0], [0x61C88647, 0x44985179], [0xFFFFFFFF, 0]]
    want = _philox.philox4x32_10(counter, key)

    @jax.jit
    def philox(c, k):
        return jnp.stack(_philox_jnp.philox_words(*c.T, *k.T), axis=-1)

    got = np.asarray(philox(jnp.asarray(counter.astype(np.uint32)), jnp.asarray(key.astype(np.uint32))))
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got, want)


def test_jnp_philox_needs_no_64_bit_types():
    text = jax.jit(lambda c, k: _philox_jnp.philox_words(*c, *k)).lower(
        jnp.zeros(4, jnp.uint32), jnp.zeros(2, jnp.uint32)).as_text()
    assert "ui32" in text and not re.search(r"[ui]64", text.replace("tensor<i64>", ""))


@pytest.mark.parametrize("shape, position_offsets, p", [
    ((2, 3, 37, 29), (0, 0), 0.3),
    ((1, 2, 17, 33), (48, 6), 0.1),
    ((3, 1, 5, 3), (16, 1), 0.5),
    ((1, 1, 1, 1), (0, 0), 0.9),
    ((2, 2, 40, 9), (2**31 + 2**20, 2**32 - 2), 0.25),  # global positions past 2**31
])
def test_jnp_keep_mask_equals_the_reference_mask(shape, position_offsets, p):
    rng = np.random.default_rng(sum(shape))
    mask = jax.jit(lambda w: _philox_jnp.keep_mask(w, p, shape, position_offsets))
    for _ in range(3):
        seed, offset = int(rng.integers(0, 2**64, dtype=np.uint64)), int(rng.integers(0, 2**32))
        words = np.array([seed & 0xFFFFFFFF, seed >> 32, offset, 0], np.uint32)
        want = reference.dropout_keep_mask(seed, p, shape, offset=offset, position_offsets=position_offsets)
        np.testing.assert_array_equal(np.asarray(mask(jnp.asarray(words))), want)


def test_rng_state_from_key_is_three_words_of_the_key():
    key = jax.random.key(11)
    words = np.asarray(jax.jit(fa.rng_state_from_key)(key))
    assert words.dtype == np.uint32 and words.shape == (4,)
    np.testing.assert_array_equal(words[:3], np.asarray(jax.random.bits(key, (3,), jnp.uint32)))
    # A raw key stands for the typed key it wraps.
    np.testing.assert_array_equal(np.asarray(fa.rng_state_from_key(jax.random.PRNGKey(11))), words)


# ---- the forward draws the reference's mask ------------------------------------------------------


@pytest.mark.parametrize("batch, seqlen_q, seqlen_k, heads, layout, position_offsets", [
    (2, 37, 29, 3, "bshd", (0, 0)),
    (1, 19, 16, 2, "bhsd", (32, 6)),
    (3, 8, 5, 1, "bshd", (16, 4)),
])
def test_jitted_traced_key_draws_the_reference_mask_bit_for_bit(batch, seqlen_q, seqlen_k, heads, layout,
                                                                  position_offsets):
    p = 0.3
    q, k = qk(1, batch, seqlen_q, seqlen_k, heads, layout)
    v = identity_v(batch, seqlen_k, heads, layout)

    @jax.jit
    def step(key, q, k, v):
        out = fa.attention(q, k, v, dropout_p=p, dropout_key=key, layout=layout, position_offsets=position_offsets)
        return out, fa.rng_state_from_key(key)

    out, words = step(jax.random.key(7), q, k, v)
    seed, offset = seed_and_offset(words)
    want = reference.dropout_keep_mask(seed, p, (batch, heads, seqlen_q, seqlen_k), offset=offset,
                                       position_offsets=position_offsets)
    np.testing.assert_array_equal(kept(out, layout), want)
    assert 0 < want.mean() < 1


def test_varlen_traced_key_draws_the_reference_mask_in_sequence_coordinates():
    """Packed sequences: row r of sequence b against its key c reads keep[b, h, r, c]."""
    p, heads = 0.4, 2
    lens = [(5, 3), (0, 2), (9, 6), (4, 4)]
    cu_q = np.concatenate([[0], np.cumsum([a for a, _ in lens])]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum([b for _, b in lens])]).astype(np.int32)
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
    rng = np.random.default_rng(3)
    q = (0.1 * rng.standard_normal((total_q, heads, total_k))).astype(np.float32)
    k = (0.1 * rng.standard_normal((total_k, heads, total_k))).astype(np.float32)
    v = np.broadcast_to(np.eye(total_k, dtype=np.float32)[:, None, :], (total_k, heads, total_k)).copy()
    max_q, max_k = max(a for a, _ in lens), max(b for _, b in lens)

    @jax.jit
    def step(key, q, k, v, cu_q, cu_k):
        out = fa.attention(q, k, v, dropout_p=p, dropout_key=key, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                           max_seqlen_q=max_q, max_seqlen_k=max_k)
        return out, fa.rng_state_from_key(key)

    out, words = step(jax.random.key(5), q, k, v, cu_q, cu_k)
    out = np.asarray(out)
    seed, offset = seed_and_offset(words)
    want = reference.dropout_keep_mask(seed, p, (len(lens), heads, max_q, max_k), offset=offset)
    for b, (len_q, len_k) in enumerate(lens):
        block = out[cu_q[b]:cu_q[b + 1], :, cu_k[b]:cu_k[b + 1]].transpose(1, 0, 2)  # (H, len_q, len_k)
        np.testing.assert_array_equal(block != 0, want[b, :, :len_q, :len_k])
        assert not np.any(np.delete(out[cu_q[b]:cu_q[b + 1]], np.s_[cu_k[b]:cu_k[b + 1]], axis=2))


def test_new_keys_draw_new_masks_without_retracing():
    batch, seqlen, heads, p = 2, 24, 2, 0.5
    q, k = qk(2, batch, seqlen, seqlen, heads)
    v = identity_v(batch, seqlen, heads)
    traces = []

    @jax.jit
    def step(key, q, k, v):
        traces.append(None)  # runs once per trace, not per call
        return fa.attention(q, k, v, dropout_p=p, dropout_key=key), fa.rng_state_from_key(key)

    masks = []
    for i in range(3):
        out, words = step(jax.random.fold_in(jax.random.key(0), i), q, k, v)
        seed, offset = seed_and_offset(words)
        masks.append(kept(out))
        np.testing.assert_array_equal(masks[-1], reference.dropout_keep_mask(seed, p, (batch, heads, seqlen, seqlen),
                                                                             offset=offset))
    assert len(traces) == 1
    assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[1], masks[2])
    again, _ = step(jax.random.fold_in(jax.random.key(0), 0), q, k, v)
    np.testing.assert_array_equal(kept(again), masks[0])  # a key is reproducible
    assert len(traces) == 1


def test_static_seed_still_works_and_is_a_trace_time_constant():
    batch, seqlen, heads, p = 1, 16, 2, 0.3
    q, k = qk(3, batch, seqlen, seqlen, heads)
    v = identity_v(batch, seqlen, heads)
    out = fa.attention(q, k, v, dropout_p=p, seed=2**40 + 3)
    np.testing.assert_array_equal(kept(out), reference.dropout_keep_mask(2**40 + 3, p, (batch, heads, seqlen, seqlen)))


# ---- values and gradients against the float64 reference -----------------------------------------


def test_float64_forward_and_backward_equal_the_reference_given_the_words():
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        q, k, v, dout = (rng.standard_normal(s) for s in ((2, 11, 4, 8), (2, 13, 2, 8), (2, 13, 2, 8), (2, 11, 4, 8)))
        key = jax.random.key(21)
        opts = dict(dropout_p=0.2, causal=True, softcap=3.0)
        out, lse = fa.forward(q, k, v, dropout_key=key, **opts)
        grads = fa.backward(dout, q, k, v, out, lse, dropout_key=key, **opts)
        seed, offset = seed_and_offset(fa.rng_state_from_key(key))
        state = np.array([seed, offset], np.uint64)
        ref_out, ref_lse = reference.forward(q, k, v, rng_state=state, **opts)
        ref_grads = reference.backward(dout, q, k, v, ref_out, ref_lse, rng_state=state, **opts)
        np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-12)
        np.testing.assert_allclose(lse, ref_lse, rtol=0, atol=1e-12)
        for got, want in zip(grads, ref_grads):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_jitted_grad_with_a_traced_key_equals_the_float64_reference_backward():
    """jax.grad through the custom_vjp: the backward regenerates the forward's mask from
    the words in its residuals."""
    rng = np.random.default_rng(5)
    q, k, v, dout = (rng.standard_normal(s).astype(np.float32)
                     for s in ((2, 21, 4, 16), (2, 18, 2, 16), (2, 18, 2, 16), (2, 21, 4, 16)))
    bias = rng.standard_normal((1, 4, 21, 18)).astype(np.float32)
    opts = dict(dropout_p=0.25, window_size=(6, 3))

    @jax.jit
    def grads(key, q, k, v, bias):
        def loss(q, k, v, bias):
            return jnp.sum(fa.attention(q, k, v, bias=bias, dropout_key=key, **opts) * dout)
        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias), fa.rng_state_from_key(key)

    for i in range(2):
        got, words = grads(jax.random.key(100 + i), q, k, v, bias)
        seed, offset = seed_and_offset(words)
        state = np.array([seed, offset], np.uint64)
        args = [a.astype(np.float64) for a in (q, k, v)]
        ref_out, ref_lse = reference.forward(*args, bias=bias.astype(np.float64), rng_state=state, **opts)
        want = reference.backward(dout.astype(np.float64), *args, ref_out, ref_lse, bias=bias.astype(np.float64),
                                  rng_state=state, **opts)
        for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
            assert_close_at_scale(g, w, 1e-5, name)


# ---- vmap -----------------------------------------------------------------------------------------


def test_vmap_over_keys_gives_each_example_its_own_key():
    batch, seqlen, heads, p = 2, 16, 2, 0.5
    q, k = qk(6, batch, seqlen, seqlen, heads)
    v = identity_v(batch, seqlen, heads)
    keys = jax.random.split(jax.random.key(9), 3)
    mapped = jax.jit(jax.vmap(lambda key: fa.attention(q, k, v, dropout_p=p, dropout_key=key)))(keys)
    for i in range(3):
        seed, offset = seed_and_offset(fa.rng_state_from_key(keys[i]))
        np.testing.assert_array_equal(kept(mapped[i]),
                                      reference.dropout_keep_mask(seed, p, (batch, heads, seqlen, seqlen),
                                                                  offset=offset))
    # And gradients through it: each example's backward uses its own key.
    rng = np.random.default_rng(7)
    dout = rng.standard_normal((3,) + q.shape).astype(np.float32)
    qs = np.broadcast_to(q, (3,) + q.shape)

    def loss(qs):
        return jnp.sum(jax.vmap(lambda key, q: fa.attention(q, k, v, dropout_p=p, dropout_key=key))(keys, qs) * dout)

    dq = jax.jit(jax.grad(loss))(qs)
    for i, (key, dout_i) in enumerate(zip(keys, dout)):
        one = jax.grad(lambda q, key=key, d=dout_i: jnp.sum(fa.attention(q, k, v, dropout_p=p, dropout_key=key) * d))(q)
        assert_close_at_scale(dq[i], one, 1e-6, f"dq[{i}]")


def test_vmap_with_one_key_folds_the_mapped_axis_into_the_batch():
    """An unmapped key: one launch for the mapped batch, example v at batch v*B + b."""
    batch, seqlen, heads, p = 2, 16, 2, 0.3
    qs = np.stack([qk(s, batch, seqlen, seqlen, heads)[0] for s in range(3)])
    _, k = qk(0, batch, seqlen, seqlen, heads)
    v = identity_v(batch, seqlen, heads)
    key = jax.random.key(4)
    out = jax.jit(jax.vmap(lambda q: fa.attention(q, k, v, dropout_p=p, dropout_key=key)))(qs)
    seed, offset = seed_and_offset(fa.rng_state_from_key(key))
    want = reference.dropout_keep_mask(seed, p, (3 * batch, heads, seqlen, seqlen), offset=offset)
    np.testing.assert_array_equal(kept(np.reshape(out, (3 * batch,) + out.shape[2:])), want)


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    (dict(seed=3, dropout_key=jax.random.PRNGKey(0)), r"seed=3 and a dropout_key are both given"),
    (dict(dropout_key=np.zeros(3, np.int32)), r"dropout_key of shape \(3,\) and dtype int32 must be a jax.random key"),
    (dict(dropout_key=np.zeros(3, np.uint32)), r"dropout_key of shape \(3,\) is not a raw key"),
    (dict(dropout_key="key"), r"dropout_key='key' must be a jax.random key"),
])
def test_bad_dropout_keys_are_named(options, message):
    q, k = qk(0, 1, 4, 4, 1)
    with pytest.raises(cuflash.ValidationError, match=message) as info:
        fa.attention(q, k, k, dropout_p=0.1, **options)
    assert "seed=None" not in str(info.value)


def test_a_batch_of_keys_needs_vmap():
    q, k = qk(0, 1, 4, 4, 1)
    with pytest.raises(cuflash.ValidationError, match=r"dropout_key has shape \(2,\)"):
        fa.attention(q, k, k, dropout_p=0.1, dropout_key=jax.random.split(jax.random.key(0)))


# ---- the CUDA lowering (cross-lowered: no GPU needed) ---------------------------------------------


def test_cuda_lowering_passes_the_words_to_both_callbacks():
    """On CUDA the words are a device operand of each buffer callback (the kernels read
    them when they run), derived inside the computation from the traced key."""
    shape = jax.ShapeDtypeStruct((2, 64, 4, 64), jnp.bfloat16)

    def loss(q, k, v, key):
        return jnp.sum(fa.attention(q, k, v, causal=True, dropout_p=0.1, dropout_key=key).astype(jnp.float32))

    key = jax.eval_shape(lambda: jax.random.key(0))
    traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(shape, shape, shape, key)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "custom_call @xla_buffer_python_gpu_callback" in line]
    assert len(calls) == 2, calls
    for line in calls:
        assert "tensor<4xui32>" in line.split("->")[0], line


def test_a_key_without_dropout_is_checked_and_changes_nothing():
    q, k = qk(0, 1, 4, 4, 1)
    np.testing.assert_array_equal(fa.attention(q, k, k, dropout_key=jax.random.key(1)), fa.attention(q, k, k))
    with pytest.raises(cuflash.ValidationError, match="dropout_key"):
        fa.attention(q, k, k, dropout_key=np.zeros(3, np.int32))
