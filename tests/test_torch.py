"""cuflash.torch on CPU tensors (the float64 reference path), as CI runs it.

The promises: the operators are registered and pass torch.library.opcheck; their fake
implementations give the real outputs' shapes and dtypes; gradients through every drop-in
match finite differences; the SDPA drop-in equals torch's own SDPA, values and gradients;
the FlashAttention-2 drop-ins equal cuflash.reference; the signatures equal the anchors';
torch.compile(fullgraph=True) traces the operator with no graph break; what cannot be
honoured raises NotImplementedError naming the argument.

torch.compile runs with backend="aot_eager" here: it traces through Dynamo and
AOTAutograd exactly as inductor would (fake tensors, functionalised forward and backward
graphs) but skips inductor's C++ code generation, which takes ~20 s on two CPU cores. The
GPU tests (tests/test_torch_gpu.py) compile with inductor.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

import cuflash.torch as ct  # noqa: E402
from cuflash import reference  # noqa: E402

from _tolerance import assert_close_at_scale  # noqa: E402

F64 = torch.float64


def randn(*shape, dtype=F64, requires_grad=False, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else hash(shape) % 2**31)
    t = torch.randn(*shape, dtype=dtype, generator=g)
    return t.requires_grad_(requires_grad)


def qkv(batch=2, heads=4, heads_kv=2, seqlen_q=5, seqlen_k=7, head_dim=8, layout="bhsd",
        dtype=F64, requires_grad=False):
    """q, k, v in layout "bhsd" (SDPA) or "bshd" (FlashAttention)."""
    def shape(h, n):
        return (batch, h, n, head_dim) if layout == "bhsd" else (batch, n, h, head_dim)

    return (randn(*shape(heads, seqlen_q), dtype=dtype, requires_grad=requires_grad, seed=1),
            randn(*shape(heads_kv, seqlen_k), dtype=dtype, requires_grad=requires_grad, seed=2),
            randn(*shape(heads_kv, seqlen_k), dtype=dtype, requires_grad=requires_grad, seed=3))


def np64(t):
    return t.detach().to(F64).numpy()


# ---------------------------------------------------------------------------------------
# Registration, opcheck, fake tensors


def test_operators_are_registered_with_their_schemas():
    fwd = torch.ops.cuflash.attention_fwd.default._schema
    bwd = torch.ops.cuflash.attention_bwd.default._schema
    assert [a.name for a in fwd.arguments][:9] == [
        "q", "k", "v", "bias", "mask", "alibi_slopes", "cu_seqlens_q", "cu_seqlens_k", "seed"]
    assert [a.name for a in bwd.arguments][:6] == ["dout", "q", "k", "v", "out", "lse"]
    assert len(fwd.returns) == 2 and len(bwd.returns) == 4
    assert not any(a.alias_info for a in list(fwd.arguments) + list(bwd.arguments))  # pure


def _opcheck_cases(dtype):
    """(args, kwargs) for attention_fwd covering each option family once."""
    q, k, v = qkv(dtype=dtype, requires_grad=True, layout="bshd")
    qb, kb, vb = qkv(dtype=dtype, requires_grad=True, layout="bhsd")
    bias = randn(4, 5, 7, dtype=dtype, requires_grad=True)
    mask = randn(5, 7) > -0.8
    cu_q, cu_k = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 4, 7], dtype=torch.int32)
    qv, kv, vv = (randn(n, h, 8, dtype=dtype, requires_grad=True) for n, h in ((5, 4), (7, 2), (7, 2)))
    # A model's q, k, v: head-transposed views of one fused (B, T, Hq + 2 Hkv, D) projection.
    fused = randn(2, 6, 8, 8, dtype=dtype, seed=4)
    qf, kf, vf = (fused[:, :, a:b].transpose(1, 2).requires_grad_() for a, b in ((0, 4), (4, 6), (6, 8)))
    # The FlashAttention layout given views of heads-first memory.
    qh, kh, vh = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
    # From its own generator: torch's global one is in whatever state earlier tests left it.
    slopes = torch.rand(4, dtype=F64, generator=torch.Generator().manual_seed(5))
    return {
        "causal_gqa": ((q, k, v), dict(causal=True)),
        "bias_mask_bhsd": ((qb, kb, vb), dict(bias=bias, mask=mask, layout="bhsd")),
        "softcap_alibi_window": ((q, k, v), dict(softcap=2.0, alibi_slopes=slopes, window_left=2, window_right=1,
                                                 softmax_scale=0.3)),
        "dropout": ((q, k, v), dict(dropout_p=0.25, seed=torch.tensor(1234))),
        "varlen": ((qv, kv, vv), dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=3,
                                      max_seqlen_k=4, causal=True)),
        "fused_qkv_views_bhsd": ((qf, kf, vf), dict(causal=True, layout="bhsd")),
        "heads_first_memory_bshd": ((qh, kh, vh), dict(softcap=2.0)),
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", ["causal_gqa", "bias_mask_bhsd", "softcap_alibi_window", "dropout", "varlen",
                                  "fused_qkv_views_bhsd", "heads_first_memory_bshd"])
def test_opcheck_forward(dtype, case):
    args, kwargs = _opcheck_cases(dtype)[case]
    torch.library.opcheck(torch.ops.cuflash.attention_fwd.default, args, kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", ["causal_gqa", "bias_mask_bhsd", "varlen", "fused_qkv_views_bhsd",
                                  "heads_first_memory_bshd"])
def test_opcheck_backward(dtype, case):
    args, kwargs = _opcheck_cases(dtype)[case]
    args = tuple(a.detach() for a in args)
    kwargs = {n: a.detach() if isinstance(a, torch.Tensor) else a for n, a in kwargs.items()}
    out, lse = torch.ops.cuflash.attention_fwd(*args, **kwargs)
    dout = randn(*out.shape, dtype=dtype)
    torch.library.opcheck(torch.ops.cuflash.attention_bwd.default, (dout, *args, out, lse), kwargs)


@pytest.mark.parametrize("dtype, lse_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                              (torch.bfloat16, torch.float32)])
def test_fake_outputs_match_real_outputs(dtype, lse_dtype):
    """out like q; lse (B, H, Nq) in either layout, (H, total_q) for varlen; lse float64
    only for float64 host inputs. Checked against real calls and under FakeTensorMode."""
    cases = _opcheck_cases(torch.float64)
    for args, kwargs in cases.values():
        args = tuple(a.detach().to(dtype) for a in args)
        kwargs = {n: a.detach().to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and n == "bias"
                  else a for n, a in kwargs.items()}
        out, lse = torch.ops.cuflash.attention_fwd(*args, **kwargs)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = tuple(mode.from_tensor(a) for a in args)
            fake_out, fake_lse = torch.ops.cuflash.attention_fwd(*fake_args, **kwargs)
        for real, fake in ((out, fake_out), (lse, fake_lse)):
            assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride())
        assert out.shape == args[0].shape and out.dtype == dtype and lse.dtype == lse_dtype
        dout = torch.ones_like(out)
        grads = torch.ops.cuflash.attention_bwd(dout, *args, out, lse, **kwargs)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = [mode.from_tensor(a) for a in (dout, *args, out, lse)]
            fake_grads = torch.ops.cuflash.attention_bwd(*fake, **kwargs)
        for real, fake in zip(grads, fake_grads):
            assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride())


def test_meta_tensors_give_shapes_without_computing():
    q = torch.empty(3, 11, 6, 64, device="meta", dtype=torch.bfloat16)
    k = v = torch.empty(3, 13, 2, 64, device="meta", dtype=torch.bfloat16)
    out, lse = torch.ops.cuflash.attention_fwd(q, k, v, causal=True)
    assert (out.shape, out.dtype, out.device.type) == (q.shape, torch.bfloat16, "meta")
    assert (lse.shape, lse.dtype) == ((3, 6, 11), torch.float32)
    out, lse = torch.ops.cuflash.attention_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="bhsd")
    assert lse.shape == (3, 6, 11)
    qv, kv = torch.empty(20, 6, 64, device="meta"), torch.empty(30, 2, 64, device="meta")
    cu = torch.empty(4, dtype=torch.int32, device="meta")
    _, lse = torch.ops.cuflash.attention_fwd(qv, kv, kv, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                             max_seqlen_q=9, max_seqlen_k=12)
    assert lse.shape == (6, 20)


# ---------------------------------------------------------------------------------------
# Gradients (float64 finite differences) through the drop-ins


def test_gradcheck_flash_attn_func_causal_gqa_seqlen_q_below_seqlen_k():
    q, k, v = qkv(seqlen_q=4, seqlen_k=6, layout="bshd", requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: ct.flash_attn_func(q, k, v, causal=True), (q, k, v))


def test_gradcheck_flash_attn_func_softcap_alibi_window():
    q, k, v = qkv(heads=2, heads_kv=1, seqlen_q=6, seqlen_k=4, layout="bshd", requires_grad=True)
    slopes = torch.tensor([0.3, 0.7], dtype=F64)

    def f(q, k, v):
        return ct.flash_attn_func(q, k, v, softcap=1.5, alibi_slopes=slopes, window_size=(2, 1), causal=True)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_gradcheck_sdpa_gqa_with_float_mask_gets_a_bias_gradient():
    q, k, v = qkv(requires_grad=True)
    bias = randn(1, 4, 5, 1, requires_grad=True)  # broadcast over batch and keys

    def f(q, k, v, bias):
        return ct.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)

    assert torch.autograd.gradcheck(f, (q, k, v, bias))


def test_gradcheck_sdpa_bool_mask_and_is_causal():
    q, k, v = qkv(heads=2, heads_kv=2, seqlen_q=6, seqlen_k=5, requires_grad=True)
    mask = randn(2, 1, 6, 5) > -0.5
    mask[0, 0, 3] = False  # a fully masked row: zero output, zero gradient

    assert torch.autograd.gradcheck(lambda q, k, v: ct.scaled_dot_product_attention(q, k, v, attn_mask=mask), (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: ct.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v))


def test_gradcheck_flash_attn_varlen_func():
    cu_q, cu_k = torch.tensor([0, 3, 4, 7], dtype=torch.int32), torch.tensor([0, 2, 6, 9], dtype=torch.int32)
    q, k, v = (randn(n, h, 8, requires_grad=True) for n, h in ((7, 2), (9, 1), (9, 1)))

    def f(q, k, v):
        return ct.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 4, causal=True)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_dropout_backward_regenerates_the_forward_mask():
    """The seed drawn from torch's generator is saved for the backward: with the generator
    reset before every call, gradcheck sees one function, so forward and backward agree."""
    q, k, v = qkv(heads=2, heads_kv=1, seqlen_q=4, seqlen_k=6, requires_grad=True)

    def f(q, k, v):
        torch.manual_seed(7)
        return ct.scaled_dot_product_attention(q, k, v, dropout_p=0.3, enable_gqa=True)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_dropout_follows_torch_manual_seed():
    q, k, v = qkv()
    torch.manual_seed(0)
    a = ct.scaled_dot_product_attention(q, k, v, dropout_p=0.5, enable_gqa=True)
    torch.manual_seed(0)
    b = ct.scaled_dot_product_attention(q, k, v, dropout_p=0.5, enable_gqa=True)
    c = ct.scaled_dot_product_attention(q, k, v, dropout_p=0.5, enable_gqa=True)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_attention_with_explicit_seed_equals_reference_dropout():
    q, k, v = qkv(layout="bshd")
    seed = 2**63 + 12345  # above int64: crosses the operator as a signed int64
    out, lse = ct.attention(q, k, v, dropout_p=0.2, seed=seed, causal=True, return_lse=True)
    ref_out, ref_lse = reference.forward(np64(q), np64(k), np64(v), dropout_p=0.2, seed=seed, causal=True)
    np.testing.assert_allclose(out.numpy(), ref_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse.numpy(), ref_lse, rtol=1e-12, atol=1e-12)


def test_eager_calls_and_the_operators_give_the_same_values_and_gradients(monkeypatch):
    """Eager calls on plain tensors skip the operator dispatch (an autograd Function with
    the operators' bodies); forced through the operators they give the same bits."""
    q, k, v = qkv(layout="bshd", requires_grad=True)
    bias = randn(2, 4, 5, 7, requires_grad=True, seed=5)
    dout = randn(2, 5, 4, 8, seed=6)

    def run():
        out = ct.attention(q, k, v, bias=bias, causal=True, dropout_p=0.3, seed=11, softcap=2.0)
        return (out.detach(), *torch.autograd.grad(out, (q, k, v, bias), dout))

    eager_calls = []
    real = ct._EagerAttention.apply
    monkeypatch.setattr(ct._EagerAttention, "apply", lambda *a: eager_calls.append(1) or real(*a))
    eager = run()
    monkeypatch.setattr(ct, "_use_operators", lambda *tensors: True)
    operators = run()
    assert eager_calls == [1]
    for a, b in zip(eager, operators):
        assert torch.equal(a, b)


def test_fake_tensors_and_tensor_subclasses_take_the_operators():
    q, k, v = qkv(layout="bshd")
    assert not ct._use_operators(q, k, v, None)
    with FakeTensorMode() as mode:
        fq = mode.from_tensor(q)
        assert ct._use_operators(fq, fq, fq)
    assert ct._use_operators(q, torch.nn.Parameter(k), v)


def test_lse_carries_no_gradient():
    q, k, v = qkv(layout="bshd", requires_grad=True)
    out, lse, s_dmask = ct.flash_attn_func(q, k, v, return_attn_probs=True)
    assert out.requires_grad and not lse.requires_grad


# ---------------------------------------------------------------------------------------
# The SDPA drop-in equals torch.nn.functional.scaled_dot_product_attention


def _sdpa_cases():
    def bool_mask(*shape):
        return randn(*shape, seed=9) > -0.7

    return {
        "plain": (dict(seqlen_q=5, seqlen_k=7, heads_kv=4), {}),
        "scale": (dict(heads_kv=4), dict(scale=0.37)),
        "is_causal_q_shorter": (dict(seqlen_q=4, seqlen_k=9, heads_kv=4), dict(is_causal=True)),
        "is_causal_q_longer": (dict(seqlen_q=9, seqlen_k=4, heads_kv=4), dict(is_causal=True)),
        "bool_mask": (dict(heads_kv=4), dict(attn_mask=bool_mask(2, 1, 5, 7))),
        "bool_mask_fully_masked_row": (dict(heads_kv=4),
                                       dict(attn_mask=bool_mask(5, 7).index_fill(0, torch.tensor([2]), False))),
        "float_mask": (dict(heads_kv=4), dict(attn_mask=randn(2, 4, 5, 7, seed=10, requires_grad=True))),
        "float_mask_broadcast": (dict(heads_kv=4), dict(attn_mask=randn(5, 7, seed=11, requires_grad=True))),
        "enable_gqa": (dict(heads=6, heads_kv=2),
                       dict(enable_gqa=True, attn_mask=randn(1, 6, 1, 7, seed=12, requires_grad=True))),
        "enable_gqa_causal_scale": (dict(heads=4, heads_kv=1, seqlen_q=7, seqlen_k=5),
                                    dict(enable_gqa=True, is_causal=True, scale=2.0)),
    }


@pytest.mark.parametrize("case", list(_sdpa_cases()))
def test_sdpa_drop_in_equals_torch_sdpa_values_and_gradients(case):
    dims, kwargs = _sdpa_cases()[case]
    q, k, v = qkv(requires_grad=True, **dims)
    ours = ct.scaled_dot_product_attention(q, k, v, **kwargs)
    theirs = F.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    inputs = [q, k, v] + [t for t in kwargs.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    dout = randn(*ours.shape, seed=13)
    for a, b in zip(torch.autograd.grad(ours, inputs, dout), torch.autograd.grad(theirs, inputs, dout)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("shape_q, shape_k, mask_shape", [
    ((3, 4, 8), (3, 6, 8), (4, 6)),  # 3-D: dim -3 is the head dim
    ((4, 8), (6, 8), None),  # 2-D: one head
    ((2, 3, 2, 4, 8), (2, 3, 2, 6, 8), (3, 1, 4, 6)),  # several batch dims
])
def test_sdpa_drop_in_takes_torch_sdpa_shapes(shape_q, shape_k, mask_shape):
    q, k, v = randn(*shape_q, seed=1), randn(*shape_k, seed=2), randn(*shape_k, seed=3)
    mask = None if mask_shape is None else randn(*mask_shape, seed=4, requires_grad=True)
    ours, theirs = (f(q, k, v, attn_mask=mask)
                    for f in (ct.scaled_dot_product_attention, F.scaled_dot_product_attention))
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    if mask is not None:
        (g_ours,), (g_theirs,) = (torch.autograd.grad(o.sum(), [mask]) for o in (ours, theirs))
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-11, atol=1e-11)


def test_sdpa_drop_in_raises_like_torch():
    q, k, v = qkv(heads=4, heads_kv=2)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError, match="enable_gqa"):
        ct.scaled_dot_product_attention(q, k, v)
    # attn_mask with is_causal: PyTorch's documentation asserts against it and its math
    # backend raises (its CPU flash backend, chosen for some inputs, combines the two).
    q, k, v = qkv(heads_kv=4, requires_grad=True)
    mask = torch.ones(5, 7, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="is_causal"):
        ct.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)


