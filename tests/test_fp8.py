"""FP8 (e4m3) inputs: quantisation, incoherent processing, the reference semantics of FP8
calls, their errors, and the kernel emulation's error bound (CPU only)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import fp8
from cuflash._interop import Device

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
U = fp8.E4M3_UNIT_ROUNDOFF  # 2**-4
# float64 -> bfloat16 goes through float32 (ml_dtypes): two roundings, 2**-24 then 2**-8
# relative, so at most 2**-8 + 2**-24 + 2**-32 < 2**-8 + 2**-23 of the value.
BF16 = 2**-8 + 2**-23


def _rng():
    return np.random.default_rng()


def _expanded(descale, shape, layout="bshd"):
    ones = np.ones(shape)
    return fp8.dequantize(ones.astype(E4M3), np.asarray(descale), layout=layout, dtype=np.float64)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("granularity", fp8.GRANULARITIES)
def test_round_trip_error_within_half_an_e4m3_ulp(granularity, layout):
    """e4m3 keeps 3 mantissa bits: a value whose scaled magnitude |x|/descale is normal
    (>= 2**-6) rounds to nearest within half a unit in the last place, 2**-4 * |x|; a
    subnormal one (spacing 2**-9) within 2**-10 * descale. x / descale is formed in
    float64 and rounded once, so the bound holds up to float64 rounding (factor 1 + 2**-40)."""
    rng = _rng()
    shape = (2, 300, 3, 16) if layout == "bshd" else (2, 3, 300, 16)
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-12, 12, shape))  # wide range: subnormals too
    x8, descale = fp8.quantize(x, granularity, layout=layout)
    assert x8.dtype == E4M3 and descale.dtype == np.float32
    back = fp8.dequantize(x8, descale, layout=layout, dtype=np.float64)
    d = _expanded(descale, shape, layout)
    bound = np.maximum(U * np.abs(x), fp8.E4M3_SUBNORMAL_HALF_SPACING * d) * (1 + 2**-40)
    assert np.all(np.abs(back - x) <= bound)
    # The bound is attained to within a factor 2 somewhere: the rounding is not finer than e4m3.
    assert np.max(np.abs(back - x) / bound) > 0.5


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_descale_shapes_and_values(layout):
    rng = _rng()
    b, s, h, d = 2, 257, 3, 8
    shape = (b, s, h, d) if layout == "bshd" else (b, h, s, d)
    x = rng.standard_normal(shape)
    for granularity, want in (("tensor", ()), ("head", (b, h)), ("block", (b, h, 3))):
        x8, descale = fp8.quantize(x, granularity, layout=layout)
        assert descale.shape == want == fp8.descale_shape(granularity, shape, layout)
        # The largest element of each group maps to ±448 (descale = amax / 448).
        scaled = np.abs(x8.astype(np.float64))
        assert scaled.max() == fp8.E4M3_MAX
        expected = np.abs(x).max() / 448 if granularity == "tensor" else None
        if expected is not None:
            assert descale == np.float32(expected)
    x8, descale = fp8.quantize(x, "block", block_size=64, layout=layout)
    assert descale.shape == (b, h, 5)
    heads_last = x if layout == "bshd" else x.transpose(0, 2, 1, 3)
    assert np.array_equal(descale[:, :, 4], (np.abs(heads_last[:, 256:]).max(axis=(1, 3)) / 448).astype(np.float32))


def test_nonfinite_and_zero_groups():
    """NaN stays NaN, ±inf becomes NaN (e4m3fn has no infinity), the scale comes from the
    finite values, and an all-zero group gets descale 1."""
    x = np.zeros((1, 4, 2, 4))
    x[0, 0, 0, :] = [np.nan, np.inf, -np.inf, 3.0]
    x8, descale = fp8.quantize(x, "head")
    out = x8.astype(np.float64)
    assert np.isnan(out[0, 0, 0, :3]).all()
    assert out[0, 0, 0, 3] == 448.0 and descale[0, 0] == np.float32(3.0 / 448)
    assert descale[0, 1] == 1.0 and not out[0, :, 1].any()


def test_bad_arguments_are_named():
    x = np.ones((1, 4, 2, 8))
    with pytest.raises(ValueError, match="granularity='row'"):
        fp8.quantize(x, "row")
    with pytest.raises(ValueError, match="block_size=0"):
        fp8.quantize(x, "block", block_size=0)
    with pytest.raises(ValueError, match=r"shape \(4, 8\).*4-D"):
        fp8.quantize(np.ones((4, 8)), "head")
    with pytest.raises(ValueError, match="head_dim=48 must be a power of two"):
        fp8.hadamard_transform(np.ones((2, 48)), 0)


def test_dequantize_checks_the_descale_against_its_input():
    """A descale that does not fit x8 is named, as cuflash.forward names it, instead of
    broadcasting to another batch; a per-block descale made with another block_size is
    caught whenever its block count differs."""
    x = np.random.default_rng(5).standard_normal((1, 8, 2, 16))
    x8, blocks = fp8.quantize(x, "block", block_size=4)
    np.testing.assert_allclose(fp8.dequantize(x8, blocks, block_size=4), x, rtol=2**-4, atol=2**-10 * blocks.max())
    with pytest.raises(ValueError, match=r"descale shape \(2, 2\) must be one of \(\), \(1,\), \(1, 2\), \(1, 2, 2\)"):
        fp8.dequantize(x8, np.ones((2, 2), np.float32), block_size=4)
    with pytest.raises(ValueError, match=r"has 2 blocks, but block_size=8 over seqlen=8 makes 1: pass the block_size"):
        fp8.dequantize(x8, blocks, block_size=8)
    with pytest.raises(ValueError, match=r"has 2 blocks, but block_size=128 over seqlen=8 makes 1"):
        fp8.dequantize(x8, blocks)
    with pytest.raises(ValueError, match=r"descale shape \(1, 2\) \(per head or per block\) needs a 4-D x8"):
        fp8.dequantize(x8[0], np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match=r"descale='a' must be a number or an array of numbers"):
        fp8.dequantize(x8, "a")
    with pytest.raises(ValueError, match=r"layout='xx' must be one of"):
        fp8.dequantize(x8, 0.5, layout="xx")
    # What fits is taken as before: scalars, lists, per head, the block size quantize used.
    assert fp8.dequantize(x8, [0.5]).shape == x.shape
    np.testing.assert_array_equal(fp8.dequantize(x8, 0.5), x8.astype(np.float32) * np.float32(0.5))
    _, heads = fp8.quantize(x, "head")
    assert fp8.dequantize(x8, heads).shape == x.shape


@pytest.mark.parametrize("dtype", [np.int32, np.complex64, np.bool_])
def test_quantize_takes_floating_inputs_only(dtype):
    with pytest.raises(ValueError, match=rf"x.dtype={np.dtype(dtype)} must be a floating dtype"):
        fp8.quantize(np.ones((1, 4, 2, 8), dtype), "tensor")


@pytest.mark.parametrize("seed", [-1, 1.5, "3", None, True, 2**64, 2**70])
def test_hadamard_seed_must_be_an_int_in_range(seed):
    with pytest.raises(ValueError, match=rf"seed={seed!r} must be an int in \[0, 2\*\*64\)"):
        fp8.hadamard_transform(np.ones((2, 16)), seed)


def test_hadamard_names_a_0d_input_and_a_non_int_head_dim():
    with pytest.raises(ValueError, match=r"x is 0-d"):
        fp8.hadamard_transform(np.float64(1.0), 0)
    with pytest.raises(ValueError, match=r"head_dim=16.0 must be an int"):
        fp8.hadamard_signs(0, 16.0)
    np.testing.assert_array_equal(fp8.hadamard_signs(np.uint64(2**64 - 1), np.int64(16)),
                                  fp8.hadamard_signs(2**64 - 1, 16))


@pytest.mark.parametrize("granularity", fp8.GRANULARITIES)
def test_torch_and_jax_quantize_like_numpy(granularity):
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    rng = _rng()
    x = rng.standard_normal((2, 130, 2, 16)).astype(np.float32)
    _, ref_descale = fp8.quantize(x.astype(np.float64), granularity)
    bound = np.maximum(U * np.abs(x), fp8.E4M3_SUBNORMAL_HALF_SPACING * _expanded(ref_descale, x.shape)) * (1 + 2**-20)
    for x8, descale, want in (
        (*fp8.quantize(torch.tensor(x), granularity), torch.float8_e4m3fn),
        (*fp8.quantize(jnp.asarray(x), granularity), jnp.float8_e4m3fn),
    ):
        assert x8.dtype == want and tuple(descale.shape) == ref_descale.shape
        np.testing.assert_allclose(np.asarray(descale, np.float64), ref_descale, rtol=2**-22)
        back = np.asarray(fp8.dequantize(x8, descale), np.float64)
        assert np.all(np.abs(back - x) <= bound * (1 + 2**-20) + 2**-20 * np.abs(x))


# ---- incoherent processing ---------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [1, 2, 64, 128, 256])
def test_hadamard_matrix_is_orthogonal(head_dim):
    """M = D H / sqrt(d): transforming the identity's rows gives M itself, and M Mᵀ = I."""
    seed = int(_rng().integers(2**32))
    m = fp8.hadamard_transform(np.eye(head_dim), seed)
    np.testing.assert_allclose(m @ m.T, np.eye(head_dim), rtol=0, atol=1e-14)
    # Each entry is ±1/sqrt(d): the Sylvester H times the seeded signs.
    np.testing.assert_allclose(np.abs(m), 1 / math.sqrt(head_dim), rtol=1e-15)
    signs = fp8.hadamard_signs(seed, head_dim)
    sylvester = np.array([[(-1) ** (i & j).bit_count() for j in range(head_dim)] for i in range(head_dim)])
    np.testing.assert_allclose(m, signs[:, None] * sylvester / math.sqrt(head_dim), rtol=0, atol=1e-15)


