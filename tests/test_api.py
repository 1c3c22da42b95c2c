"""The framework-agnostic API on host arrays: round trips in the caller's own array type,
and validation that names every problem before anything runs."""

from __future__ import annotations

import numpy as np
import pytest

import cuflash
from cuflash import ValidationError, reference

from _tolerance import BF16


def _qkv(rng, b=2, nq=5, nk=7, h=4, hkv=2, d=8, dtype=np.float32, layout="bshd"):
    if layout == "bhsd":
        shapes = ((b, h, nq, d), (b, hkv, nk, d), (b, hkv, nk, d))
    else:
        shapes = ((b, nq, h, d), (b, nk, hkv, d), (b, nk, hkv, d))
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


# ---- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, BF16])
def test_numpy_arrays_round_trip_in_their_own_dtype(dtype):
    q, k, v = _qkv(np.random.default_rng(0), dtype=dtype)
    out, lse = cuflash.forward(q, k, v, causal=True)
    assert isinstance(out, np.ndarray) and out.dtype == np.dtype(dtype) and out.shape == q.shape
    assert lse.dtype == (np.float64 if np.dtype(dtype) == np.float64 else np.float32)
    ref_out, ref_lse = reference.forward(q, k, v, causal=True)
    np.testing.assert_allclose(out.astype(np.float64), ref_out, rtol=0, atol=np.finfo(np.float16).eps * 4 if dtype != np.float64 else 1e-12)
    dq, dk, dv = cuflash.backward(np.ones_like(out), q, k, v, out, lse, causal=True)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert dq.dtype == np.dtype(dtype)


def test_attention_is_forward_without_lse():
    q, k, v = _qkv(np.random.default_rng(1))
    out = cuflash.attention(q, k, v, softcap=5.0, window_size=(2, 1))
    expected, _ = cuflash.forward(q, k, v, softcap=5.0, window_size=(2, 1))
    np.testing.assert_array_equal(out, expected)


def test_torch_cpu_tensors_come_back_as_torch_tensors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    q, k, v = (torch.from_numpy(a) for a in _qkv(rng))
    q.requires_grad_(True)  # crosses DLPack through a detached view
    out, lse = cuflash.forward(q, k, v)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and isinstance(lse, torch.Tensor)
    ref, _ = reference.forward(q.detach().numpy(), k.numpy(), v.numpy())
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-6)
    bq, bk, bv = (t.detach().to(torch.bfloat16) for t in (q, k, v))
    out16 = cuflash.attention(bq, bk, bv)
    assert out16.dtype == torch.bfloat16 and out16.shape == bq.shape


def test_jax_cpu_arrays_come_back_as_jax_arrays():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    q, k, v = (jnp.asarray(a) for a in _qkv(np.random.default_rng(3)))
    out = cuflash.attention(q, k, v, causal=True)
    assert isinstance(out, jax.Array) and out.dtype == jnp.float32
    ref, _ = reference.forward(np.asarray(q), np.asarray(k), np.asarray(v), causal=True)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-6)
    out16 = cuflash.attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16))
    assert out16.dtype == jnp.bfloat16


def test_bhsd_layout_is_bshd_transposed():
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng)
    t = lambda a: np.ascontiguousarray(a.transpose(0, 2, 1, 3))  # noqa: E731
    out, lse = cuflash.forward(q, k, v, causal=True)
    out_t, lse_t = cuflash.forward(t(q), t(k), t(v), causal=True, layout="bhsd")
    np.testing.assert_array_equal(t(out), out_t)
    np.testing.assert_array_equal(lse, lse_t)


def test_backward_with_a_bias_also_returns_its_gradient_in_its_shape():
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng, dtype=np.float64)
    bias = rng.standard_normal((1, 4, 1, 7))
    out, lse = cuflash.forward(q, k, v, bias=bias)
    grads = cuflash.backward(np.ones_like(out), q, k, v, out, lse, bias=bias)
    assert len(grads) == 4 and grads[3].shape == bias.shape


