"""Block masks through the PyTorch and JAX adapters: boolean blocks and compact lists,
eager, torch.compile(fullgraph=True), jax.jit / grad / vmap, against the float64 reference
given the same block mask. The CPU tests run the references; the `gpu` ones the kernels."""

from __future__ import annotations

import numpy as np
import pytest

from cuflash import block_sparse, reference

SIZE = (64, 128)


def _problem(seed=0, batch=2, nq=200, nk=300, heads=4, heads_kv=2, d=32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, nq, heads, d))
    k = rng.standard_normal((batch, nk, heads_kv, d))
    v = rng.standard_normal((batch, nk, heads_kv, d))
    blocks = rng.random((batch, heads, block_sparse.num_blocks(nq, SIZE[0]), block_sparse.num_blocks(nk, SIZE[1]))) < 0.5
    blocks[:, :, 1, :] = False  # a query block with no key
    return q, k, v, blocks


def _reference(q, k, v, blocks, **opts):
    out, lse = reference.forward(q, k, v, block_mask=blocks, block_size=SIZE, **opts)
    dout = np.ones_like(out)
    return out, reference.backward(dout, q, k, v, out, lse, block_mask=blocks, block_size=SIZE, **opts)


# ---- PyTorch ----------------------------------------------------------------------------------


def _torch_case(device: str, dtype, compact: bool, compiled: bool, causal: bool):
    import torch

    import cuflash.torch as ct

    q, k, v, blocks = _problem()
    tq, tk, tv = (torch.tensor(a, dtype=dtype, device=device, requires_grad=True) for a in (q, k, v))
    # The reference sees the inputs as rounded to the tested dtype.
    ref_out, ref_grads = _reference(*(t.detach().double().cpu().numpy() for t in (tq, tk, tv)), blocks, causal=causal)
    tb = torch.tensor(blocks, device=device)
    mask = block_sparse.compact(tb, SIZE) if compact else tb

    def run(q_, k_, v_, m_):
        if compact:
            return ct.attention(q_, k_, v_, block_mask=m_, causal=causal)
        return ct.attention(q_, k_, v_, block_mask=m_, block_size=SIZE, causal=causal)

    fn = torch.compile(run, fullgraph=True) if compiled else run
    out = fn(tq, tk, tv, mask)
    out.sum().backward()
    return out, (tq.grad, tk.grad, tv.grad), ref_out, ref_grads