def test_hadamard_leaves_qk_unchanged_and_spreads_an_outlier():
    rng = _rng()
    seed = int(rng.integers(2**32))
    q, k = rng.standard_normal((2, 50, 3, 128)), rng.standard_normal((2, 70, 3, 128))
    qm, km = fp8.hadamard_transform(q, seed), fp8.hadamard_transform(k, seed)
    scores = np.einsum("bihd,bjhd->bhij", q, k)
    np.testing.assert_allclose(np.einsum("bihd,bjhd->bhij", qm, km), scores, rtol=0,
                               atol=1e-12 * np.abs(q).max() * np.abs(k).max() * 128)
    # Different seeds give different matrices, so q and k must share one.
    assert not np.allclose(np.einsum("bihd,bjhd->bhij", qm, fp8.hadamard_transform(k, seed + 1)), scores)
    outlier = np.zeros(128)
    outlier[int(rng.integers(128))] = 100.0
    np.testing.assert_allclose(np.abs(fp8.hadamard_transform(outlier, seed)), 100 / math.sqrt(128), rtol=1e-15)


def test_hadamard_on_torch_and_jax():
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    x = _rng().standard_normal((3, 4, 64))
    want = fp8.hadamard_transform(x, 7)
    np.testing.assert_allclose(fp8.hadamard_transform(torch.tensor(x), 7).numpy(), want, rtol=0, atol=1e-14)
    got = np.asarray(fp8.hadamard_transform(jnp.asarray(x, jnp.float32), 7), np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(x).max())