# ---------------------------------------------------------------------------------------
# The FlashAttention-2 drop-ins equal cuflash.reference


def test_flash_attn_func_equals_reference_values_lse_and_gradients():
    q, k, v = qkv(seqlen_q=6, seqlen_k=9, layout="bshd", requires_grad=True)
    slopes = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]], dtype=F64)
    opts = dict(softmax_scale=0.4, causal=True, window_size=(3, 0), softcap=3.0)
    out, lse, s_dmask = ct.flash_attn_func(q, k, v, alibi_slopes=slopes, return_attn_probs=True, **opts)
    ref_out, ref_lse = reference.forward(np64(q), np64(k), np64(v), alibi_slopes=slopes.numpy(), **opts)
    np.testing.assert_allclose(out.detach().numpy(), ref_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse.numpy(), ref_lse, rtol=1e-12, atol=1e-12)
    assert lse.shape == (2, 4, 6) and s_dmask.shape == (0,) and s_dmask.dtype == q.dtype  # as FlashAttention-2
    dout = randn(*out.shape, seed=5)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = reference.backward(dout.numpy(), np64(q), np64(k), np64(v), ref_out, ref_lse,
                                   alibi_slopes=slopes.numpy(), **opts)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g.numpy(), r, rtol=1e-11, atol=1e-11)


