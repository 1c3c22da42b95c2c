"""Context-parallel attention in JAX against one device: every case of tests/_cp_workers.py
on meshes of 2 and 4 devices, forward (out, lse) and backward (dq, dk, dv through
jax.vjp under jit), printed as one JSON line {"w2-<case>": null | problem, ...}.

CPU: run with XLA_FLAGS=--xla_force_host_platform_device_count=4 (set here before jax is
imported when absent); float64 (jax_enable_x64), the jax.numpy reference on both sides.
GPU (`_cp_jax_check.py gpu`): bf16 on the first 2 GPUs against one GPU, the tolerance
bound of _cp_workers._compare_tolerance.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import zlib

os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})
ON_GPU = len(sys.argv) > 1 and sys.argv[1] == "gpu"
if not ON_GPU:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import _cp_workers as workers  # noqa: E402

import cuflash.jax as cfj  # noqa: E402
import cuflash.jax_distributed as cp  # noqa: E402


def run(case: workers.Case, world: int, dtype, length_scale: int) -> dict:
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    batch, dim, n = 2, 16, world * case.local_len * length_scale
    q = rng.standard_normal((batch, n, case.heads, dim))
    k = rng.standard_normal((batch, n, case.heads_kv, dim))
    v = rng.standard_normal((batch, n, case.heads_kv, dim))
    dout = rng.standard_normal((batch, n, case.heads, dim))
    slopes = jnp.asarray(rng.random(case.heads) * 0.5, jnp.float32) if case.alibi else None
    q, k, v, dout = (jnp.asarray(a, dtype) for a in (q, k, v, dout))
    opts = dict(causal=case.causal, window_size=case.window, softcap=case.softcap, dropout_p=case.dropout_p,
                seed=1234 if case.dropout_p else None)
    zig = case.resolved_sharding == "zigzag"
    order = (lambda x, d=1: cp.zigzag_shard(x, world, d)) if zig else (lambda x, d=1: x)

    def whole(q_, k_, v_):
        return cfj.forward(q_, k_, v_, alibi_slopes=slopes, **opts)

    def one(q_, k_, v_, dout_):
        (out, lse), vjp = jax.vjp(lambda a, b, c: whole(a, b, c), q_, k_, v_)
        return (out, lse) + vjp((dout_, jnp.zeros_like(lse)))

    mesh = jax.make_mesh((world,), ("seq",), devices=jax.devices()[:world])

    def dist(q_, k_, v_, dout_):
        f = lambda a, b, c: cp.ring_attention(a, b, c, mesh=mesh, axis_name="seq", placement=case.placement,  # noqa: E731
                                              sharding=case.sharding, alibi_slopes=slopes, return_lse=True, **opts)
        (out, lse), vjp = jax.vjp(f, q_, k_, v_)
        return (out, lse) + vjp((dout_, jnp.zeros_like(lse)))

    names = ("out", "lse", "dq", "dk", "dv")
    ref = jax.jit(one)(q, k, v, dout)
    got = jax.jit(dist)(order(q), order(k), order(v), order(dout))
    as_np = lambda x: np.asarray(x, np.float64)  # noqa: E731
    result = dict(one={n_: as_np(order(r, 2 if n_ == "lse" else 1)) for n_, r in zip(names, ref)},
                  got={n_: as_np(g) for n_, g in zip(names, got)})
    if ON_GPU:
        with jax.default_device(jax.devices("cpu")[0]):
            ref64 = jax.jit(one)(*(jnp.asarray(np.asarray(a, np.float64)) for a in (q, k, v, dout)))
        result["ref64"] = {n_: as_np(order(jnp.asarray(r), 2 if n_ == "lse" else 1)) for n_, r in zip(names, ref64)}
    return result


def main() -> None:
    verdicts = {}
    worlds = (2,) if ON_GPU else (2, 4)
    for world in worlds:
        for case in workers.CASES if world == 2 else workers.JAX_W4_CASES:
            key = f"w{world}-{case.name}"
            try:
                if ON_GPU:
                    result = run(case, world, jnp.bfloat16, 16)
                    verdicts[key] = workers._compare_tolerance(result, case, world, 0)
                else:
                    verdicts[key] = workers._compare_float64(run(case, world, jnp.float64, 1))
            except NotImplementedError as exc:
                verdicts[key] = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # noqa: BLE001 - reported by the test
                verdicts[key] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    print("VERDICTS " + json.dumps(verdicts))


if __name__ == "__main__":
    main()