# ---- the reference semantics of FP8 calls ----------------------------------------------


def _quantized(rng, granularity, layout="bshd", b=2, sq=150, sk=200, h=4, hk=2, d=32):
    def shape(s, heads):
        return (b, s, heads, d) if layout == "bshd" else (b, heads, s, d)

    q, k, v = rng.standard_normal(shape(sq, h)), rng.standard_normal(shape(sk, hk)), rng.standard_normal(shape(sk, hk))
    return [fp8.quantize(x, granularity, layout=layout) for x in (q, k, v)]


def _dequantized_reference(quantized, layout="bshd", **options):
    q, k, v = (fp8.dequantize(x8, d, layout=layout, dtype=np.float64) for x8, d in quantized)
    return cuflash.reference.forward(q, k, v, layout=layout, **options)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("granularity", fp8.GRANULARITIES)
def test_fp8_forward_is_the_reference_on_dequantised_inputs(granularity, layout):
    """out is the float64 attention of x8 * descale rounded to bfloat16 (through float32:
    BF16), or once to float16 (2**-11, and 2**-25 absolute below its normal range); lse
    rounded once to float32."""
    (q8, dq), (k8, dk), (v8, dv) = quantized = _quantized(_rng(), granularity, layout)
    out, lse = cuflash.forward(q8, k8, v8, q_descale=dq, k_descale=dk, v_descale=dv, causal=True, layout=layout)
    ref_out, ref_lse = _dequantized_reference(quantized, layout, causal=True)
    assert out.dtype == np.dtype(ml_dtypes.bfloat16) and lse.dtype == np.float32
    assert np.all(np.abs(out.astype(np.float64) - ref_out) <= BF16 * np.abs(ref_out))
    np.testing.assert_allclose(lse, ref_lse, rtol=2**-23)
    half = cuflash.attention(q8, k8, v8, q_descale=dq, k_descale=dk, v_descale=dv, causal=True, layout=layout,
                             out_dtype="float16")
    assert half.dtype == np.float16
    assert np.all(np.abs(half.astype(np.float64) - ref_out) <= 2**-11 * np.abs(ref_out) + 2**-25)


