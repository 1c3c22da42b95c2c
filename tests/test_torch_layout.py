"""Memory layouts through cuflash.torch: no layout copies around the operators.

The promises: given q, k, v in one layout whose memory is in the other (a model's
head-transposed views of a fused (B, T, 3, H, D) projection, passed as "bhsd"), the
operators return out and dq, dk, dv as views of memory in q's memory order, as SDPA
returns them, so the model's `out.transpose(1, 2).reshape(B, T, C)` and the gradient of
the projection need no copy; their fakes promise exactly those strides; and a compiled
transformer block's forward and backward graphs hold no clone or copy that SDPA's graph
of the same block does not hold. (CPU, the float64 reference path; torch.compile with
backend "aot_eager", which builds the same AOTAutograd graphs inductor lowers.)
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from functorch.compile import make_boxed_func  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

import cuflash.torch as ct  # noqa: E402

B, T, H, D = 2, 9, 4, 8
C = H * D


def fused_views(dtype=torch.float64, requires_grad=True):
    """q, k, v as a GPT takes them: (B, H, T, D) views of one (B, T, 3C) projection."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, T, 3 * C, dtype=dtype, generator=g).requires_grad_(requires_grad)
    q, k, v = qkv.split(C, dim=2)
    return qkv, [t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v)]


def seq_major(t: torch.Tensor) -> bool:
    """Whether a (B, H, T, D) tensor is a transposed view of dense (B, T, H, D) memory."""
    return t.transpose(1, 2).is_contiguous()


def test_outputs_and_gradients_of_fused_views_are_seq_major_views():
    qkv, (q, k, v) = fused_views()
    out = ct.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert seq_major(out)
    merged = out.transpose(1, 2).reshape(B, T, C)
    assert merged.data_ptr() == out.data_ptr()  # the reshape is a view: no copy
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(seq_major(g) for g in (dq, dk, dv))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_the_operators_give_the_strides_their_fakes_promise():
    _, (q, k, v) = fused_views(requires_grad=False)
    out, lse = torch.ops.cuflash.attention_fwd(q, k, v, causal=True, layout="bhsd")
    grads = torch.ops.cuflash.attention_bwd(torch.ones_like(out), q, k, v, out, lse, causal=True, layout="bhsd")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fout, flse = torch.ops.cuflash.attention_fwd(fq, fk, fv, causal=True, layout="bhsd")
        fgrads = torch.ops.cuflash.attention_bwd(mode.from_tensor(torch.ones_like(out)), fq, fk, fv, fout, flse,
                                                 causal=True, layout="bhsd")
    for real, fake in zip((out, lse, *grads[:3]), (fout, flse, *fgrads[:3])):
        assert (real.shape, real.stride()) == (fake.shape, fake.stride())
    assert seq_major(out) and all(seq_major(g) for g in grads[:3])


def test_a_single_position_or_head_keeps_the_given_layout():
    """Where the sequence and head strides cannot order the memory (one position or one
    head), the operators keep the caller's layout and give contiguous outputs."""
    for shape in ((B, 1, 1, D), (B, H, 1, D), (B, 1, T, D)):
        q = torch.randn(shape, dtype=torch.float64)
        out, _ = torch.ops.cuflash.attention_fwd(q, q, q, layout="bhsd")
        assert out.is_contiguous()


class _Block(nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.attention = attention
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)

    def forward(self, x):
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        y = self.attention(q, k, v, is_causal=True)
        return x + self.proj(y.transpose(1, 2).reshape(B, T, C))


_COPIES = ("clone", "copy", "contiguous", "cat", "as_strided", "index_put")


