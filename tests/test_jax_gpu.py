"""cuflash.jax on the GPU: the kernels inside jitted, differentiated, vmapped JAX code.

Results are judged by the tolerance method (tests/_tolerance.py): against float64
(cuflash.reference on the same rounded inputs) the error may be at most 2x (out, lse) or
3x (dq, dk, dv, dbias) that of plain attention computed in the same dtype, plus a few ulps.
The run sets XLA_PYTHON_CLIENT_PREALLOCATE=false; nothing here needs more than a few MB.
"""

from __future__ import annotations

import dataclasses
import re

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


def _reduce_like(full: np.ndarray, shape: tuple) -> np.ndarray:
    full = full.sum(axis=tuple(range(full.ndim - len(shape))))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and full.shape[i] != 1)
    return full.sum(axis=axes, keepdims=True).reshape(shape)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    seqlen_q: int = 128
    seqlen_k: int = 128
    heads: int = 4
    heads_kv: int = 4
    head_dim: int = 64
    batch: int = 2
    layout: str = "bshd"
    options: tuple = ()  # static options as (name, value) pairs
    bias_shape: tuple | None = None
    mask_shape: tuple | None = None
    alibi: bool = False


CASES = [
    Case("causal", options=(("causal", True),)),
    Case("gqa_bias_more_keys", seqlen_q=96, seqlen_k=160, heads_kv=2, options=(("causal", True),),
         bias_shape=(1, 4, 96, 160)),
    Case("window_softcap_alibi_mask", seqlen_q=113, seqlen_k=77, head_dim=128,
         options=(("window_size", (24, 8)), ("softcap", 20.0)), mask_shape=(2, 1, 113, 77), alibi=True),
    Case("bhsd_top_left_more_queries", seqlen_q=150, seqlen_k=70, heads_kv=1, layout="bhsd",
         options=(("causal", True), ("causal_alignment", "top_left"), ("deterministic", True))),
]


def _inputs(case: Case, seed: int = 0):
    rng = np.random.default_rng(seed)
    b, h, hkv, d = case.batch, case.heads, case.heads_kv, case.head_dim
    if case.layout == "bhsd":
        shape_q, shape_kv = (b, h, case.seqlen_q, d), (b, hkv, case.seqlen_k, d)
    else:
        shape_q, shape_kv = (b, case.seqlen_q, h, d), (b, case.seqlen_k, hkv, d)
    q, k, v, dout = (jnp.asarray(rng.standard_normal(s, dtype=np.float32), jnp.bfloat16)
                     for s in (shape_q, shape_kv, shape_kv, shape_q))
    opts = dict(case.options, layout=case.layout)
    if case.bias_shape is not None:
        opts["bias"] = jnp.asarray(rng.standard_normal(case.bias_shape, dtype=np.float32))
    if case.mask_shape is not None:
        mask = rng.random(case.mask_shape) > 0.2
        mask[..., 5, :] = False  # a fully masked row: output 0, lse -inf, no NaN anywhere
        opts["mask"] = jnp.asarray(mask)
    if case.alibi:
        opts["alibi_slopes"] = jnp.asarray(rng.uniform(0.05, 0.3, h).astype(np.float32))
    return q, k, v, dout, opts


def _heads_first(a: np.ndarray, layout: str) -> np.ndarray:
    return a if layout == "bhsd" else a.transpose(0, 2, 1, 3)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_jit_value_and_grad_in_bf16_match_float64_within_tolerance(case):
    q, k, v, dout, opts = _inputs(case)
    bias = opts.pop("bias", None)
    static = {n: val for n, val in opts.items()}

    def loss(q, k, v, bias):
        out, lse = fa.forward(q, k, v, bias=bias, **static)
        return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32)), (out, lse)

    argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(q, k, v, bias)

    host = {n: (to64(val) if isinstance(val, jax.Array) and val.dtype != jnp.bool_ else
                (np.asarray(val) if isinstance(val, jax.Array) else val)) for n, val in opts.items()}
    if bias is not None:
        host["bias"] = to64(bias)
    q64, k64, v64, dout64 = (to64(a) for a in (q, k, v, dout))
    ref_out, ref_lse = reference.forward(q64, k64, v64, **host)
    ref_grads = reference.backward(dout64, q64, k64, v64, ref_out, ref_lse, **host)
    naive_opts = {n: val for n, val in host.items() if n not in ("layout", "deterministic")}
    naive = naive_attention(*(_heads_first(a, case.layout).astype(np.float32) for a in (q64, k64, v64, dout64)),
                            BF16, naive_opts)
    back = (lambda a: a) if case.layout == "bhsd" else (lambda a: a.transpose(0, 2, 1, 3))
    comparisons = [compare("out", to64(out), ref_out, back(naive["out"]), BF16, 2),
                   compare("lse", to64(lse), ref_lse, naive["lse"], BF16, 2)]
    for name, got, want, nv in zip(("dq", "dk", "dv"), grads, ref_grads, (naive["dq"], naive["dk"], naive["dv"])):
        comparisons.append(compare(name, to64(got), want, back(nv), BF16, 3))
    if bias is not None:
        assert grads[3].shape == bias.shape and grads[3].dtype == bias.dtype
        comparisons.append(compare("dbias", to64(grads[3]), ref_grads[3],
                                   _reduce_like(naive["ds"], bias.shape), BF16, 3))
    check_all(comparisons)
    for g in grads:
        assert np.all(np.isfinite(to64(g)))