def test_flash_attn_func_causal_is_bottom_right_aligned():
    q, k, v = qkv(seqlen_q=3, seqlen_k=8, layout="bshd")
    ours = ct.flash_attn_func(q, k, v, causal=True)
    # Bottom-right: query i sees keys j <= i + Nk - Nq, i.e. the mask tril(diagonal=Nk - Nq).
    allowed = torch.ones(3, 8, dtype=torch.bool).tril(diagonal=5)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2),
                                              v.repeat_interleave(2, 2).transpose(1, 2), attn_mask=allowed)
    torch.testing.assert_close(ours, expected.transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_flash_attn_func_float32_and_bfloat16_on_cpu():
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = qkv(layout="bshd", dtype=dtype)
        out, lse, _ = ct.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        ref_out, ref_lse = reference.forward(np64(q), np64(k), np64(v), causal=True)
        assert out.dtype == dtype and lse.dtype == torch.float32
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        np.testing.assert_allclose(np64(out), ref_out, rtol=tol, atol=tol)


def test_flash_attn_varlen_func_equals_reference():
    cu_q, cu_k = torch.tensor([0, 3, 3, 8], dtype=torch.int32), torch.tensor([0, 5, 7, 10], dtype=torch.int32)
    q, k, v = (randn(n, h, 16, requires_grad=True) for n, h in ((8, 4), (10, 2), (10, 2)))
    out, lse, _ = ct.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 5, causal=True, softcap=2.0,
                                             return_attn_probs=True)
    ref_out, ref_lse = reference.forward(np64(q), np64(k), np64(v), cu_seqlens_q=cu_q.numpy(),
                                         cu_seqlens_k=cu_k.numpy(), max_seqlen_q=5, max_seqlen_k=5,
                                         causal=True, softcap=2.0)
    np.testing.assert_allclose(out.detach().numpy(), ref_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse.numpy(), ref_lse, rtol=1e-12, atol=1e-12)
    assert lse.shape == (4, 8)