def test_q_descale_per_kv_head_and_scalar_descales():
    """A (batch, heads_kv) q descale covers each GQA group; a Python number is per tensor."""
    rng = _rng()
    (q8, _), (k8, dk), (v8, _) = _quantized(rng, "head")
    dq_kv = rng.uniform(0.5, 2.0, (2, 2)).astype(np.float32)
    out, _ = cuflash.forward(q8, k8, v8, q_descale=dq_kv, k_descale=dk, v_descale=0.25)
    q = q8.astype(np.float64) * np.repeat(dq_kv, 2, axis=1)[:, None, :, None]
    ref, _ = cuflash.reference.forward(q, fp8.dequantize(k8, dk, dtype=np.float64), v8.astype(np.float64) * 0.25)
    assert np.all(np.abs(out.astype(np.float64) - ref) <= BF16 * np.abs(ref))


def test_fp8_nan_propagates_to_its_rows():
    rng = _rng()
    (q8, dq), (k8, dk), (v8, dv) = _quantized(rng, "tensor", h=2, hk=2)
    q8[0, 5, 1, 3] = np.nan
    out, lse = cuflash.forward(q8, k8, v8, q_descale=dq, k_descale=dk, v_descale=dv)
    out = out.astype(np.float64)
    assert np.isnan(out[0, 5, 1]).all() and np.isnan(lse[0, 1, 5])
    out[0, 5, 1] = 0
    assert np.isfinite(out).all()


def test_descale_errors_name_value_and_expected_shape():
    rng = _rng()
    (q8, dq), (k8, dk), (v8, dv) = _quantized(rng, "block")
    cases = [
        (dict(q_descale=np.ones((2, 4, 9), np.float32)), r"q_descale shape \(2, 4, 9\) must be one of .*\(2, 4, 2\)"),
        (dict(k_descale=np.ones((2, 4), np.float32)), r"k_descale shape \(2, 4\) must be one of \(\), \(1,\), \(2, 2\)"),
        (dict(v_descale=np.ones((2, 2), np.float64)), r"v_descale.dtype=float64 must be float32"),
        (dict(out_dtype="float32"), r"out_dtype='float32' must be one of \('bfloat16', 'float16'\)"),
    ]
    for bad, message in cases:
        options = dict(q_descale=dq, k_descale=dk, v_descale=dv) | bad
        with pytest.raises(cuflash.ValidationError, match=message):
            cuflash.forward(q8, k8, v8, **options)
    with pytest.raises(cuflash.ValidationError, match="q_descale given with q.dtype=float32"):
        cuflash.forward(*(x.astype(np.float32) for x in (q8, q8, q8)), q_descale=1.0)
    with pytest.raises(cuflash.ValidationError, match="must share one dtype"):
        cuflash.forward(q8, k8.astype(np.float32), v8)
    # Variable-length batches: per-tensor descales only.
    cu = np.array([0, 100, 150], np.int32)
    with pytest.raises(cuflash.ValidationError, match=r"q_descale shape \(2, 4\): variable-length"):
        cuflash.forward(q8[0, :150], k8[0, :150], v8[0, :150], cu_seqlens_q=cu, cu_seqlens_k=cu,
                        q_descale=np.ones((2, 4), np.float32))


def test_varlen_fp8_with_per_tensor_descales():
    rng = _rng()
    (q8, dq), (k8, dk), (v8, dv) = _quantized(rng, "tensor", b=1, sq=150, sk=150)
    cu = np.array([0, 100, 150], np.int32)
    out, _ = cuflash.forward(q8[0], k8[0], v8[0], cu_seqlens_q=cu, cu_seqlens_k=cu, q_descale=dq, k_descale=dk,
                             v_descale=dv)
    ref, _ = cuflash.reference.forward(*(fp8.dequantize(x[0], d, dtype=np.float64) for x, d in
                                         ((q8, dq), (k8, dk), (v8, dv))), cu_seqlens_q=cu, cu_seqlens_k=cu)
    assert np.all(np.abs(out.astype(np.float64) - ref) <= BF16 * np.abs(ref))


def test_entry_points_without_fp8_refuse_it():
    (q8, dq), (k8, _), (v8, _) = _quantized(_rng(), "tensor", h=2, hk=2)
    with pytest.raises(cuflash.ValidationError, match="cuflash.backward does not take FP8 inputs"):
        cuflash.backward(q8, q8, k8, v8, q8, np.zeros((2, 2, 150), np.float32))
    with pytest.raises(cuflash.ValidationError, match="cuflash.probabilities does not take FP8 inputs"):
        cuflash.probabilities(q8, k8, v8)
    with pytest.raises(ValueError, match="FP8 attention is forward-only"):
        cuflash.reference.backward(*(x.astype(np.float64) for x in (q8, q8, k8, v8, q8)),
                                   np.zeros((2, 2, 150)), q_descale=dq)