def _copy_ops(attention) -> tuple[list[str], list[str]]:
    """The copy-like operators in the compiled block's forward and backward graphs."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm)

    torch._dynamo.reset()
    torch.manual_seed(0)
    block = _Block(attention)
    compiled = torch.compile(block, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)
    x = torch.randn(B, T, C, requires_grad=True)
    compiled(x).square().sum().backward()
    assert len(graphs) == 2
    return tuple(
        sorted(str(n.target) for n in gm.graph.nodes if n.op == "call_function" and any(c in str(n.target) for c in _COPIES))
        for gm in graphs
    )


def test_compiled_block_has_no_copy_that_sdpa_graph_has_not():
    cuflash_fwd, cuflash_bwd = _copy_ops(ct.scaled_dot_product_attention)
    sdpa_fwd, sdpa_bwd = _copy_ops(F.scaled_dot_product_attention)
    assert cuflash_fwd == sdpa_fwd == []
    # The backward concatenates dq, dk, dv into the fused projection's gradient, in both.
    assert cuflash_bwd == sdpa_bwd == ["aten.cat.default"]


@pytest.mark.gpu
def test_gpu_inductor_block_has_no_copy_kernel_that_sdpa_has_not():
    """On a GPU, inductor's generated code for the block: every kernel that clones or
    copies in cuflash's code has a same-named twin in SDPA's (the backward's cat), and the
    outputs equal SDPA's."""
    import re

    from torch._inductor.utils import run_and_get_code

    def kernels(attention):
        torch._dynamo.reset()
        torch.manual_seed(0)
        block = _Block(attention).cuda().to(torch.bfloat16)
        compiled = torch.compile(block, fullgraph=True)
        x = torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)

        def step():
            y = compiled(x)
            y.float().square().sum().backward()
            return y.detach(), x.grad.detach()

        result, codes = run_and_get_code(step)
        names = {re.sub(r"_\d+$", "", n) for code in codes for n in re.findall(r"\b(triton_\w+) = ", code)}
        return {n for n in names if re.search(r"clone|copy|contiguous|cat", n)}, result

    ours, (y, dx) = kernels(ct.scaled_dot_product_attention)
    theirs, (y_ref, dx_ref) = kernels(F.scaled_dot_product_attention)
    assert ours <= theirs, f"copy kernels only cuflash's graph has: {sorted(ours - theirs)}"
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dx, dx_ref, rtol=5e-2, atol=5e-2)


def test_planned_calls_use_the_signature_the_full_path_stores(monkeypatch):
    """cuflash.torch's repeat calls look plans up through cuflash._api.planned: its key
    must be the one the full path (cuflash.forward / backward) stores the plan under for
    the same call, or every call would take the full path."""
    from cuflash import _fast

    keys = []
    monkeypatch.setattr(_fast, "signature", lambda kind, arrays, scalars, seed: keys.append((kind, scalars)) or None)
    _, (q, k, v) = fused_views(requires_grad=False)
    out, lse = torch.ops.cuflash.attention_fwd(q, k, v, softmax_scale=0.5, causal=True, causal_alignment="top_left",
                                               window_left=3, window_right=0, softcap=2.0, layout="bhsd")
    torch.ops.cuflash.attention_bwd(torch.ones_like(out), q, k, v, out, lse, softmax_scale=0.5, causal=True,
                                    causal_alignment="top_left", window_left=3, window_right=0, softcap=2.0,
                                    layout="bhsd", compute_dbias=False)
    # Each call: planned's lookup first, then the full path's key for the plan it makes.
    assert [kind for kind, _ in keys] == ["forward", "forward", "backward", "backward"]
    assert keys[0] == keys[1] and keys[2] == keys[3]
    assert tuple(map(type, keys[0][1])) == tuple(map(type, keys[1][1]))


@pytest.mark.gpu
def test_gpu_repeat_calls_of_fused_views_take_the_plan_and_give_the_same_bits(full_path_calls):
    """A training loop's calls: the first forward and backward of a signature take the
    full path, the rest the plan cache, with the same bits, outputs and gradients laid out
    like the inputs."""
    from cuflash import _fast

    _fast.clear()
    g = torch.Generator(device="cuda").manual_seed(5)
    results = []
    for step in range(3):
        qkv = torch.randn(2, 96, 3 * 4 * 64, device="cuda", dtype=torch.bfloat16, generator=g)
        if step == 2:
            qkv = results[0][0]  # the first step's inputs again
        q, k, v = (t.view(2, 96, 4, 64).transpose(1, 2).requires_grad_() for t in qkv.detach().split(256, dim=2))
        out = ct.scaled_dot_product_attention(q, k, v, is_causal=True)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        assert seq_major(out) and all(seq_major(t) for t in (dq, dk, dv))
        results.append((qkv, out, dq, dk, dv))
    assert full_path_calls == ["cuflash.forward", "cuflash.backward"]
    for a, b in zip(results[0][1:], results[2][1:]):
        assert torch.equal(a, b)