def test_varlen_under_jit_with_traced_cu_seqlens():
    lens = [(40, 90), (0, 17), (128, 128), (77, 30)]
    cu_q = np.concatenate([[0], np.cumsum([a for a, _ in lens])]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum([b for _, b in lens])]).astype(np.int32)
    rng = np.random.default_rng(5)
    heads, heads_kv, d = 4, 2, 64
    q, dout = (jnp.asarray(rng.standard_normal((int(cu_q[-1]), heads, d), dtype=np.float32), jnp.bfloat16)
               for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((int(cu_k[-1]), heads_kv, d), dtype=np.float32), jnp.bfloat16)
            for _ in range(2))
    static = dict(causal=True, max_seqlen_q=128, max_seqlen_k=128)

    def loss(q, k, v, cu_q, cu_k):
        out, lse = fa.forward(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **static)
        return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32)), (out, lse)

    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        q, k, v, jnp.asarray(cu_q), jnp.asarray(cu_k))
    q64, k64, v64, dout64 = (to64(a) for a in (q, k, v, dout))
    opts = dict(causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    ref_out, ref_lse = reference.forward(q64, k64, v64, **opts)
    ref_grads = reference.backward(dout64, q64, k64, v64, ref_out, ref_lse, **opts)
    naive = {n: np.zeros_like(a) for n, a in (("out", q64), ("dq", q64), ("dk", k64), ("dv", v64))}
    naive["lse"] = np.full((heads, int(cu_q[-1])), -np.inf)
    for b in range(len(lens)):
        rq, rk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        seq = [a[r].transpose(1, 0, 2)[None].astype(np.float32) for a, r in ((q64, rq), (k64, rk), (v64, rk),
                                                                             (dout64, rq))]
        res = naive_attention(*seq, BF16, dict(causal=True))
        for name, rows in (("out", rq), ("dq", rq), ("dk", rk), ("dv", rk)):
            naive[name][rows] = res[name][0].transpose(1, 0, 2)
        naive["lse"][:, rq] = res["lse"][0]
    comparisons = [compare("out", to64(out), ref_out, naive["out"], BF16, 2),
                   compare("lse", to64(lse), ref_lse, naive["lse"], BF16, 2)]
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        comparisons.append(compare(name, to64(got), want, naive[name], BF16, 3))
    check_all(comparisons)


def _custom_call_targets(text: str) -> list[str]:
    return re.findall(r"custom_call @(\w+)", text) + re.findall(r'custom_call_target="(\w+)"', text)


def test_gpu_computation_has_buffer_callbacks_and_no_host_callback():
    """The kernels run from buffer callbacks (device buffers, XLA's stream); nothing in
    the computation copies to the host (pure_callback / io_callback targets)."""
    q, k, v, _, opts = _inputs(CASES[1])
    bias = opts.pop("bias")

    def loss(q, k, v, bias):
        return jnp.sum(fa.attention(q, k, v, bias=bias, **opts).astype(jnp.float32))

    jitted = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    lowered = jitted.lower(q, k, v, bias)
    stablehlo = _custom_call_targets(lowered.as_text())
    assert sorted(stablehlo) == ["xla_buffer_python_gpu_callback"] * 2, stablehlo
    compiled = _custom_call_targets(lowered.compile().as_text())
    assert compiled.count("xla_buffer_python_gpu_callback") == 2, compiled
    assert not [t for t in compiled if "python" in t and t != "xla_buffer_python_gpu_callback"], compiled


def test_vmap_on_gpu_equals_a_python_loop():
    """The batching rule folds the mapped axis into the batch: one launch computes what a
    loop of launches computes (bit for bit with deterministic=True)."""
    case = Case("vmap", seqlen_q=64, seqlen_k=96, heads_kv=2)
    rng = np.random.default_rng(9)
    qs, ks, vs = (jnp.asarray(rng.standard_normal((3,) + a.shape, dtype=np.float32), jnp.bfloat16)
                  for a in _inputs(case)[:3])
    bias = jnp.asarray(rng.standard_normal((1, 4, 64, 96), dtype=np.float32))

    def fn(q, k, v):
        def loss(q, k, v, b):
            return jnp.sum(fa.attention(q, k, v, causal=True, bias=b, deterministic=True).astype(jnp.float32) ** 2)
        return fa.attention(q, k, v, causal=True, bias=bias), jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)

    mapped = jax.jit(jax.vmap(fn))(qs, ks, vs)
    one = jax.jit(fn)
    loop = [one(qs[i], ks[i], vs[i]) for i in range(3)]
    for got, want in zip(jax.tree.leaves(mapped), zip(*[jax.tree.leaves(r) for r in loop])):
        np.testing.assert_array_equal(to64(got), np.stack([to64(w) for w in want]))