def test_varlen_through_the_api():
    rng = np.random.default_rng(6)
    cu_q = np.array([0, 3, 3, 8], dtype=np.int32)
    cu_k = np.array([0, 4, 6, 6], dtype=np.int32)
    q = rng.standard_normal((8, 2, 8)).astype(np.float32)
    k = rng.standard_normal((6, 1, 8)).astype(np.float32)
    out, lse = cuflash.forward(q, k, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True)
    assert out.shape == q.shape and lse.shape == (2, 8)
    assert np.all(out[3:] == 0) and np.all(lse[:, 3:] == -np.inf)  # the last sequence has no keys


def test_dropout_needs_a_seed_for_forward_and_backward_but_attention_draws_one():
    q, k, v = _qkv(np.random.default_rng(7))
    with pytest.raises(ValidationError, match="seed=None with dropout_p=0.1"):
        cuflash.forward(q, k, v, dropout_p=0.1)
    out = cuflash.attention(q, k, v, dropout_p=0.1)
    assert np.isfinite(out).all()
    a, _ = cuflash.forward(q, k, v, dropout_p=0.5, seed=3)
    b, _ = cuflash.forward(q, k, v, dropout_p=0.5, seed=3)
    np.testing.assert_array_equal(a, b)


# ---- validation --------------------------------------------------------------------------


def _raises(match: str, *args, **kwargs):
    with pytest.raises(ValidationError, match=match) as info:
        cuflash.forward(*args, **kwargs)
    return info.value


def test_unsupported_and_mixed_dtypes_are_named():
    q, k, v = _qkv(np.random.default_rng(8))
    _raises("q.dtype=int32 is not supported", q.astype(np.int32), k.astype(np.int32), v.astype(np.int32))
    err = _raises("must share one dtype", q, k.astype(np.float16), v)
    assert "k=float16" in str(err)


def test_head_dim_zero_and_above_the_maximum():
    rng = np.random.default_rng(9)
    z = np.zeros((1, 3, 2, 0), np.float32)
    _raises("head_dim=0", z, z, z)
    big = rng.standard_normal((1, 3, 2, 257)).astype(np.float32)
    _raises("head_dim=257 exceeds the supported maximum 256", big, big, big)


def test_last_dimension_must_have_unit_stride():
    q, k, v = _qkv(np.random.default_rng(10), d=8)
    wide = np.repeat(q, 2, axis=-1)[..., ::2]
    err = _raises("unit stride in its last dimension", wide, k, v)
    assert "strides=" in str(err)


def test_mismatched_shapes_are_all_reported_at_once():
    rng = np.random.default_rng(11)
    q = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
    k = rng.standard_normal((1, 7, 2, 8)).astype(np.float32)
    v = rng.standard_normal((1, 6, 2, 4)).astype(np.float32)
    err = _raises("batch sizes differ", q, k, v, dropout_p=1.5, window_size=(-3, 0))
    text = str(err)
    for expected in ("batch sizes differ: q 2, k 1, v 1", "k and v sequence lengths differ", "head dims differ",
                     "num_heads=3 must be a multiple of num_heads_kv=2", "dropout_p=1.5", "window_size=(-3, 0)"):
        assert expected in text
    assert len(err.reasons) >= 6
    assert "q: shape=(2, 5, 3, 8)" in text  # the arrays are described


@pytest.mark.parametrize("ndim", [3, 5])
def test_wrong_rank_inputs(ndim):
    a = np.ones((2,) * ndim, np.float32)
    _raises(f"must be 4-D .* got {ndim}-D", a, a, a)


def test_host_and_device_arrays_cannot_mix():
    class FakeCudaArray:
        def __dlpack_device__(self):
            return (2, 0)

        def __dlpack__(self, stream=None):  # never reached: validation comes first
            raise AssertionError("imported before validation")

    q, k, v = _qkv(np.random.default_rng(12))
    _raises("all arrays must be on one device; got q on cpu, k on cuda:0", q, FakeCudaArray(), v)


def test_non_arrays_are_rejected_by_name():
    q, k, v = _qkv(np.random.default_rng(13))
    _raises("k: expected an array supporting DLPack, got list", q, k.tolist(), v)