def test_gpu_fp8_is_refused_before_any_import(monkeypatch):
    """The dispatch decision: host arrays take the reference, CUDA arrays are refused
    (no FP8 kernel exists yet), before DLPack import or any launch."""
    assert fp8.kernel_unavailable_reason("cpu") is None
    assert "no FP8 attention kernel is built for this GPU" in fp8.kernel_unavailable_reason("cuda")
    from cuflash import _api

    monkeypatch.setattr(_api._interop, "device_of", lambda obj: Device("cuda", 0))

    def no_import(*args, **kwargs):
        raise AssertionError("an FP8 call on a GPU reached the import")

    monkeypatch.setattr(_api._interop, "import_array", no_import)
    (q8, dq), (k8, dk), (v8, dv) = _quantized(_rng(), "tensor", h=2, hk=2)
    with pytest.raises(cuflash.ValidationError, match="no FP8 attention kernel is built for this GPU"):
        cuflash.forward(q8, k8, v8, q_descale=dq, k_descale=dk, v_descale=dv)


def test_torch_cpu_fp8_forward_and_gradient_error():
    torch = pytest.importorskip("torch")
    import cuflash.torch as ct

    rng = _rng()
    x = [torch.tensor(rng.standard_normal((1, 140, 2, 32)), dtype=torch.float32) for _ in range(3)]
    (q8, dq), (k8, dk), (v8, dv) = quantized = [fp8.quantize(t, "block") for t in x]
    out, lse = cuflash.forward(q8, k8, v8, q_descale=dq, k_descale=dk, v_descale=dv)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32 and out.shape == q8.shape
    ref, _ = _dequantized_reference([(t8.view(torch.uint8).numpy().view(E4M3), d.numpy()) for t8, d in quantized])
    assert np.all(np.abs(out.double().numpy() - ref) <= BF16 * np.abs(ref))
    half = cuflash.attention(q8, k8, v8, q_descale=dq, k_descale=dk, v_descale=dv, out_dtype=torch.float16)
    assert half.dtype == torch.float16
    with pytest.raises(cuflash.ValidationError, match="q is an FP8 tensor that requires grad"):
        cuflash.attention(q8.clone().requires_grad_(), k8, v8, q_descale=dq, k_descale=dk, v_descale=dv)
    with torch.no_grad():  # no gradient asked: runs
        cuflash.attention(q8.clone().requires_grad_(), k8, v8, q_descale=dq, k_descale=dk, v_descale=dv)
    with pytest.raises(cuflash.ValidationError, match="cuflash.torch.attention does not take FP8 inputs"):
        ct.attention(q8.requires_grad_(), k8, v8)
    with pytest.raises(cuflash.ValidationError, match="flash_attn_func does not take FP8 inputs"):
        ct.flash_attn_func(q8, k8, v8)


def test_jax_cpu_fp8_forward_and_gradient_error():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    import cuflash.jax as cj

    rng = _rng()
    x = [jnp.asarray(rng.standard_normal((1, 140, 2, 32)), jnp.float32) for _ in range(3)]
    (q8, dq), (k8, dk), (v8, dv) = quantized = [fp8.quantize(a, "head") for a in x]
    out, lse = cuflash.forward(q8, k8, v8, q_descale=dq, k_descale=dk, v_descale=dv)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32 and isinstance(out, jax.Array)
    ref, _ = _dequantized_reference([(np.asarray(a), np.asarray(d)) for a, d in quantized])
    assert np.all(np.abs(np.asarray(out, np.float64) - ref) <= BF16 * np.abs(ref))

    def loss(q):
        return cuflash.attention(q, k8, v8, q_descale=dq, k_descale=dk, v_descale=dv).astype(jnp.float32).sum()

    with pytest.raises(cuflash.ValidationError, match="q is a traced FP8 JAX value"):
        jax.grad(loss)(q8)
    with pytest.raises(cuflash.ValidationError, match="cuflash.jax.attention does not take FP8 inputs"):
        jax.grad(lambda q: cj.attention(q, k8, v8).astype(jnp.float32).sum())(q8)


# ---- the emulation of the FP8 kernel -----------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    seqlen_q=st.integers(1, 300),
    seqlen_k=st.integers(1, 300),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
    head_dim=st.sampled_from([16, 32, 64]),
    granularity=st.sampled_from(fp8.GRANULARITIES),
    hadamard=st.booleans(),
    causal=st.booleans(),
    log2_scale=st.integers(-6, 0),
)
@example(seed=0, seqlen_q=129, seqlen_k=257, heads=(2, 1), head_dim=64, granularity="block", hadamard=True,
         causal=False, log2_scale=0)
