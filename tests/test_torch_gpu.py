"""cuflash.torch on a CUDA GPU: the kernels behind the PyTorch operators.

The promises: the operators pass torch.library.opcheck on bf16/fp16 CUDA tensors;
torch.compile(fullgraph=True) (inductor) compiles a transformer block using them with no
graph break and matches eager; they run inside CUDA-graph capture and replay with new
inputs; they run on PyTorch's current stream, not the default one; and the SDPA drop-in is
as accurate as torch's own SDPA in bf16 (values and gradients, a float attn_mask's
included), each measured against a float64 reference: cuflash's error <= 2 x SDPA's + a
small floor, the FlashAttention test suite's criterion.

Every test here carries the `gpu` marker (skipped, with a reason, without a GPU). Shapes
are small and use head dims 64 and 128 only, to keep the kernel variants compiled few.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import cuflash.torch as ct  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU visible to PyTorch"),
]

BF16 = torch.bfloat16


def cuda_randn(*shape, dtype=BF16, requires_grad=False, seed=0, scale=1.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = torch.randn(*shape, device="cuda", dtype=torch.float32, generator=g) * scale
    return t.to(dtype).requires_grad_(requires_grad)


def max_err(x, ref):
    return (x.double() - ref).abs().max().item()


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------
# opcheck


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_opcheck_on_cuda(dtype):
    q = cuda_randn(2, 64, 4, 64, dtype=dtype, requires_grad=True, seed=1)
    k = cuda_randn(2, 80, 2, 64, dtype=dtype, requires_grad=True, seed=2)
    v = cuda_randn(2, 80, 2, 64, dtype=dtype, requires_grad=True, seed=3)
    # deterministic=True: opcheck compares repeated runs, and atomic dq accumulation
    # changes the summation order between runs.
    opts = dict(causal=True, deterministic=True)
    torch.library.opcheck(torch.ops.cuflash.attention_fwd.default, (q, k, v), opts)
    out, lse = torch.ops.cuflash.attention_fwd(q.detach(), k.detach(), v.detach(), **opts)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (2, 4, 64)
    dout = cuda_randn(*out.shape, dtype=dtype, seed=4)
    torch.library.opcheck(torch.ops.cuflash.attention_bwd.default,
                          (dout, q.detach(), k.detach(), v.detach(), out, lse), opts)


# ---------------------------------------------------------------------------------------
# torch.compile


class Block(torch.nn.Module):
    """A pre-norm transformer block (GQA attention + MLP) with cuflash attention."""

    def __init__(self, dim=256, heads=4, heads_kv=2):
        super().__init__()
        self.heads, self.heads_kv, self.head_dim = heads, heads_kv, dim // heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.q = torch.nn.Linear(dim, dim, bias=False)
        self.kv = torch.nn.Linear(dim, 2 * heads_kv * self.head_dim, bias=False)
        self.proj = torch.nn.Linear(dim, dim, bias=False)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x):
        B, T, C = x.shape
        h = self.norm1(x)
        q = self.q(h).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(B, T, 2, self.heads_kv, self.head_dim).permute(2, 0, 3, 1, 4)
        y = ct.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.norm2(x))


def test_compile_fullgraph_transformer_block_no_graph_breaks_matches_eager():
    torch.manual_seed(0)
    block = Block().cuda().to(BF16)
    x = cuda_randn(4, 128, 256, seed=5)

    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    params = list(block.parameters())
    eager = block(x)
    eager_grads = torch.autograd.grad(eager.float().square().mean(), params)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)  # inductor
    out = compiled(x)
    grads = torch.autograd.grad(out.float().square().mean(), params)
    assert rel_err(out, eager) < 1e-2
    for g, e in zip(grads, eager_grads):
        assert rel_err(g, e) < 3e-2


# ---------------------------------------------------------------------------------------
# CUDA graphs and streams


def _fresh_leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def test_cuda_graph_capture_and_replay_forward_and_backward():
    shape_q, shape_kv = (2, 128, 4, 64), (2, 128, 2, 64)
    q, k, v = _fresh_leaves(*(cuda_randn(*s, seed=i) for i, s in enumerate((shape_q, shape_kv, shape_kv))))
    dout = cuda_randn(*shape_q, seed=9)

    def step():
        out = ct.flash_attn_func(q, k, v, causal=True)
        out.backward(dout)
        return out

    # Warm up on a side stream (compiles and loads the kernels before capture).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    for t in (q, k, v):
        t.grad = None
    with torch.cuda.graph(graph):
        static_out = step()

    new = [cuda_randn(*s, seed=20 + i) for i, s in enumerate((shape_q, shape_kv, shape_kv))]
    with torch.no_grad():
        for t, n in zip((q, k, v), new):
            t.copy_(n)
    graph.replay()
    torch.cuda.synchronize()

    eq, ek, ev = _fresh_leaves(*new)
    expected = ct.flash_attn_func(eq, ek, ev, causal=True)
    expected.backward(dout)
    assert torch.equal(static_out, expected)  # the forward is deterministic
    for got, want in ((q.grad, eq.grad), (k.grad, ek.grad), (v.grad, ev.grad)):
        assert rel_err(got, want) < 1e-2  # dq accumulates atomically: order may differ


def test_runs_on_the_current_non_default_stream():
    """Inputs are produced on a side stream behind a ~50 ms spin; an attention launched on
    any other stream would read them before they are written."""
    q0, k0, v0 = (cuda_randn(2, 256, 4, 64, seed=i) for i in range(3))
    dout0 = cuda_randn(2, 256, 4, 64, seed=3)
    eq, ek, ev = _fresh_leaves(q0, k0, v0)
    expected = ct.flash_attn_func(eq, ek, ev, causal=True)
    expected.backward(dout0)
    torch.cuda.synchronize()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        q, k, v = _fresh_leaves(q0 * 1, k0 * 1, v0 * 1)
        out = ct.flash_attn_func(q, k, v, causal=True)
        torch.cuda._sleep(100_000_000)
        out.backward(dout0 * 1)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(out, expected)
    for got, want in ((q.grad, eq.grad), (k.grad, ek.grad), (v.grad, ev.grad)):
        assert rel_err(got, want) < 1e-2


def test_eager_calls_and_the_operators_agree_on_the_gpu(monkeypatch):
    """The eager path (an autograd Function) and the custom operators run the same kernels:
    the same bits for values and gradients, a bias gradient included (deterministic)."""
    q, k, v = (cuda_randn(2, 100, 4, 64, seed=i, requires_grad=True) for i in range(3))
    bias = cuda_randn(2, 4, 100, 100, seed=3, requires_grad=True)
    dout = cuda_randn(2, 100, 4, 64, seed=4)

    def run():
        out = ct.attention(q, k, v, bias=bias, causal=True, deterministic=True)
        return (out.detach(), *torch.autograd.grad(out, (q, k, v, bias), dout))

    eager = run()
    monkeypatch.setattr(ct, "_use_operators", lambda *tensors: True)
    operators = run()
    for a, b in zip(eager, operators):
        assert torch.equal(a, b)


def test_repeat_calls_take_the_plan_with_the_full_paths_bits(full_path_calls):
    """After the first call of a signature, calls skip import and validation; on fresh
    tensors (one a strided view, one with an odd storage offset) they give the full
    path's bits."""
    import cuflash
    from cuflash import _fast

    _fast.clear()
    wide = cuda_randn(2, 96, 4, 65, seed=30)
    inputs = [
        [cuda_randn(2, 96, 4, 64, seed=10 * i + j) for j in range(4)] for i in range(2)
    ] + [[wide[..., 1:], *(cuda_randn(2, 96, 4, 64, seed=40 + j) for j in range(3))]]
    inputs[2][1] = inputs[2][1].transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, S, D) memory
    inputs[1][2] = torch.empty(2 * 96 * 4 * 64 + 1, dtype=BF16, device="cuda")[1:].view(2, 96, 4, 64).copy_(inputs[1][2])
    signatures = {tuple((t.shape, t.stride()) for t in ts) for ts in inputs}
    got = []
    for q, k, v, dout in inputs:
        out, lse = cuflash.forward(q, k, v, causal=True, deterministic=True)
        got.append((out, lse, *cuflash.backward(dout, q, k, v, out, lse, causal=True, deterministic=True)))
    # The warp-specialised Hopper forward reads its inputs through TMA, which needs 16-byte
    # aligned pointers: its plan sends the odd-offset call back to the full path (which
    # plans the cp.async kernel for it). Every other repeat call takes its plan.
    from cuflash import _build, _tiles

    tma_forward = _tiles.FWD_FAMILY == "ws" and _build.arch_of(0) == "sm_90"
    assert len(full_path_calls) == 2 * len(signatures) + int(tma_forward) < 2 * len(inputs)
    for (q, k, v, dout), results in zip(inputs, got):
        _fast.clear()
        out, lse = cuflash.forward(q, k, v, causal=True, deterministic=True)
        _fast.clear()
        want = (out, lse, *cuflash.backward(dout, q, k, v, out, lse, causal=True, deterministic=True))
        for a, b in zip(results, want):
            assert torch.equal(a, b) and type(a) is torch.Tensor