# ---------------------------------------------------------------------------------------
# Signatures: the same parameter names, defaults and kinds as the anchors


def _names_defaults_kinds(fn):
    return [(p.name, p.default, p.kind) for p in inspect.signature(fn).parameters.values()]


def test_sdpa_signature_equals_torch():
    """torch's SDPA is a builtin with no inspect.signature; its aten schema is the anchor."""
    schema = torch.ops.aten.scaled_dot_product_attention.default._schema
    P = inspect.Parameter
    expected = [(a.name, a.default_value if a.has_default_value() else P.empty,
                 P.KEYWORD_ONLY if a.kwarg_only else P.POSITIONAL_OR_KEYWORD) for a in schema.arguments]
    assert _names_defaults_kinds(ct.scaled_dot_product_attention) == expected
    assert F.scaled_dot_product_attention.__doc__.startswith(
        "scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,\n"
        "        is_causal=False, scale=None, enable_gqa=False)")


def _fa2_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                         softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """The anchor: flash_attn.flash_attn_interface.flash_attn_func (FlashAttention 2.6+)."""


def _fa2_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                alibi_slopes=None, deterministic=False, return_attn_probs=False,
                                block_table=None):
    """The anchor: flash_attn.flash_attn_interface.flash_attn_varlen_func (FlashAttention 2.6+)."""


