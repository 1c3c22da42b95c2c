"""cuflash.jax dropout from a traced key through the CUDA kernels.

The key's words reach the kernels as a device operand of the buffer callbacks, read when
the kernels run: one compiled step draws a fresh mask from each key, the mask is
`cuflash.reference.dropout_keep_mask` of the same words bit for bit (identity V: with
head_dim = seqlen_k and v[j] = e_j, out[i, j] = p_ij * keep_ij / (1 - p)), and gradients
regenerate it (tolerance method of tests/_tolerance.py against float64).
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

from _tolerance import BF16, check_all, compare, naive_attention  # noqa: E402

import cuflash.jax as fa  # noqa: E402
from cuflash import reference  # noqa: E402

pytestmark = pytest.mark.gpu


def to64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def seed_and_offset(words) -> tuple[int, int]:
    w = [int(x) for x in np.asarray(words)]
    assert w[3] == 0
    return w[0] | (w[1] << 32), w[2]


def identity_problem(seed: int, batch: int, seqlen_q: int, seqlen_k: int, heads: int, dtype):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(0.1 * rng.standard_normal((batch, seqlen_q, heads, seqlen_k), dtype=np.float32), dtype)
    k = jnp.asarray(0.1 * rng.standard_normal((batch, seqlen_k, heads, seqlen_k), dtype=np.float32), dtype)
    eye = np.eye(seqlen_k, dtype=np.float32)
    v = jnp.asarray(np.broadcast_to(eye[None, :, None, :], (batch, seqlen_k, heads, seqlen_k)).copy(), dtype)
    return q, k, v


def kept(out) -> np.ndarray:
    return to64(out).transpose(0, 2, 1, 3) != 0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("position_offsets", [(0, 0), (48, 10)])
def test_kernels_draw_the_reference_mask_from_a_traced_key(dtype, position_offsets):
    batch, seqlen_q, seqlen_k, heads, p = 2, 203, 64, 3, 0.3
    q, k, v = identity_problem(1, batch, seqlen_q, seqlen_k, heads, dtype)
    traces = []

    @jax.jit
    def step(key, q, k, v):
        traces.append(None)  # once per trace
        out = fa.attention(q, k, v, dropout_p=p, dropout_key=key, position_offsets=position_offsets)
        return out, fa.rng_state_from_key(key)

    masks = []
    for i in range(2):
        out, words = step(jax.random.key(1000 + i), q, k, v)
        seed, offset = seed_and_offset(words)
        want = reference.dropout_keep_mask(seed, p, (batch, heads, seqlen_q, seqlen_k), offset=offset,
                                           position_offsets=position_offsets)
        masks.append(kept(out))
        np.testing.assert_array_equal(masks[-1], want)
        assert abs(want.mean() - (1 - p)) < 0.02
    assert len(traces) == 1  # two keys, one trace, one compilation
    assert step._cache_size() == 1
    assert not np.array_equal(masks[0], masks[1])
    assert "custom_call" in step.lower(jax.random.key(0), q, k, v).as_text()  # the kernels, not the reference


def test_kernels_and_the_cpu_reference_draw_the_same_mask_from_one_key():
    batch, seqlen_q, seqlen_k, heads, p = 1, 77, 32, 2, 0.5
    q, k, v = identity_problem(2, batch, seqlen_q, seqlen_k, heads, jnp.float32)
    fn = jax.jit(lambda key, q, k, v: fa.attention(q, k, v, dropout_p=p, dropout_key=key))
    key = jax.random.key(3)
    on_gpu = fn(key, q, k, v)
    cpu = jax.devices("cpu")[0]
    on_cpu = fn(*(jax.device_put(a, cpu) for a in (key, q, k, v)))
    assert on_cpu.devices() == {cpu}
    np.testing.assert_array_equal(kept(on_gpu), kept(on_cpu))


def test_jitted_grad_with_a_traced_key_matches_float64_within_tolerance():
    """The backward kernels regenerate the forward's mask from the words in the residuals."""
    rng = np.random.default_rng(4)
    b, nq, nk, h, hkv, d, p = 2, 150, 96, 4, 2, 64, 0.2
    q, dout = (jnp.asarray(rng.standard_normal((b, nq, h, d), dtype=np.float32), jnp.bfloat16) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((b, nk, hkv, d), dtype=np.float32), jnp.bfloat16) for _ in range(2))
    opts = dict(dropout_p=p, causal=True)

    @jax.jit
    def step(key, q, k, v):
        def loss(q, k, v):
            out, lse = fa.forward(q, k, v, dropout_key=key, **opts)
            return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32)), (out, lse)
        (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, lse, grads, fa.rng_state_from_key(key)

    for i in range(2):
        out, lse, grads, words = step(jax.random.key(50 + i), q, k, v)
        seed, offset = seed_and_offset(words)
        state = np.array([seed, offset], np.uint64)
        q64, k64, v64, dout64 = (to64(a) for a in (q, k, v, dout))
        ref_out, ref_lse = reference.forward(q64, k64, v64, rng_state=state, **opts)
        ref_grads = reference.backward(dout64, q64, k64, v64, ref_out, ref_lse, rng_state=state, **opts)
        keep = reference.dropout_keep_mask(seed, p, (b, h, nq, nk), offset=offset)
        heads_first = [a.transpose(0, 2, 1, 3).astype(np.float32) for a in (q64, k64, v64, dout64)]
        naive = naive_attention(*heads_first, BF16, dict(opts), keep=keep)
        back = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731
        comparisons = [compare("out", to64(out), ref_out, back(naive["out"]), BF16, 2),
                       compare("lse", to64(lse), ref_lse, naive["lse"], BF16, 2)]
        for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
            comparisons.append(compare(name, to64(got), want, back(naive[name]), BF16, 3))
        check_all(comparisons)


def test_vmap_over_keys_runs_each_example_with_its_own_key_on_gpu():
    batch, seqlen_q, seqlen_k, heads, p = 2, 40, 32, 2, 0.4
    q, k, v = identity_problem(5, batch, seqlen_q, seqlen_k, heads, jnp.bfloat16)
    keys = jax.random.split(jax.random.key(8), 3)
    outs = jax.jit(jax.vmap(lambda key: fa.attention(q, k, v, dropout_p=p, dropout_key=key)))(keys)
    for i in range(3):
        seed, offset = seed_and_offset(fa.rng_state_from_key(keys[i]))
        np.testing.assert_array_equal(kept(outs[i]), reference.dropout_keep_mask(
            seed, p, (batch, heads, seqlen_q, seqlen_k), offset=offset))
