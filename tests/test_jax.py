"""cuflash.jax on the CPU: the JAX adapter's promises, checked without a GPU.

On a CPU device cuflash.jax computes with the jax.numpy reference, so these tests pin the
adapter itself: the float64 results equal cuflash.reference; jit, grad, value_and_grad
and vmap (a batching rule that folds mapped axes into the batch) give what the plain
function gives; validation happens at trace time; the CUDA lowering holds exactly one
buffer callback per direction and no host callback; and dot_product_attention is a
drop-in for jax.nn.dot_product_attention.
"""

from __future__ import annotations

import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cuflash
import cuflash.jax as fa
from cuflash import _reference_jnp, reference
from cuflash._options import make_options

from _tolerance import assert_close_at_scale

B, NQ, NK, H, HKV, D = 2, 5, 7, 4, 2, 8


@pytest.fixture(autouse=True)
def on_cpu():
    """These tests pin the CPU path, also when run on a GPU machine (tests/test_jax_gpu.py
    covers the kernels)."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.fixture
def x64():
    """float64 JAX arrays for the test, switched back off afterwards."""
    with jax.enable_x64(True):
        yield


def draw(seed: int, dtype=np.float32, batch=B, seqlen_q=NQ, seqlen_k=NK, heads=H, heads_kv=HKV, head_dim=D,
         layout="bshd"):
    rng = np.random.default_rng(seed)
    if layout == "bhsd":
        shape_q, shape_kv = (batch, heads, seqlen_q, head_dim), (batch, heads_kv, seqlen_k, head_dim)
    else:
        shape_q, shape_kv = (batch, seqlen_q, heads, head_dim), (batch, seqlen_k, heads_kv, head_dim)
    return tuple(rng.standard_normal(s).astype(dtype) for s in (shape_q, shape_kv, shape_kv, shape_q))


def max_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    same_inf = np.isinf(a) & (a == b)
    with np.errstate(invalid="ignore"):
        return float(np.max(np.where(same_inf, 0.0, np.abs(a - b)), initial=0.0))


# ---- float64: the same numbers as cuflash.reference ----------------------------------------

RNG = np.random.default_rng(1234)
MASK = RNG.random((NQ, NK)) > 0.3
MASK[2] = False  # a fully masked row
VARLEN = [(3, 4), (0, 2), (5, 1), (2, 6)]  # (len_q, len_k) per sequence; one has no queries
CU_Q = np.concatenate([[0], np.cumsum([a for a, _ in VARLEN])]).astype(np.int32)
CU_K = np.concatenate([[0], np.cumsum([b for _, b in VARLEN])]).astype(np.int32)

DENSE_OPTIONS = {
    "plain": {},
    "causal_bottom_right_more_queries": dict(causal=True, seqlen_q=9, seqlen_k=4),  # rows with no key
    "causal_top_left": dict(causal=True, causal_alignment="top_left"),
    "window": dict(window_size=(2, 1)),
    "softcap_alibi_heads": dict(softcap=5.0, alibi_slopes=RNG.uniform(0.1, 0.5, H)),
    "alibi_batch_bias_mask": dict(alibi_slopes=RNG.uniform(0.1, 0.5, (B, H)), bias=RNG.standard_normal((B, 1, 1, NK)),
                                  mask=MASK),
    "bias_bhsd_scale": dict(bias=RNG.standard_normal((1, H, NQ, NK)), layout="bhsd", softmax_scale=0.3),
    "mqa_bias_2d": dict(heads_kv=1, bias=RNG.standard_normal((NQ, NK))),
    "dropout": dict(dropout_p=0.3, seed=7),
}


def _split(options: dict):
    shape_keys = ("seqlen_q", "seqlen_k", "heads_kv", "layout")
    shape = {k: v for k, v in options.items() if k in shape_keys}
    opts = {k: v for k, v in options.items() if k not in shape_keys or k == "layout"}
    return shape, opts


@pytest.mark.parametrize("name", list(DENSE_OPTIONS))
def test_float64_forward_and_backward_equal_the_reference(x64, name):
    shape, opts = _split(DENSE_OPTIONS[name])
    q, k, v, dout = draw(0, np.float64, **shape)
    out, lse = fa.forward(q, k, v, **opts)
    ref_out, ref_lse = reference.forward(q, k, v, **opts)
    assert out.dtype == jnp.float64 and lse.dtype == jnp.float64
    assert max_err(out, ref_out) < 1e-12 and max_err(lse, ref_lse) < 1e-12
    grads = fa.backward(dout, q, k, v, out, lse, **opts)
    ref_grads = reference.backward(dout, q, k, v, ref_out, ref_lse, **opts)
    assert len(grads) == len(ref_grads)
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape and max_err(got, want) < 1e-12


@pytest.mark.parametrize("extra", [{}, dict(causal=True, bias=RNG.standard_normal((1, H, 5, 6)),
                                            alibi_slopes=RNG.uniform(0.1, 0.5, H)),
                                   dict(window_size=(1, 2), mask=RNG.random((len(VARLEN), 1, 7, 7)) > 0.2,
                                        max_seqlen_q=7, max_seqlen_k=7, causal_alignment="top_left")],
                         ids=["plain", "causal_bias_alibi", "window_mask_padded_max"])
def test_float64_varlen_equals_the_reference(x64, extra):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((int(CU_Q[-1]), H, D))
    k, v = (rng.standard_normal((int(CU_K[-1]), HKV, D)) for _ in range(2))
    dout = rng.standard_normal(q.shape)
    opts = dict(cu_seqlens_q=CU_Q, cu_seqlens_k=CU_K, **extra)
    out, lse = fa.forward(q, k, v, **opts)
    ref_out, ref_lse = reference.forward(q, k, v, **opts)
    assert max_err(out, ref_out) < 1e-12 and max_err(lse, ref_lse) < 1e-12
    for got, want in zip(fa.backward(dout, q, k, v, out, lse, **opts),
                         reference.backward(dout, q, k, v, ref_out, ref_lse, **opts)):
        assert max_err(got, want) < 1e-12


# ---- jit, grad, value_and_grad ------------------------------------------------------------


def test_jit_gives_what_eager_gives():
    q, k, v, _ = draw(1)
    bias = np.random.default_rng(2).standard_normal((1, H, NQ, NK)).astype(np.float32)
    eager = fa.attention(q, k, v, causal=True, bias=bias)
    jitted = jax.jit(lambda q, k, v, b: fa.attention(q, k, v, causal=True, bias=b))(q, k, v, bias)
    # Not bit for bit: inlined into the outer computation, XLA may fuse and order the sums
    # differently from the eager call's own compilation.
    assert_close_at_scale(jitted, eager, 1e-6)


@pytest.mark.parametrize("bias_shape", [(B, H, NQ, NK), (1, H, NQ, NK), (B, 1, 1, NK), (NQ, NK)])
def test_grad_equals_the_explicit_backward(bias_shape):
    """jax.grad of sum(attention * dout) is backward(dout, ...), dbias summed over the
    dimensions the bias was broadcast along."""
    q, k, v, dout = draw(2)
    bias = np.random.default_rng(4).standard_normal(bias_shape).astype(np.float32)
    opts = dict(causal=True, softcap=4.0)

    def loss(q, k, v, bias):
        return jnp.sum(fa.attention(q, k, v, bias=bias, **opts) * dout)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)
    out, lse = fa.forward(q, k, v, bias=bias, **opts)
    explicit = fa.backward(dout, q, k, v, out, lse, bias=bias, **opts)
    assert grads[3].shape == bias_shape
    for got, want in zip(grads, explicit):
        assert_close_at_scale(got, want, 1e-5)


def test_value_and_grad_under_jit():
    q, k, v, dout = draw(3)

    def loss(q, k, v):
        return jnp.sum(fa.attention(q, k, v, window_size=(3, 0)) * dout)

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert np.isclose(float(value), float(loss(q, k, v)), rtol=1e-6)
    assert_close_at_scale(grads[0], jax.grad(loss)(q, k, v), 1e-5)


def test_lse_and_alibi_slopes_carry_no_gradient():
    q, k, v, _ = draw(4)
    slopes = np.full((H,), 0.25, np.float32)

    def loss(q, slopes):
        out, lse = fa.forward(q, k, v, alibi_slopes=slopes)
        return jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    dq, dslopes = jax.grad(loss, argnums=(0, 1))(q, slopes)
    assert not np.any(np.asarray(dq)) and not np.any(np.asarray(dslopes))


def test_fully_masked_rows_give_zero_output_lse_minus_inf_and_zero_gradients():
    q, k, v, dout = draw(5, seqlen_q=NQ, seqlen_k=NK)
    mask = np.ones((NQ, NK), bool)
    mask[1] = False
    out, lse = fa.forward(q, k, v, mask=mask)
    assert np.all(np.asarray(out)[:, 1] == 0) and np.all(np.isneginf(np.asarray(lse)[:, :, 1]))
    dq, dk, dv = jax.grad(lambda q, k, v: jnp.sum(fa.attention(q, k, v, mask=mask) * dout), argnums=(0, 1, 2))(q, k, v)
    for g in (dq, dk, dv):
        assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(dq)[:, 1] == 0)


def test_jnp_reference_autodiff_matches_its_analytic_backward():
    """The reference's own jax.grad (through the double-where) is NaN-free and equals the
    analytic backward the kernels implement, fully masked rows included."""
    q, k, v, dout = draw(6, seqlen_q=9, seqlen_k=4)
    rng = np.random.default_rng(7)
    bias = jnp.asarray(rng.standard_normal((1, H, 9, 4)).astype(np.float32))
    base = make_options(causal=True, softcap=3.0, alibi_slopes=jnp.asarray(rng.uniform(0.1, 0.4, H), jnp.float32))

    def loss(q, k, v, bias):
        return jnp.sum(_reference_jnp.forward(q, k, v, base.replace(bias=bias))[0] * dout)

    auto = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)

    @jax.jit
    def analytic(q, k, v, bias):
        out, lse = _reference_jnp.forward(q, k, v, base.replace(bias=bias))
        return lse, _reference_jnp.backward(dout, q, k, v, out, lse, base.replace(bias=bias))

    lse, (dq, dk, dv, dscores) = analytic(q, k, v, bias)
    assert np.isneginf(np.asarray(lse)).any()  # bottom-right causal, 9 queries, 4 keys
    dbias = jnp.sum(dscores, axis=0, keepdims=True)  # bias (1, H, 9, 4) was broadcast over the batch
    for got, want in zip(auto, (dq, dk, dv, dbias)):
        assert np.all(np.isfinite(np.asarray(got)))
        assert_close_at_scale(got, want, 2e-5)


# ---- vmap: a batching rule that folds the mapped axis into the batch ----------------------

V = 3


def _loop(fn, in_axes, args):
    fn = jax.jit(fn)
    results = []
    for i in range(V):
        picked = [a if ax is None else np.take(np.asarray(a), i, axis=ax) for a, ax in zip(args, in_axes)]
        results.append(fn(*picked))
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *results)


def _assert_tree_close(got, want, rtol=1e-5):
    """Leaf by leaf, to rtol of each leaf's largest magnitude: vmap folds the mapped axis
    into one bigger computation whose float32 sums run in another order than the loop's,
    so an exact 0 on one side may be a rounding residue on the other."""
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close_at_scale(g, w, rtol, what=f"leaf {i}")


def _vmap_case(name):
    rng = np.random.default_rng(11)
    q, k, v, dout = (rng.standard_normal((V,) + a.shape).astype(np.float32) for a in draw(0))
    if name == "q_only":
        return (lambda q: fa.forward(q, k[0], v[0], causal=True)), (0,), (q,)
    if name == "q_k_v_axis1_and_dout":
        qt, kt, vt = (np.moveaxis(a, 0, 1) for a in (q, k, v))

        def fn(q, k, v, dout):
            value, grads = jax.value_and_grad(lambda q, k, v: jnp.sum(fa.attention(q, k, v, window_size=(2, 2)) * dout),
                                              argnums=(0, 1, 2))(q, k, v)
            return value, grads
        return fn, (1, 1, 1, 0), (qt, kt, vt, dout)
    if name == "batched_bias_grad":
        bias = rng.standard_normal((V, 1, H, NQ, NK)).astype(np.float32)

        def fn(q, bias):
            return jax.grad(lambda q, b: jnp.sum(fa.attention(q, k[0], v[0], bias=b, causal=True) * dout[0]),
                            argnums=(0, 1))(q, bias)
        return fn, (0, 0), (q, bias)
    if name == "unbatched_per_batch_bias_and_mask":
        bias = rng.standard_normal((B, H, NQ, NK)).astype(np.float32)
        mask = rng.random((B, 1, NQ, NK)) > 0.3

        def fn(q, bias, mask):
            return jax.grad(lambda q, b: jnp.sum(fa.attention(q, k[0], v[0], bias=b, mask=mask) * dout[0]),
                            argnums=(0, 1))(q, bias)
        return fn, (0, None, None), (q, bias, mask)
    if name == "batched_mask_2d":
        mask = rng.random((V, NQ, NK)) > 0.3
        return (lambda k, mask: fa.forward(q[0], k, v[0], mask=mask)), (0, 0), (k, mask)
    if name == "alibi_heads_batched":
        slopes = rng.uniform(0.1, 0.5, (V, H)).astype(np.float32)
        return (lambda q, s: fa.forward(q, k[0], v[0], alibi_slopes=s)), (0, 0), (q, slopes)
    if name == "alibi_per_batch_unbatched":
        slopes = rng.uniform(0.1, 0.5, (B, H)).astype(np.float32)
        return (lambda v, s: fa.forward(q[0], k[0], v, alibi_slopes=s, softcap=2.0)), (0, None), (v, slopes)
    raise KeyError(name)


VMAP_CASES = ["q_only", "q_k_v_axis1_and_dout", "batched_bias_grad", "unbatched_per_batch_bias_and_mask",
              "batched_mask_2d", "alibi_heads_batched", "alibi_per_batch_unbatched"]


@pytest.mark.parametrize("name", VMAP_CASES)
def test_vmap_equals_a_python_loop(name):
    fn, in_axes, args = _vmap_case(name)
    got = jax.jit(jax.vmap(fn, in_axes=in_axes))(*args)
    _assert_tree_close(got, _loop(fn, in_axes, args))


def test_vmap_of_varlen_equals_a_python_loop():
    rng = np.random.default_rng(12)
    q = rng.standard_normal((V, int(CU_Q[-1]), H, D)).astype(np.float32)
    k, v = (rng.standard_normal((V, int(CU_K[-1]), HKV, D)).astype(np.float32) for _ in range(2))
    cu_q = np.stack([CU_Q, np.array([0, 2, 2, 6, 10], np.int32), CU_Q])
    bias = rng.standard_normal((len(VARLEN), 1, 5, 6)).astype(np.float32)

    def fn(q, k, v, cu_q):
        def loss(q, k, v):
            out, lse = fa.forward(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=CU_K, max_seqlen_q=5, max_seqlen_k=6,
                                  causal=True, bias=bias)
            return jnp.sum(out ** 2), lse
        (value, lse), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return value, lse, grads

    got = jax.jit(jax.vmap(fn, in_axes=(0, 0, 0, 0)))(q, k, v, cu_q)
    _assert_tree_close(got, _loop(fn, (0, 0, 0, 0), (q, k, v, cu_q)))


def test_nested_vmap_and_grad_of_vmap():
    rng = np.random.default_rng(13)
    q = rng.standard_normal((2, V) + draw(0)[0].shape).astype(np.float32)
    _, k, v, _ = draw(1)
    inner = jax.vmap(lambda q: fa.attention(q, k, v, causal=True))
    got = jax.jit(jax.vmap(inner))(q)
    want = np.stack([np.stack([np.asarray(fa.attention(q[i, j], k, v, causal=True)) for j in range(V)])
                     for i in range(2)])
    assert_close_at_scale(got, want, 1e-6)
    dq = jax.jit(jax.grad(lambda q: jnp.sum(jax.vmap(inner)(q) ** 2)))(q)
    one = jax.jit(jax.grad(lambda x: jnp.sum(fa.attention(x, k, v, causal=True) ** 2)))
    dq_loop = np.stack([np.stack([np.asarray(one(q[i, j])) for j in range(V)]) for i in range(2)])
    assert_close_at_scale(dq, dq_loop, 1e-5)


# ---- validation at trace time ----------------------------------------------------------------


def test_invalid_arguments_raise_one_error_listing_every_reason():
    q, k, v, _ = draw(0)
    with pytest.raises(cuflash.ValidationError) as err:
        jax.jit(lambda q, k: fa.attention(q, k, v[:, :, :, :4], causal_alignment="diagonal",
                                          bias=jnp.zeros((3, NQ, NK))))(q, k)
    text = str(err.value)
    assert "causal_alignment='diagonal'" in text and "head dims differ" in text and "bias shape" in text


def test_traced_cu_seqlens_need_static_max_seqlen():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((int(CU_Q[-1]), H, D)).astype(np.float32)
    k = rng.standard_normal((int(CU_K[-1]), HKV, D)).astype(np.float32)

    def fn(cu_q, cu_k, **static):
        return fa.attention(q, k, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **static)

    with pytest.raises(cuflash.ValidationError, match="max_seqlen_q=None") as err:
        jax.jit(fn)(CU_Q, CU_K)
    assert "max_seqlen_k=None" in str(err.value)
    with pytest.raises(cuflash.ValidationError, match="cannot cover"):
        jax.jit(lambda a, b: fn(a, b, max_seqlen_q=2, max_seqlen_k=6))(CU_Q, CU_K)
    jitted = jax.jit(lambda a, b: fn(a, b, max_seqlen_q=5, max_seqlen_k=6))(CU_Q, CU_K)
    eager = fn(CU_Q, CU_K)  # concrete: lengths read from the arrays
    assert_close_at_scale(jitted, eager, 1e-6)


def test_concrete_cu_seqlens_are_checked_in_full():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((int(CU_Q[-1]), H, D)).astype(np.float32)
    k = rng.standard_normal((int(CU_K[-1]), HKV, D)).astype(np.float32)
    bad = CU_Q.copy()
    bad[2] = bad[1] - 1 if bad[1] else 5
    with pytest.raises(cuflash.ValidationError, match="cu_seqlens_q"):
        fa.attention(q, k, k, cu_seqlens_q=bad, cu_seqlens_k=CU_K)


def test_dropout_needs_a_static_seed():
    q, k, v, _ = draw(0)
    with pytest.raises(cuflash.ValidationError, match="seed=None"):
        fa.attention(q, k, v, dropout_p=0.1)


# ---- the CUDA lowering (cross-lowered: no GPU needed) -----------------------------------------


def test_cuda_lowering_runs_the_kernels_through_buffer_callbacks_only():
    """Lowered for CUDA, jit(value_and_grad) holds one buffer callback for the forward and
    one for the backward (device buffers, XLA's stream) and no host callback
    (pure_callback / io_callback would copy to the host)."""
    shape = jax.ShapeDtypeStruct((B, 64, H, 64), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((1, H, 64, 64), jnp.float32)

    def loss(q, k, v, b):
        return jnp.sum(fa.attention(q, k, v, causal=True, bias=b).astype(jnp.float32))

    traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).trace(shape, shape, shape, bias)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    targets = re.findall(r"custom_call @(\w+)", text)
    assert sorted(targets) == ["xla_buffer_python_gpu_callback"] * 2, targets
    assert "dot_general" not in text  # the reference branch is not lowered for CUDA
    cpu_text = traced.lower(lowering_platforms=("cpu",)).as_text()
    assert "custom_call" not in cpu_text


# ---- dot_product_attention: a drop-in for jax.nn.dot_product_attention ------------------------


def test_signature_matches_jax_nn_dot_product_attention():
    ours = inspect.signature(fa.dot_product_attention).parameters
    theirs = inspect.signature(jax.nn.dot_product_attention).parameters
    assert list(ours) == list(theirs)
    for name, param in theirs.items():
        assert (ours[name].kind, ours[name].default) == (param.kind, param.default), name


def _dpa_inputs(seed, batch=2, t=5, s=7, n=4, kv=4, h=8):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, t, n, h)).astype(np.float32)
    k, v = (rng.standard_normal((batch, s, kv, h)).astype(np.float32) for _ in range(2))
    return q, k, v, rng


def _dpa_case(name):
    q, k, v, rng = _dpa_inputs(hash(name) % 1000)
    if name == "plain":
        return (q, k, v), {}
    if name == "bias":
        return (q, k, v), dict(bias=rng.standard_normal((1, 4, 5, 7)).astype(np.float32))
    if name == "mask":
        mask = rng.random((2, 1, 5, 7)) > 0.3
        mask[..., 0] = True  # every query keeps a key (jax.nn averages over fully masked rows)
        return (q, k, v), dict(mask=mask)
    if name == "causal_more_keys":
        return (q, k, v), dict(is_causal=True, scale=0.2)
    if name == "causal_more_queries":
        q, k, v, rng = _dpa_inputs(5, t=9, s=4)
        return (q, k, v), dict(is_causal=True)
    if name == "gqa_causal":
        q, k, v, rng = _dpa_inputs(6, n=4, kv=2, t=7)
        return (q, k, v), dict(is_causal=True)
    if name == "local_window_int":
        return (q, k, v), dict(local_window_size=2)
    if name == "local_window_causal":
        return (q, k, v), dict(local_window_size=(3, 1), is_causal=True)
    if name == "seq_lengths":
        return (q, k, v), dict(query_seq_lengths=np.array([3, 5], np.int32),
                               key_value_seq_lengths=np.array([7, 2], np.int32))
    if name == "unbatched":
        return (q[0], k[0], v[0]), dict(bias=rng.standard_normal((4, 5, 7)).astype(np.float32))
    raise KeyError(name)


DPA_CASES = ["plain", "bias", "mask", "causal_more_keys", "causal_more_queries", "gqa_causal",
             "local_window_int", "local_window_causal", "seq_lengths", "unbatched"]


@pytest.mark.parametrize("name", DPA_CASES)
def test_dot_product_attention_equals_jax_nn_values_and_grads(name):
    (q, k, v), kwargs = _dpa_case(name)
    dout = np.random.default_rng(99).standard_normal(q.shape).astype(np.float32)
    bias = kwargs.pop("bias", None)

    def loss(impl, q, k, v, bias):
        out = impl(q, k, v, bias, **kwargs)
        return jnp.sum(out * dout), out

    results = {}
    for label, impl in (("cuflash", fa.dot_product_attention), ("jax", jax.nn.dot_product_attention)):
        argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
        fn = jax.jit(jax.value_and_grad(lambda *a, impl=impl: loss(impl, *a), argnums=argnums, has_aux=True))
        results[label] = fn(q, k, v, bias)
    (_, out), grads = results["cuflash"]
    (_, want_out), want_grads = results["jax"]
    assert_close_at_scale(out, want_out, 1e-5)
    for got, want in zip(grads, want_grads):
        assert_close_at_scale(got, want, 1e-5)


def test_dot_product_attention_residual_is_jax_nn_logsumexp():
    q, k, v, _ = _dpa_inputs(21, n=4, kv=2)
    out, res = jax.jit(lambda *a: fa.dot_product_attention(*a, is_causal=True, return_residual=True))(q, k, v)
    want_out, want_res = jax.jit(lambda *a: jax.nn.dot_product_attention(*a, is_causal=True, return_residual=True))(
        q, k, v)
    assert res.shape == want_res.shape == q.shape[:-1]
    assert_close_at_scale(res, want_res, 1e-5)
    assert_close_at_scale(out, want_out, 1e-5)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(implementation="xla"), "implementation"),
    (dict(implementation="cudnn"), "implementation"),
    (dict(local_window_size=(-1, 2)), "local_window_size"),
])
def test_unsupported_arguments_raise_not_implemented_naming_the_argument(kwargs, argument):
    q, k, v, _ = _dpa_inputs(0)
    with pytest.raises(NotImplementedError, match=argument):
        fa.dot_product_attention(q, k, v, **kwargs)


def test_dot_product_attention_rejects_what_jax_nn_rejects():
    q, k, v, _ = _dpa_inputs(0)
    for bad in (dict(mask=np.ones((2, 1, 5, 7), np.int32)), dict(query_seq_lengths=np.array([1.0, 2.0], np.float32))):
        with pytest.raises(ValueError):
            jax.nn.dot_product_attention(q, k, v, **bad)
        with pytest.raises(ValueError):
            fa.dot_product_attention(q, k, v, **bad)


# ---- one validation for every entry point ------------------------------------------------------

BAD_OPTIONS = [
    dict(causal="no"),
    dict(window_size=(-1.9, 0)),
    dict(window_size=(1, 2, 3)),
    dict(softmax_scale="a"),
    dict(softcap=-1.0),
    dict(deterministic="yes"),
] + [dict(dropout_p=0.1, seed=seed) for seed in (-1, 1.7, 2**64, 2**65 + 5)]


def _reasons(call) -> list[str]:
    with pytest.raises(cuflash.ValidationError) as err:
        call()
    return err.value.reasons


@pytest.mark.parametrize("options", BAD_OPTIONS, ids=repr)
def test_bad_options_are_rejected_with_the_core_message(options):
    q, k, v, dout = draw(30)
    expected = _reasons(lambda: cuflash.attention(q, k, v, **options))
    assert len(expected) == 1
    assert _reasons(lambda: fa.attention(q, k, v, **options)) == expected
    assert _reasons(lambda: fa.forward(q, k, v, **options)) == expected
    lse = np.zeros((B, H, NQ), np.float32)
    assert _reasons(lambda: fa.backward(dout, q, k, v, dout, lse, **options)) == expected
    dpa_names = {"causal": "is_causal", "softmax_scale": "scale", "window_size": "local_window_size"}
    name, value = next(iter(options.items()))
    if name in dpa_names:  # the drop-in's message names its own argument
        renamed = dpa_names[name] + expected[0][len(name):]
        q4, k4, v4, _ = _dpa_inputs(0)
        assert _reasons(lambda: fa.dot_product_attention(q4, k4, v4, **{dpa_names[name]: value})) == [renamed]


@pytest.mark.parametrize("name", ["attention", "forward", "backward", "dot_product_attention"])
def test_unknown_keywords_list_the_valid_ones(name):
    q, k, v, dout = draw(31)
    args = (dout, q, k, v, dout, np.zeros((B, H, NQ), np.float32)) if name == "backward" else (q, k, v)
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) \['causall'\]") as err:
        getattr(fa, name)(*args, causall=True)
    assert str(err.value).startswith(f"cuflash.jax.{name}()") and "'mask'" in str(err.value)


def test_option_arrays_given_as_lists_keep_their_kind():
    q, k, v, _ = draw(32)
    mask = np.random.default_rng(33).random((NQ, NK)) > 0.4
    np.testing.assert_array_equal(np.asarray(fa.attention(q, k, v, mask=mask.tolist())),
                                  np.asarray(fa.attention(q, k, v, mask=mask)))
    reasons = _reasons(lambda: fa.attention(q, k, v, mask=mask.astype(int).tolist(), causal="no"))
    assert reasons == ["mask given as a list holds int64 values; it must hold bools (True = may attend)",
                       "causal='no' must be a bool"]