@pytest.mark.parametrize("ours, anchor", [(ct.flash_attn_func, _fa2_flash_attn_func),
                                          (ct.flash_attn_varlen_func, _fa2_flash_attn_varlen_func)])
def test_flash_attn_signatures_equal_flash_attention_2(ours, anchor):
    assert _names_defaults_kinds(ours) == _names_defaults_kinds(anchor)


# ---------------------------------------------------------------------------------------
# torch.compile


class _TinyBlock(torch.nn.Module):
    """Pre-norm attention block calling both drop-ins (FlashAttention and SDPA layouts)."""

    def __init__(self, dim=32, heads=4, heads_kv=2):
        super().__init__()
        self.heads, self.heads_kv, self.head_dim = heads, heads_kv, dim // heads
        self.norm = torch.nn.LayerNorm(dim)
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * heads_kv * self.head_dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.bias = torch.nn.Parameter(torch.zeros(heads, 1, 1))

    def forward(self, x):
        B, T, C = x.shape
        h = self.norm(x)
        q = self.q(h).view(B, T, self.heads, self.head_dim)
        k, v = self.kv(h).view(B, T, 2, self.heads_kv, self.head_dim).unbind(2)
        y1 = ct.flash_attn_func(q, k, v, causal=True)
        y2 = ct.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=self.bias, enable_gqa=True).transpose(1, 2)
        return x + self.proj((y1 + y2).reshape(B, T, C))