@pytest.mark.parametrize("compact", [False, True], ids=["bool", "compact"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_torch_attention_with_a_block_mask_matches_the_reference(compact, compiled):
    import torch

    out, grads, ref_out, ref_grads = _torch_case("cpu", torch.float64, compact, compiled, causal=True)
    np.testing.assert_allclose(out.detach().numpy(), ref_out, rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g.numpy(), r, rtol=1e-10, atol=1e-12)


def test_torch_block_mask_operators_pass_opcheck():
    import torch

    from cuflash import torch as ct  # noqa: F401  (registers the operators)

    q, k, v, blocks = _problem(batch=1, nq=70, nk=130, heads=2, heads_kv=1, d=16)
    c = block_sparse.compact(torch.tensor(blocks), SIZE)
    args = (torch.tensor(q, requires_grad=True), torch.tensor(k, requires_grad=True), torch.tensor(v, requires_grad=True))
    kwargs = dict(block_kv_count=c.kv_count, block_kv_index=c.kv_index, block_q_count=c.q_count,
                  block_q_index=c.q_index, block_q=SIZE[0], block_k=SIZE[1])
    torch.library.opcheck(torch.ops.cuflash.attention_fwd.default, args, kwargs)


def test_torch_block_size_without_mask_is_named():
    import torch

    import cuflash.torch as ct

    q, k, v, _ = _problem(batch=1)
    with pytest.raises(ValueError, match=r"block_size=\(64, 128\) is given without a block_mask"):
        ct.attention(torch.tensor(q), torch.tensor(k), torch.tensor(v), block_size=SIZE)


def test_torch_bad_boolean_block_mask_is_a_validation_error():
    """The adapter compacts a boolean block mask itself; what compact refuses reaches the
    caller as the cuflash.ValidationError every entry point raises, naming the value."""
    import torch

    import cuflash
    import cuflash.torch as ct

    q, k, v, blocks = _problem(batch=1)
    args = (torch.tensor(q), torch.tensor(k), torch.tensor(v))
    with pytest.raises(cuflash.ValidationError, match=r"block_mask.dtype=torch.int32 must be bool"):
        ct.attention(*args, block_mask=torch.tensor(blocks[:1]).to(torch.int32), block_size=SIZE)
    with pytest.raises(cuflash.ValidationError, match=r"block_size=\(100, 128\)"):
        ct.attention(*args, block_mask=torch.tensor(blocks[:1]), block_size=(100, 128))


# ---- JAX ------------------------------------------------------------------------------------


def _jax_run(compact: bool, jit: bool, dtype):
    import jax
    import jax.numpy as jnp

    import cuflash.jax as cj

    q, k, v, blocks = _problem(seed=1)
    ref_out, ref_grads = _reference(q, k, v, blocks, window_size=(150, 20))
    jq, jk, jv = (jnp.asarray(a, dtype=dtype) for a in (q, k, v))
    mask = block_sparse.compact(jnp.asarray(blocks), SIZE) if compact else jnp.asarray(blocks)
    extra = {} if compact else {"block_size": SIZE}

    def loss(q_, k_, v_, m_):
        return cj.attention(q_, k_, v_, block_mask=m_, window_size=(150, 20), **extra).astype(jnp.float32).sum()

    grad = jax.grad(loss, argnums=(0, 1, 2))
    if jit:
        grad = jax.jit(grad)
    grads = grad(jq, jk, jv, mask)
    out = cj.attention(jq, jk, jv, block_mask=mask, window_size=(150, 20), **extra)
    return out, grads, ref_out, ref_grads


@pytest.mark.parametrize("compact", [False, True], ids=["bool", "compact"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_jax_attention_with_a_block_mask_matches_the_reference(compact, jit):
    import jax.numpy as jnp

    out, grads, ref_out, ref_grads = _jax_run(compact, jit, jnp.float32)
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=2e-5, atol=2e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), r, rtol=2e-4, atol=2e-4)


def test_jax_vmap_over_a_shared_compact_block_mask():
    import jax
    import jax.numpy as jnp

    import cuflash.jax as cj

    q, k, v, blocks = _problem(seed=2, batch=1)
    c = block_sparse.compact(jnp.asarray(blocks), SIZE)
    qs = np.stack([q, q * 0.5])
    out = jax.vmap(lambda a: cj.attention(a, jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32), block_mask=c))(
        jnp.asarray(qs, jnp.float32))
    for i in range(2):
        ref, _ = reference.forward(qs[i], k, v, block_mask=blocks, block_size=SIZE)
        np.testing.assert_allclose(np.asarray(out[i]), ref, rtol=2e-5, atol=2e-5)


# ---- on the GPU: the kernels through each adapter --------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("compact", [False, True], ids=["bool", "compact"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_torch_cuda_block_sparse_matches_the_reference(compact, compiled):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    out, grads, ref_out, ref_grads = _torch_case("cuda", torch.bfloat16, compact, compiled, causal=True)
    assert torch.isfinite(out).all()
    # bf16 results (8 bits of mantissa) of O(1) values: a few bf16 ulps; the tolerance
    # method of tests/test_kernels_gpu.py judges the kernels themselves more tightly.
    np.testing.assert_allclose(out.detach().float().cpu().numpy(), ref_out, atol=3e-2)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g.float().cpu().numpy(), r, atol=1e-1)


@pytest.mark.gpu
@pytest.mark.parametrize("compact", [False, True], ids=["bool", "compact"])
def test_jax_gpu_block_sparse_matches_the_reference(compact):
    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "gpu":
        pytest.skip("no JAX GPU backend")
    out, grads, ref_out, ref_grads = _jax_run(compact, True, jnp.float32)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-2)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), r, atol=3e-2)