@pytest.mark.parametrize(
    "cu_q,match",
    [
        (np.array([1, 3, 5], np.int32), r"cu_seqlens_q\[0\]=1 must be 0"),
        (np.array([0, 4, 3], np.int32), "must be non-decreasing"),
        (np.array([0, 2, 5], np.int64), "must be int32"),
        (np.array([0, 2, 4], np.int32), r"cu_seqlens_q\[-1\]=4 must equal the packed row count of q \(5\)"),
    ],
)
def test_bad_cu_seqlens(cu_q, match):
    rng = np.random.default_rng(14)
    q = rng.standard_normal((5, 2, 8)).astype(np.float32)
    k = rng.standard_normal((6, 2, 8)).astype(np.float32)
    _raises(match, q, k, k, cu_seqlens_q=cu_q, cu_seqlens_k=np.array([0, 3, 6], np.int32))


def test_bias_and_mask_must_broadcast():
    q, k, v = _qkv(np.random.default_rng(15))  # B=2, H=4, Nq=5, Nk=7
    _raises(r"bias shape \(3, 5, 7\) does not broadcast", q, k, v, bias=np.zeros((3, 5, 7), np.float32))
    _raises(r"mask shape \(5, 6\) does not broadcast", q, k, v, mask=np.ones((5, 6), bool))
    _raises("mask.dtype=float32 must be bool", q, k, v, mask=np.ones((5, 7), np.float32))
    _raises(r"alibi_slopes shape \(3,\)", q, k, v, alibi_slopes=np.ones(3, np.float32))


def test_unknown_options_are_a_type_error_naming_them_and_listing_the_options():
    q, k, v = _qkv(np.random.default_rng(16))
    out, lse = cuflash.forward(q, k, v)
    calls = {
        "forward": lambda **kw: cuflash.forward(q, k, v, **kw),
        "attention": lambda **kw: cuflash.attention(q, k, v, **kw),
        "probabilities": lambda **kw: cuflash.probabilities(q, k, v, **kw),
        "backward": lambda **kw: cuflash.backward(out, q, k, v, out, lse, **kw),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match="is_causal") as err:
            call(is_causal=True)
        text = str(err.value)
        assert text.startswith(f"cuflash.{name}()") and "'causal'" in text and "'softmax_scale'" in text, text


@pytest.mark.parametrize("options, named", [
    (dict(causal="no"), "causal='no' must be a bool"),
    (dict(window_size=(-1.9, 0)), "window_size=(-1.9, 0) must be a pair of ints"),
    (dict(window_size=(1, 2, 3)), "window_size=(1, 2, 3) must be a pair of ints"),
    (dict(softmax_scale="a"), "softmax_scale='a' must be a finite number"),
    (dict(dropout_p=0.1, seed=-1), "seed=-1 must be an int in [0, 2**64)"),
    (dict(dropout_p=0.1, seed=1.7), "seed=1.7 must be an int in [0, 2**64)"),
    (dict(dropout_p=0.1, seed=2**64), f"seed={2**64} must be an int in [0, 2**64)"),
    (dict(dropout_p=0.1, seed=2**65 + 5), f"seed={2**65 + 5} must be an int in [0, 2**64)"),
])
def test_bad_option_values_are_named(options, named):
    q, k, v = _qkv(np.random.default_rng(18))
    for call in (cuflash.forward, cuflash.attention):
        with pytest.raises(ValidationError) as err:
            call(q, k, v, **options)
        (reason,) = err.value.reasons
        assert reason.startswith(named), reason


def test_numpy_scalar_options_equal_python_ones():
    q, k, v = _qkv(np.random.default_rng(19))
    plain = cuflash.forward(q, k, v, causal=True, softmax_scale=0.5, window_size=(3, 0), dropout_p=0.25, seed=9)
    numpy = cuflash.forward(q, k, v, causal=np.bool_(True), softmax_scale=np.float32(0.5),
                            window_size=[np.int64(3), np.int32(0)], dropout_p=np.float64(0.25), seed=np.uint64(9))
    for a, b in zip(plain, numpy):
        np.testing.assert_array_equal(a, b)