# ---------------------------------------------------------------------------------------
# The SDPA drop-in against torch's SDPA, both measured against float64


def _sdpa_case(name):
    B, H, Hkv, Nq, Nk, D = 2, 8, 8, 256, 256, 64
    kwargs, bias_shape = {}, None
    if name == "causal":
        kwargs = dict(is_causal=True)
    elif name == "causal_seqlen_q_below_seqlen_k":
        Nq, Nk, kwargs = 128, 320, dict(is_causal=True)
    elif name == "bool_mask":
        g = torch.Generator(device="cuda").manual_seed(7)
        mask = torch.rand(B, 1, Nq, Nk, device="cuda", generator=g) < 0.8
        mask |= torch.eye(Nq, Nk, dtype=torch.bool, device="cuda")  # no fully masked row
        kwargs = dict(attn_mask=mask)
    elif name == "float_mask_grad":
        bias_shape = (B, H, Nq, Nk)
    elif name == "float_mask_broadcast_grad":
        bias_shape = (1, H, 1, Nk)
    elif name == "gqa_scale_head_dim_128":
        H, Hkv, D, kwargs = 8, 2, 128, dict(enable_gqa=True, scale=0.05)
    q = cuda_randn(B, H, Nq, D, seed=1, requires_grad=True)
    k = cuda_randn(B, Hkv, Nk, D, seed=2, requires_grad=True)
    v = cuda_randn(B, Hkv, Nk, D, seed=3, requires_grad=True)
    leaves = [q, k, v]
    if bias_shape is not None:
        bias = cuda_randn(*bias_shape, seed=4, requires_grad=True)
        kwargs, leaves = dict(attn_mask=bias), leaves + [bias]
    return q, k, v, kwargs, leaves


