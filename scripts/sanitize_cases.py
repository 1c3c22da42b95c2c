#!/usr/bin/env python3
"""A fixed set of small problems through every registered kernel family, for
compute-sanitizer (`scripts/gpu-check --sanitize` runs it under memcheck, racecheck,
initcheck and synccheck and records each tool's error count).

    python3 scripts/sanitize_cases.py [--list]

Each case runs the forward and the backward (and the probabilities kernel once) on fresh
random inputs with odd lengths, and checks the results against the float64 reference, so
a run under a sanitizer also proves the instrumented kernels computed the right thing. The
Hopper families are planned where the GPU has them: the warp-specialised forward (one block
per tile, and persistent on two blocks so each walks many tiles; the "general" case runs
it compiled with the score modifiers and dropout), then the wgmma forward
(`_tiles.FWD_FAMILY = "sm90"`; "general" there takes the portable kernel);
`_tiles.WGMMA_ENABLED = False` forces the portable family for the same problems.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cuflash  # noqa: E402
from cuflash import _launch, _tiles, reference  # noqa: E402
from cuflash._interop import BFLOAT16  # noqa: E402

# (name, dtype, batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, options)
CASES = (
    ("plain", np.float16, 2, 77, 131, 4, 2, 64, {}),
    ("causal", BFLOAT16, 1, 131, 77, 2, 1, 128, {"causal": True}),
    ("window-d256", BFLOAT16, 1, 70, 90, 2, 2, 256, {"window_size": (20, 5)}),
    ("general", np.float16, 2, 45, 67, 2, 1, 96, {"softcap": 30.0, "alibi": True, "bias": True, "mask": True,
                                                  "dropout_p": 0.2, "seed": 7}),
    ("fp32", np.float32, 1, 33, 65, 2, 2, 40, {"causal": True}),
    ("deterministic", BFLOAT16, 1, 150, 150, 2, 2, 64, {"deterministic": True}),
    ("varlen", np.float16, 0, 0, 0, 2, 1, 64, {"varlen": (0, 17, 17, 60)}),
    ("positions", BFLOAT16, 1, 48, 64, 2, 2, 64, {"causal": True, "position_offsets": (64, 32)}),
)


def _case_inputs(rng, dtype, batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, opts):
    import cupy

    extra = dict(opts)
    if "varlen" in extra:
        cu = np.asarray(extra.pop("varlen"), dtype=np.int32)
        shape_q = (int(cu[-1]), heads, head_dim)
        shape_k = (int(cu[-1]), heads_kv, head_dim)
        extra.update(cu_seqlens_q=cupy.asarray(cu), cu_seqlens_k=cupy.asarray(cu))
        batch, seqlen_q, seqlen_k = len(cu) - 1, int(np.diff(cu).max()), int(np.diff(cu).max())
    else:
        shape_q = (batch, seqlen_q, heads, head_dim)
        shape_k = (batch, seqlen_k, heads_kv, head_dim)
    host = {n: rng.standard_normal(s).astype(np.float32) for n, s in (("q", shape_q), ("k", shape_k),
                                                                        ("v", shape_k), ("dout", shape_q))}
    if extra.pop("alibi", False):
        extra["alibi_slopes"] = cupy.asarray(rng.uniform(0.01, 0.5, heads).astype(np.float32))
    if extra.pop("bias", False):
        extra["bias"] = cupy.asarray(rng.standard_normal((1, heads, seqlen_q, seqlen_k)).astype(np.float32))
    if extra.pop("mask", False):
        extra["mask"] = cupy.asarray(rng.random((batch, 1, seqlen_q, seqlen_k)) < 0.8)
    dev = {n: cupy.asarray(a).astype(dtype) for n, a in host.items()}
    return dev, extra


def _host(x) -> np.ndarray:
    import cupy

    return cupy.asnumpy(x.astype(np.float32)).astype(np.float64)


def run_case(rng, case) -> float:
    """Runs one case; returns its worst relative error against the float64 reference."""
    name, dtype, *dims, opts = case
    dev, extra = _case_inputs(rng, np.dtype(dtype), *dims, opts)
    out, lse = cuflash.forward(dev["q"], dev["k"], dev["v"], **extra)
    grads = cuflash.backward(dev["dout"], dev["q"], dev["k"], dev["v"], out, lse, **extra)
    host_opts = {n: (_host(a) if n in ("bias", "alibi_slopes") else (a.get() if hasattr(a, "get") else a))
                 for n, a in extra.items()}
    q, k, v, dout = (_host(dev[n]) for n in ("q", "k", "v", "dout"))
    ref_out, _ = reference.forward(q, k, v, **host_opts)
    ref_grads = reference.backward(dout, q, k, v, _host(out), _host(lse), **host_opts)
    worst = 0.0
    for got, want in zip((out,) + tuple(grads[:3]), (ref_out,) + tuple(ref_grads[:3])):
        got = _host(got)
        if not np.all(np.isfinite(got)):
            raise AssertionError(f"{name}: non-finite values in a result")
        worst = max(worst, float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)))
    if "varlen" not in opts and "position_offsets" not in opts:
        cuflash.probabilities(dev["q"], dev["k"], dev["v"],
                              **{n: a for n, a in extra.items() if n not in ("dropout_p", "seed", "deterministic")})
    return worst


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list:
        for case in CASES:
            print(case[0])
        return 0
    import cupy

    rng = np.random.default_rng()
    failures = []
    # (name, WGMMA_ENABLED, FWD_FAMILY, persistent blocks or None)
    families = [("hopper-ws", True, "ws", None), ("hopper-ws-persistent", True, "ws", 2),
                ("hopper-wgmma", True, "sm90", None), ("portable", False, "ws", None)]
    real_sm_count = _launch.sm_count
    for family, wgmma, fwd_family, blocks in families:
        _tiles.WGMMA_ENABLED, _tiles.FWD_FAMILY = wgmma, fwd_family
        _tiles.WS_PERSISTENT = blocks is not None
        _launch.sm_count = real_sm_count if blocks is None else (lambda device_index, blocks=blocks: blocks)
        for case in CASES:
            worst = run_case(rng, case)
            # bf16 inputs and outputs: relative errors of a few 1e-3; 5e-2 catches wrong results.
            status = "ok" if worst < 5e-2 else "WRONG"
            if status != "ok":
                failures.append(f"{family}/{case[0]}")
            print(f"{family:18s} {case[0]:14s} rel.err {worst:.2e} {status}", flush=True)
    _tiles.WGMMA_ENABLED, _tiles.FWD_FAMILY, _tiles.WS_PERSISTENT = True, "ws", False
    _launch.sm_count = real_sm_count
    cupy.cuda.runtime.deviceSynchronize()
    if failures:
        print("wrong results: " + ", ".join(failures))
        return 1
    print(f"{len(families) * len(CASES)} sanitizer cases ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