def test_option_arrays_given_as_lists_keep_their_kind():
    """A mask given as a list of bools is the bool array; a list of the wrong kind is
    reported as what was given (the conversion is the library's, not the caller's)."""
    q, k, v = _qkv(np.random.default_rng(20))
    mask = np.random.default_rng(21).random((5, 7)) > 0.4
    np.testing.assert_array_equal(cuflash.attention(q, k, v, mask=mask.tolist()), cuflash.attention(q, k, v, mask=mask))
    cu = [0, 2, 5]
    qv, kv = q[0, :5], k[0, :5]
    np.testing.assert_array_equal(cuflash.attention(qv, kv, kv, cu_seqlens_q=cu, cu_seqlens_k=cu),
                                  cuflash.attention(qv, kv, kv, cu_seqlens_q=np.array(cu, np.int32),
                                                    cu_seqlens_k=np.array(cu, np.int32)))
    err = _raises("mask given as a list holds int64 values; it must hold bools", q, k, v,
                  mask=mask.astype(int).tolist())
    assert "float32" not in str(err)
    _raises("mask given as a list holds float64 values", q, k, v, mask=mask.astype(float).tolist())
    _raises("cu_seqlens_q given as a list holds float64 values; it must hold ints", qv, kv, kv,
            cu_seqlens_q=[0, 2.5, 5], cu_seqlens_k=cu)
    _raises("mask given as a list is ragged", q, k, v, mask=[[True], [True, False]])


def test_big_endian_arrays_are_reported_as_byte_order():
    q, k, v = _qkv(np.random.default_rng(22))
    err = _raises(r"q.dtype='>f4' is float32 in non-native \(big-endian\) byte order", q.astype(">f4"), k, v)
    assert err.reasons == [err.reasons[0]] and "not supported" not in str(err) and "share one dtype" not in str(err)
    _raises(r"bias.dtype='>f8' is float64 in non-native", q, k, v, bias=np.zeros((5, 7), ">f8"))


def test_torch_meta_tensors_are_reported_as_holding_no_data():
    torch = pytest.importorskip("torch")
    q = torch.empty(2, 5, 4, 8, device="meta")
    with pytest.raises(ValidationError, match="q: meta tensors hold no data") as err:
        cuflash.attention(q, q, q)
    assert "Dlpack" not in str(err.value)


def test_backward_checks_out_and_lse_shapes():
    q, k, v = _qkv(np.random.default_rng(17))
    out, lse = cuflash.forward(q, k, v)
    with pytest.raises(ValidationError, match=r"lse shape \(2, 4\) must be \(2, 4, 5\)"):
        cuflash.backward(out, q, k, v, out, lse[..., 0])


def test_probabilities_on_the_host_are_the_reference_softmax():
    rng = np.random.default_rng(18)
    q, k, v = _qkv(rng, dtype=np.float64)
    probs = cuflash.probabilities(q, k, v, causal=True, softcap=3.0)
    np.testing.assert_array_equal(probs, reference.probabilities(q, k, v, causal=True, softcap=3.0))
    assert np.allclose(probs.sum(-1), 1.0)
    with pytest.raises(TypeError, match="dropout_p"):
        cuflash.probabilities(q, k, v, dropout_p=0.1)


@pytest.mark.parametrize("side", [2**31, 2**40, 2**70])
def test_a_window_side_wider_than_every_distance_is_unbounded(side):
    rng = np.random.default_rng()
    q, k, v = (rng.standard_normal((1, 9, 2, 8)) for _ in range(3))
    for window, same in (((side, 0), (-1, 0)), ((0, side), (0, -1)), ((side, side), (-1, -1))):
        np.testing.assert_array_equal(cuflash.forward(q, k, v, window_size=window)[0],
                                      cuflash.forward(q, k, v, window_size=same)[0])
    got = cuflash.forward(q[:, :4], k, v, window_size=(side, 0), position_offsets=(32, 30))[0]
    np.testing.assert_array_equal(got, cuflash.forward(q[:, :4], k, v, window_size=(-1, 0),
                                                       position_offsets=(32, 30))[0])