def test_compile_fullgraph_has_no_graph_break_and_matches_eager():
    torch.manual_seed(0)
    block = _TinyBlock()
    x = torch.randn(2, 10, 32)
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1

    eager = block(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), list(block.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), list(block.parameters()))
    # float32 parameter gradients summed in another order by the compiled graph: compared
    # to the scale of each gradient, not entry by entry (an entry may cancel to 0).
    assert_close_at_scale(out.detach(), eager.detach(), 1e-6)
    for g, e in zip(grads, eager_grads):
        assert_close_at_scale(g, e, 1e-5)
    assert block.bias.grad is None and grads[-1].abs().sum() > 0  # the float-mask parameter learns


# ---------------------------------------------------------------------------------------
# What cannot be honoured says so, naming the argument


def test_unsupported_arguments_raise_not_implemented_naming_them():
    q, k, v = qkv(layout="bshd")
    with pytest.raises(NotImplementedError, match="return_attn_probs"):
        ct.flash_attn_func(q, k, v, dropout_p=0.1, return_attn_probs=True)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    qv, kv = randn(5, 4, 8), randn(5, 2, 8)
    with pytest.raises(NotImplementedError, match="return_attn_probs"):
        ct.flash_attn_varlen_func(qv, kv, kv, cu, cu, 5, 5, dropout_p=0.1, return_attn_probs=True)
    with pytest.raises(NotImplementedError, match="block_table"):
        ct.flash_attn_varlen_func(qv, kv, kv, cu, cu, 5, 5, block_table=torch.zeros(1, 1, dtype=torch.int32))
    qs, ks, vs = qkv(heads_kv=4)
    with pytest.raises(NotImplementedError, match="value head dim"):
        ct.scaled_dot_product_attention(qs, ks, vs[..., :4])