def test_dot_product_attention_matches_jax_nn_on_gpu():
    """Against jax.nn.dot_product_attention (cuDNN where it takes the problem, else XLA),
    both judged against float64: cuflash's error at most 2x (values) or 3x (grads) theirs."""
    rng = np.random.default_rng(17)
    b, t, s, n, kv, h = 2, 128, 128, 4, 2, 64
    q, dout = (jnp.asarray(rng.standard_normal((b, t, n, h), dtype=np.float32), jnp.bfloat16) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((b, s, kv, h), dtype=np.float32), jnp.bfloat16) for _ in range(2))

    def run(impl, **kwargs):
        def loss(q, k, v):
            out = impl(q, k, v, is_causal=True, **kwargs)
            return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32)), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return out, grads

    ours = run(fa.dot_product_attention)
    try:
        theirs = run(jax.nn.dot_product_attention, implementation="cudnn")
    except Exception:  # noqa: BLE001 - cuDNN refuses some problems; XLA takes all
        theirs = run(jax.nn.dot_product_attention, implementation="xla")
    q64, k64, v64, dout64 = (to64(a) for a in (q, k, v, dout))
    opts = dict(causal=True, causal_alignment="top_left")
    ref_out, ref_lse = reference.forward(q64, k64, v64, **opts)
    ref_grads = reference.backward(dout64, q64, k64, v64, ref_out, ref_lse, **opts)
    comparisons = [compare("out", to64(ours[0]), ref_out, to64(theirs[0]), BF16, 2)]
    for name, got, nv, want in zip(("dq", "dk", "dv"), ours[1], theirs[1], ref_grads):
        comparisons.append(compare(name, to64(got), want, to64(nv), BF16, 3))
    check_all(comparisons)


def test_the_same_jitted_code_runs_the_reference_on_cpu_and_the_kernels_on_gpu():
    """Dispatch happens per platform under jit: arrays committed to the CPU take the
    jax.numpy reference, arrays on the GPU take the kernels, from one function."""
    q, k, v, _, _ = _inputs(Case("dispatch", seqlen_q=64, seqlen_k=64))
    fn = jax.jit(lambda q, k, v: fa.attention(q, k, v, causal=True))
    on_gpu = fn(q, k, v)
    cpu = jax.devices("cpu")[0]
    on_cpu = fn(*(jax.device_put(a, cpu) for a in (q, k, v)))
    assert on_cpu.devices() == {cpu}
    assert "custom_call" not in fn.lower(*(jax.device_put(a, cpu) for a in (q, k, v))).as_text()
    np.testing.assert_allclose(to64(on_gpu), to64(on_cpu), atol=3e-2, rtol=3e-2)
    eager = fa.attention(q, k, v, causal=True)
    np.testing.assert_array_equal(to64(eager), to64(on_gpu))