@example(seed=1, seqlen_q=200, seqlen_k=50, heads=(1, 1), head_dim=16, granularity="tensor", hadamard=False,
         causal=True, log2_scale=-6)
def test_emulated_fp8_forward_error_is_within_its_derived_bound(seed, seqlen_q, seqlen_k, heads, head_dim, granularity,
                                                               hadamard, causal, log2_scale):
    """The emulated kernel's output against the float64 attention of the unquantised
    inputs, elementwise, within a bound derived from the e4m3 roundings.

    Inputs. Each dequantised x̂' (q and k after the Hadamard transform when used; it is
    orthogonal, so the float64 scores s = c q kᵀ are those of the transformed pair) is
    within e_x = |x̂' - x'| of x', itself at most u |x'| + a_x, u = 2**-4 and
    a_x = 2**-10 * descale (the round-trip test). So the scores the kernel forms from x̂' differ from s by at most
        D_ij = c (e_q |k'|ᵀ + |q'| e_kᵀ + e_q e_kᵀ)_ij + g_ij,
    g_ij the fp32 arithmetic: (d + 4) 2**-24 c (|q̂'| |k̂'|ᵀ)_ij for the products, the
    dequantisation and the scale, plus 2**-22 (|ŝ_ij| + max_j |ŝ_ij|) for exp's argument.
    With E_i = max over allowed j of D_ij, softmax moves each probability by a factor in
    [exp(-2 E_i), exp(2 E_i)]: |p̂ - p| <= (exp(2 E_i) - 1) p.
    P. Each unnormalised probability (relative to the running row max, at most 1) is
    rounded as 256 P to e4m3: within u of itself, or 2**-10 / 256 = 2**-18 absolute
    below the normal range; rescaling by alpha <= 1 only shrinks the latter, and the row
    sum l (formed from the unrounded P) is at least 1 (the row max contributes exp(0)).
    So the rounding of P moves out_id by at most u exp(2E_i) sum_j p_ij |v̂_jd| +
    2**-18 sum_j |v̂_jd|.
    V. |v̂ - v| <= e_v, so sum_j p_ij e_v,jd bounds the rest; |v̂| <= |v| + e_v.
    fp32 sums over at most seqlen_k keys (l, P V and the rescales): relative
    (2 seqlen_k + d + 20) 2**-24 of exp(2E_i) sum_j p_ij |v̂_jd|.
    Rows with no allowed key (causal, seqlen_k < seqlen_q) are 0 in both."""
    rng = np.random.default_rng(seed)
    h, hk = heads
    scale = 2.0**log2_scale
    q = rng.standard_normal((1, seqlen_q, h, head_dim)) * scale
    k = rng.standard_normal((1, seqlen_k, hk, head_dim)) * scale
    v = rng.standard_normal((1, seqlen_k, hk, head_dim)) * scale
    qt, kt = (fp8.hadamard_transform(q, seed), fp8.hadamard_transform(k, seed)) if hadamard else (q, k)
    (q8, dq), (k8, dk), (v8, dv) = (fp8.quantize(x, granularity) for x in (qt, kt, v))
    out, lse = fp8.emulate_forward(q8, k8, v8, dq, dk, dv, causal=causal)
    exact, _ = cuflash.reference.forward(q, k, v, causal=causal)
    p = cuflash.reference.probabilities(q, k, v, causal=causal)  # (1, h, sq, sk)

    def heads_first(x):
        return np.repeat(x.transpose(0, 2, 1, 3), h // x.shape[2], axis=1)

    def rounding(x, x8, d):
        # The actual input rounding |x̂' - x'|, exact in float64; the round-trip test holds
        # it below u |x'| + a_x.
        return heads_first(np.abs(fp8.dequantize(x8, d, dtype=np.float64) - x))

    c = 1 / math.sqrt(head_dim)
    aq, ak, av = heads_first(np.abs(qt)), heads_first(np.abs(kt)), heads_first(np.abs(v))
    eq, ek, ev = rounding(qt, q8, dq), rounding(kt, k8, dk), rounding(v, v8, dv)
    kT = np.swapaxes
    deq_q = heads_first(np.abs(fp8.dequantize(q8, dq, dtype=np.float64)))
    deq_k = heads_first(np.abs(fp8.dequantize(k8, dk, dtype=np.float64)))
    s_abs = np.abs(c * heads_first(qt) @ kT(heads_first(kt), -1, -2))
    allowed = p > 0
    D = c * (eq @ kT(ak, -1, -2) + aq @ kT(ek, -1, -2) + eq @ kT(ek, -1, -2))
    D += (head_dim + 4) * 2.0**-24 * c * (deq_q @ kT(deq_k, -1, -2))
    D += 2.0**-22 * (s_abs + np.max(np.where(allowed, s_abs, 0), axis=-1, keepdims=True) + D)
    E = np.max(np.where(allowed, D, 0), axis=-1, keepdims=True)  # (1, h, sq, 1)
    grow = np.exp(2 * E)
    v_hat = av + ev
    pv = p @ v_hat
    fp32 = (2 * seqlen_k + head_dim + 20) * 2.0**-24
    bound = (grow - 1 + U * grow + fp32 * grow) * pv + p @ ev + 2.0**-18 * (allowed.any(-1, keepdims=True) * v_hat.sum(-2, keepdims=True))
    err = np.abs(out.transpose(0, 2, 1, 3) - exact.transpose(0, 2, 1, 3))
    assert np.all(err <= bound), f"worst error / bound: {np.max(err / np.where(bound > 0, bound, 1)):.3f}"
    no_key = ~allowed.any(-1)
    assert np.all(lse[no_key] == -np.inf) and np.all(out.transpose(0, 2, 1, 3)[no_key] == 0)


# P's rounding per p_mode: (relative bound on a P that stays normal, absolute bound below,
# both in units of the row's running max, where P <= 1). e4m3 as 256 P: 2**-4, and half the
# subnormal spacing 2**-10 over 256. e4m3_rowmax: the tile's largest P r maps to 448, so
# below the normal range the rounding is 2**-10 r / 448 <= 2**-10 / 448. bf16: 2**-8 (its
# range covers fp32's, and exp of an fp32 argument stays far above bf16's smallest normal
# divided by 256 except where it underflows to 0 in fp32 already). fp16: 2**-11, and half
# of fp16's subnormal spacing 2**-24, over 256. fp32: unrounded.
P_ROUNDING = {
    "e4m3": (U, 2.0**-18),
    "e4m3_rowmax": (U, 2.0**-10 / 448),
    "bf16": (2.0**-8, 2.0**-133),
    "fp16": (2.0**-11, 2.0**-25 / 256),
    "fp32": (0.0, 0.0),
}


def _emulation_bound(q, k, v, p_mode, seqlen_k, head_dim):
    """|emulated out - float64 attention of the same (dequantised) inputs|, elementwise.

    The operands are exact, so the scores differ from float64 only by fp32 arithmetic:
    (d + 4) 2**-24 c |q| |k|ᵀ for the products and scale, and 2**-22 (|s| + max |s|) for
    exp's argument; with E_i their largest value in row i, each probability moves by a
    factor within exp(±2 E_i). P's rounding (relative u_P, absolute a_P relative to the
    running max, which the row sum l >= 1 normalises) moves out_id by at most
    u_P sum_j p_ij |v_jd| + a_P sum_j |v_jd|; the fp32 sums over seqlen_k keys and the
    rescales add (2 seqlen_k + d + 20) 2**-24 sum_j p_ij |v_jd| (the module's emulation
    test derives the same terms)."""
    u_p, a_p = P_ROUNDING[p_mode]
    c = 1 / math.sqrt(head_dim)
    qh, kh, vh = (np.repeat(x.transpose(0, 2, 1, 3), q.shape[2] // x.shape[2], axis=1) for x in (q, k, v))
    s_abs = np.abs(c * qh @ np.swapaxes(kh, -1, -2))
    g = (head_dim + 4) * 2.0**-24 * c * (np.abs(qh) @ np.swapaxes(np.abs(kh), -1, -2))
    g += 2.0**-22 * (s_abs + s_abs.max(axis=-1, keepdims=True) + g)
    grow = np.exp(2 * g.max(axis=-1, keepdims=True))
    p = cuflash.reference.probabilities(q, k, v)
    pv = p @ np.abs(vh)
    fp32 = (2 * seqlen_k + head_dim + 20) * 2.0**-24
    bound = (grow - 1 + (u_p + fp32) * grow) * pv + a_p * np.abs(vh).sum(-2, keepdims=True)
    return bound.transpose(0, 2, 1, 3)


@pytest.mark.parametrize("p_mode", fp8.P_MODES)
def test_emulated_p_modes_are_within_their_rounding_bound(p_mode):
    """With exactly dequantised inputs as the reference's, what is left of the emulation's
    error is P's rounding (and fp32): within each p_mode's bound, so a mode that rounded
    P more coarsely than it says (e4m3 in place of bf16, say) would fail."""
    rng = _rng()
    sq, sk, h, d = 70, 300, 2, 32
    q, k, v = (rng.standard_normal((1, s, h, d)) * 2 for s in (sq, sk, sk))
    (q8, dq), (k8, dk), (v8, dv) = (fp8.quantize(x, "block") for x in (q, k, v))
    qd, kd, vd = (fp8.dequantize(x8, dx, dtype=np.float64) for x8, dx in ((q8, dq), (k8, dk), (v8, dv)))
    out, _ = fp8.emulate_forward(q8, k8, v8, dq, dk, dv, p_mode=p_mode)
    exact, _ = cuflash.reference.forward(qd, kd, vd)
    bound = _emulation_bound(qd, kd, vd, p_mode, sk, d)
    err = np.abs(out - exact)
    assert np.all(err <= bound), f"worst error / bound: {np.max(err / bound):.3f}"


def test_rowmax_p_scaling_keeps_a_tile_far_below_the_running_max():
    """Keys in the second 128-key tile score 20 below the first tile's max: P = e**-20
    ~ 2e-9 there, so 256 P (5e-7) is below e4m3's smallest subnormal and flushes to 0,
    and that tile's large v is lost; scaling by 448 over the tile's row max keeps it
    within e4m3's relative rounding."""
    d = 16
    q = np.zeros((1, 1, 1, d))
    q[..., 0] = 1.0
    k = np.zeros((1, 256, 1, d))
    k[:, 128:, :, 0] = -20.0 * math.sqrt(d)  # scores 0 in tile 0, -20 in tile 1
    v = np.ones((1, 256, 1, d))
    v[:, 128:] = 1e9  # out = (128 * 1 + 128 * e**-20 * 1e9) / 128 ~ 1 + 2.06
    (q8, dq), (k8, dk), (v8, dv) = (fp8.quantize(x, "block") for x in (q, k, v))
    qd, kd, vd = (fp8.dequantize(x8, dx, dtype=np.float64) for x8, dx in ((q8, dq), (k8, dk), (v8, dv)))
    exact, _ = cuflash.reference.forward(qd, kd, vd)
    fixed, _ = fp8.emulate_forward(q8, k8, v8, dq, dk, dv, p_mode="e4m3")
    rowmax, _ = fp8.emulate_forward(q8, k8, v8, dq, dk, dv, p_mode="e4m3_rowmax")
    assert exact[0, 0, 0, 0] > 3
    np.testing.assert_allclose(fixed, 1.0, rtol=1e-6)  # tile 1 flushed: only tile 0's v = 1
    np.testing.assert_allclose(rowmax, exact, rtol=2 * U)


def test_emulated_v_block_size_and_channel_descale_match_the_dequantised_reference():
    """v with 32-row scales while q and k keep 128-row ones, and v with one more scale per
    head_dim column (applied to out's columns): the emulation computes the attention of
    the v they stand for, within the e4m3 P bound."""
    rng = _rng()
    sq, sk, h, hk, d = 40, 200, 4, 2, 32
    q = rng.standard_normal((1, sq, h, d))
    k, v = (rng.standard_normal((1, sk, hk, d)) for _ in range(2))
    v = v * rng.uniform(0.01, 100.0, d)  # columns of very different sizes
    (q8, dq), (k8, dk) = (fp8.quantize(x, "block") for x in (q, k))
    qd, kd = (fp8.dequantize(x8, dx, dtype=np.float64) for x8, dx in ((q8, dq), (k8, dk)))
    v8, dv = fp8.quantize(v, "block", block_size=32)
    out, _ = fp8.emulate_forward(q8, k8, v8, dq, dk, dv, v_block_size=32)
    vd = fp8.dequantize(v8, dv, block_size=32, dtype=np.float64)
    exact, _ = cuflash.reference.forward(qd, kd, vd)
    assert np.all(np.abs(out - exact) <= _emulation_bound(qd, kd, vd, "e4m3", sk, d))
    channel = (np.abs(v).max(axis=1) / fp8.E4M3_MAX).astype(np.float32)  # (1, hk, d)
    v8 = (v / channel[:, None]).astype(E4M3)
    out, _ = fp8.emulate_forward(q8, k8, v8, dq, dk, np.float32(1), v_channel_descale=channel)
    vd = v8.astype(np.float64) * channel[:, None]
    exact, _ = cuflash.reference.forward(qd, kd, vd)
    assert np.all(np.abs(out - exact) <= _emulation_bound(qd, kd, vd, "e4m3", sk, d))
    with pytest.raises(ValueError, match=r"v_channel_descale shape \(1, 2, 16\)"):
        fp8.emulate_forward(q8, k8, v8, dq, dk, np.float32(1), v_channel_descale=channel[..., :16])
    with pytest.raises(ValueError, match="p_mode='e5m2'"):
        fp8.emulate_forward(q8, k8, v8, dq, dk, np.float32(1), p_mode="e5m2")