# ---------------------------------------------------------------------------------------
# One validation for every entry point: the core's rules, before any conversion

BAD_OPTIONS = [
    dict(causal="no"),
    dict(window_size=(-1.9, 0)),
    dict(window_size=(1, 2, 3)),
    dict(softmax_scale="a"),
    dict(softcap=-1.0),
    dict(dropout_p=1.0),
    dict(deterministic="yes"),
] + [dict(dropout_p=0.1, seed=seed) for seed in (-1, 1.7, 2**64, 2**65 + 5)]


def _core_reasons(options: dict) -> list[str]:
    import cuflash

    q, k, v = (t.numpy() for t in qkv(layout="bshd"))
    with pytest.raises(cuflash.ValidationError) as err:
        cuflash.attention(q, k, v, **options)
    return err.value.reasons


def _reasons(call) -> list[str]:
    import cuflash

    with pytest.raises(cuflash.ValidationError) as err:
        call()
    return err.value.reasons


@pytest.mark.parametrize("options", BAD_OPTIONS, ids=repr)
def test_every_entry_point_rejects_what_the_core_rejects_with_its_message(options):
    """Nothing is coerced before the core's rules judge it: causal="no" does not run
    causal, (-1.9, 0) is not an unbounded window, seeds outside [0, 2**64) do not wrap."""
    expected = _core_reasons(options)
    (name, value), = [(n, v) for n, v in options.items() if n != "dropout_p" or len(options) == 1]
    assert len(expected) == 1 and expected[0].startswith(f"{name}={value!r}"), expected
    q, k, v = qkv(layout="bshd", requires_grad=True)
    assert _reasons(lambda: ct.attention(q, k, v, **options)) == expected
    if "seed" not in options:  # FlashAttention-2's signature has no seed
        assert _reasons(lambda: ct.flash_attn_func(q, k, v, **options)) == expected
        cu = torch.tensor([0, 2, 5], dtype=torch.int32)
        qv, kv = q[0].detach(), k[0, :5].detach()
        assert _reasons(lambda: ct.flash_attn_varlen_func(qv, kv, kv, cu, cu, 3, 3, **options)) == expected
    sdpa_names = {"causal": "is_causal", "softmax_scale": "scale", "dropout_p": "dropout_p"}
    if name in sdpa_names:
        qs, ks, vs = qkv(layout="bhsd", heads_kv=4)
        renamed = sdpa_names[name] + expected[0][len(name):]
        assert _reasons(lambda: ct.scaled_dot_product_attention(qs, ks, vs, **{sdpa_names[name]: value})) == [renamed]


def test_numpy_scalars_and_fa2_defaults_keep_working():
    q, k, v = qkv(layout="bshd")
    plain = ct.attention(q, k, v, causal=True, softmax_scale=0.5, window_size=(3, 0), dropout_p=0.25, seed=9)
    numpy = ct.attention(q, k, v, causal=np.bool_(True), softmax_scale=np.float32(0.5),
                         window_size=[np.int64(3), np.int32(0)], dropout_p=np.float64(0.25), seed=np.uint64(9))
    torch.testing.assert_close(plain, numpy, rtol=0, atol=0)
    out = ct.flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False)
    ref, _ = reference.forward(q.numpy(), k.numpy(), v.numpy())
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-12)
    # A seed of 2**63 or more is a valid core seed; the int64 seed tensor carries its bits.
    big = 2**64 - 5
    out_big = ct.attention(q, k, v, dropout_p=0.3, seed=big)
    ref_big, _ = reference.forward(q.numpy(), k.numpy(), v.numpy(), dropout_p=0.3, seed=big)
    np.testing.assert_allclose(out_big.numpy(), ref_big, rtol=1e-12, atol=1e-12)


