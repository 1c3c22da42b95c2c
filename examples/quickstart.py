"""cuflash in one screen: attention on the GPU when there is one, else on the float64
reference path, checked against the reference either way.

    python examples/quickstart.py
"""

import numpy as np

import cuflash


def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no CuPy or no driver
        return False


def main() -> None:
    rng = np.random.default_rng(0)
    batch, seqlen, heads, heads_kv, head_dim = 2, 512, 8, 2, 64  # grouped-query attention
    q = rng.standard_normal((batch, seqlen, heads, head_dim), dtype=np.float32)
    k = rng.standard_normal((batch, seqlen, heads_kv, head_dim), dtype=np.float32)
    v = rng.standard_normal((batch, seqlen, heads_kv, head_dim), dtype=np.float32)
    dout = rng.standard_normal(q.shape, dtype=np.float32)

    if gpu_available():
        import cupy as xp

        where = f"GPU ({xp.cuda.runtime.getDeviceProperties(0)['name'].decode()}), CUDA kernels, bf16"
        import ml_dtypes

        dtype = ml_dtypes.bfloat16
        to_dev = lambda a: xp.asarray(a.astype(dtype).view(np.uint16)).view(dtype)  # noqa: E731
        to_host = lambda a: xp.asnumpy(a.view(np.uint16)).view(dtype).astype(np.float64)  # noqa: E731
        tol = 5e-2
    else:
        where = "CPU (no GPU found): the float64 reference path"
        to_dev = lambda a: a  # noqa: E731
        to_host = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
        tol = 1e-5

    qd, kd, vd, dd = (to_dev(a) for a in (q, k, v, dout))
    out, lse = cuflash.forward(qd, kd, vd, causal=True)
    dq, dk, dv = cuflash.backward(dd, qd, kd, vd, out, lse, causal=True)

    args = [to_host(a) for a in (qd, kd, vd, dd)]
    ref_out, ref_lse = cuflash.reference.forward(*args[:3], causal=True)
    ref_grads = cuflash.reference.backward(args[3], *args[:3], ref_out, ref_lse, causal=True)

    print(f"cuflash {cuflash.__version__} ran on: {where}")
    print(f"q {q.shape}, k/v {k.shape}, causal, output type {type(out).__module__}.{type(out).__name__}")
    worst = 0.0
    for name, got, ref in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), (ref_out, ref_lse, *ref_grads)):
        err = float(np.max(np.abs(to_host(got) - ref)) / max(np.max(np.abs(ref)), 1e-12))
        worst = max(worst, err)
        print(f"  {name:4s} max relative error vs float64 reference: {err:.2e}")
    if worst > tol:
        raise SystemExit(f"error {worst:.2e} above {tol:.0e}")
    print("ok")


if __name__ == "__main__":
    main()