def _run(fn, leaves, q, k, v, kwargs, dout):
    out = fn(q, k, v, **kwargs)
    return [out] + list(torch.autograd.grad(out, leaves, dout))


@pytest.mark.parametrize("name", ["causal", "causal_seqlen_q_below_seqlen_k", "bool_mask", "float_mask_grad",
                                  "float_mask_broadcast_grad", "gqa_scale_head_dim_128"])
def test_sdpa_drop_in_as_accurate_as_torch_sdpa_in_bf16(name):
    q, k, v, kwargs, leaves = _sdpa_case(name)
    dout = cuda_randn(*q.shape, seed=8)
    ours = _run(ct.scaled_dot_product_attention, leaves, q, k, v, kwargs, dout)
    theirs = _run(F.scaled_dot_product_attention, leaves, q, k, v, kwargs, dout)

    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    q64, k64, v64 = leaves64[:3]
    kwargs64 = dict(kwargs)
    if "attn_mask" in kwargs and kwargs["attn_mask"].is_floating_point():
        kwargs64["attn_mask"] = leaves64[3]
    reference = _run(F.scaled_dot_product_attention, leaves64, q64, k64, v64, kwargs64, dout.double())

    names = ["out", "dq", "dk", "dv", "dbias"]
    for what, a, b, ref in zip(names, ours, theirs, reference):
        assert a.shape == ref.shape and a.dtype == b.dtype
        floor = 1e-3 * ref.abs().max().item()
        err_ours, err_torch = max_err(a, ref), max_err(b, ref)
        assert err_ours <= 2 * err_torch + floor, f"{what}: cuflash {err_ours:.3g} vs torch {err_torch:.3g}"
    if "attn_mask" in kwargs and kwargs["attn_mask"].is_floating_point():
        dbias = ours[4]
        assert dbias.shape == kwargs["attn_mask"].shape and dbias.abs().sum() > 0
        assert rel_err(dbias, reference[4]) < 2e-2