def test_inputs_without_a_unit_last_stride_are_rejected_as_the_core_rejects_them():
    import cuflash

    q, k, v = qkv(layout="bshd")
    strided = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, last stride 4
    expected = _reasons(lambda: cuflash.attention(strided, k, v))
    assert expected == [f"q must have a unit stride in its last dimension; got strides={strided.stride()}"]
    assert _reasons(lambda: ct.attention(strided, k, v)) == expected
    assert _reasons(lambda: ct.flash_attn_func(strided, k, v)) == expected
    qs, ks, vs = (t.transpose(1, 2) for t in (strided, k, v))  # (B, H, S, D) views
    expected = _reasons(lambda: cuflash.attention(qs, ks, vs, layout="bhsd"))
    assert _reasons(lambda: ct.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True)) == expected


def test_broadcast_operands_and_expanded_output_gradients_need_no_copy():
    """Scores operands may have any strides (a stride-0 bias row); the output gradient
    autograd hands the backward (an expanded ones tensor from .sum()) is autograd's own and
    is made row-contiguous for the kernels."""
    q, k, v = qkv(layout="bshd", requires_grad=True)
    row = randn(7, seed=5)
    bias = row.expand(5, 7)  # strides (0, 1)
    mask = torch.tensor([True] * 6 + [False]).expand(5, 7)
    col_bias = randn(5, 1, seed=6).expand(5, 7)  # strides (1, 0): last stride 0
    out = ct.attention(q, k, v, bias=bias + col_bias, mask=mask)
    out.sum().backward()
    ref_out, ref_lse = reference.forward(*(np64(t) for t in (q, k, v)), bias=np64(bias + col_bias),
                                         mask=mask.numpy())
    np.testing.assert_allclose(np64(out), ref_out, rtol=1e-12, atol=1e-12)
    dq = reference.backward(np.ones_like(ref_out), *(np64(t) for t in (q, k, v)), ref_out, ref_lse,
                            bias=np64(bias + col_bias), mask=mask.numpy())[0]
    np.testing.assert_allclose(np64(q.grad), dq, rtol=1e-11, atol=1e-11)
    ct.attention(q, k, v, bias=col_bias)  # stride 0 in the last dimension: accepted as given


def test_meta_tensors_through_the_adapters_give_meta_outputs():
    q = torch.empty(3, 11, 6, 64, device="meta")
    k = v = torch.empty(3, 13, 2, 64, device="meta")
    out = ct.flash_attn_func(q, k, v, causal=True)
    assert (out.shape, out.device.type) == (q.shape, "meta")
    out, lse = ct.attention(q, k, v, return_lse=True)
    assert (out.device.type, lse.shape) == ("meta", (3, 6, 11))


def test_sdpa_int_attn_mask_is_reported_as_attn_mask():
    qs, ks, vs = qkv(heads_kv=4)
    reasons = _reasons(lambda: ct.scaled_dot_product_attention(qs, ks, vs, attn_mask=torch.ones(5, 7, dtype=torch.int64)))
    assert reasons == ["attn_mask.dtype=torch.int64 must be bool (True = may attend) or floating (added to the scores)"]


@pytest.mark.parametrize("name", ["attention", "flash_attn_func", "scaled_dot_product_attention"])
def test_unknown_keywords_list_the_valid_ones(name):
    q, k, v = qkv(heads_kv=4)
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) \['causall'\]") as err:
        getattr(ct, name)(q, k, v, causall=True)
    text = str(err.value)
    assert text.startswith(f"cuflash.torch.{name}()") and "'dropout_p'" in text, text
