"""cuflash against the anchors, in one process on one GPU.

    python benchmarks/bench.py [--quick] [--out DIR]

Anchors: PyTorch scaled_dot_product_attention with one backend forced (flash =
FlashAttention-2, cuDNN, memory-efficient, math), and jax.nn.dot_product_attention
(cuDNN, XLA) where JAX has a GPU. Inputs are random normal (never zeros) and rotated among
several copies so that L2 does not flatter anyone; each cuflash configuration is checked
against float64 before it is timed. FLOPs: forward 4·B·H·Nq·Nk·d (halved when causal),
backward 2.5× forward. Results: JSON with every number, a markdown table of TFLOP/s and
cuflash/anchor ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cuflash  # noqa: E402
from cuflash import reference  # noqa: E402

TOKENS = 16384
HIDDEN = 2048


def flops(b, h, nq, nk, d, causal, mode):
    f = 4 * b * h * nq * nk * d / (2 if causal else 1)
    return {"fwd": f, "bwd": 2.5 * f, "fwd_bwd": 3.5 * f}[mode]


def bench_ms(fn, rep_ms=200, warmup_ms=50):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def check_against_float64(dtype, d, causal):
    """A small problem of the same variant against float64 before timing."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(1, 257, 2, d, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    out, lse = cuflash.forward(q, k, v, causal=causal)
    dq, dk, dv = cuflash.backward(do, q, k, v, out, lse, causal=causal)
    args = [t.double().cpu().numpy() for t in (q, k, v, do)]
    ref_out, ref_lse = reference.forward(*args[:3], causal=causal)
    ref = (ref_out, *reference.backward(args[3], *args[:3], ref_out, ref_lse, causal=causal))
    errs = [float(np.abs(t.double().cpu().numpy() - r).max() / max(np.abs(r).max(), 1e-9))
            for t, r in zip((out, dq, dk, dv), ref)]
    if max(errs) > 0.05:
        raise SystemExit(f"cuflash d={d} causal={causal} {dtype}: relative error {errs} vs float64; not timing it")
    return max(errs)


def sdpa_backends():
    import torch
    from torch.nn.attention import SDPBackend

    return {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa_mem_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH}


def run_point(dtype_name, d, causal, seqlen, modes, systems):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    b, h = TOKENS // seqlen, HIDDEN // d
    copies = 3
    gen = torch.Generator(device="cuda").manual_seed(seqlen + d)
    qs = [torch.randn(b, seqlen, h, d, device="cuda", dtype=dtype, generator=gen) for _ in range(copies)]
    ks = [torch.randn_like(x) for x in qs]
    vs = [torch.randn_like(x) for x in qs]
    dos = [torch.randn_like(x) for x in qs]
    results = {}
    counter = [0]

    def pick():
        i = counter[0] % copies
        counter[0] += 1
        return i

    for system in systems:
        for mode in modes:
            try:
                if system == "cuflash":
                    if mode == "fwd":
                        fn = lambda: cuflash.forward(qs[(i := pick())], ks[i], vs[i], causal=causal)  # noqa: E731
                    else:
                        saved = [cuflash.forward(qs[i], ks[i], vs[i], causal=causal) for i in range(copies)]

                        def fn():
                            i = pick()
                            if mode == "fwd_bwd":
                                out, lse = cuflash.forward(qs[i], ks[i], vs[i], causal=causal)
                            else:
                                out, lse = saved[i]
                            return cuflash.backward(dos[i], qs[i], ks[i], vs[i], out, lse, causal=causal)
                else:
                    backend = sdpa_backends()[system]
                    qt = [x.transpose(1, 2).detach().requires_grad_(mode != "fwd") for x in qs]
                    kt = [x.transpose(1, 2).detach().requires_grad_(mode != "fwd") for x in ks]
                    vt = [x.transpose(1, 2).detach().requires_grad_(mode != "fwd") for x in vs]
                    dot = [x.transpose(1, 2) for x in dos]

                    def fwd(i):
                        with sdpa_kernel(backend):
                            return F.scaled_dot_product_attention(qt[i], kt[i], vt[i], is_causal=causal)

                    if mode == "fwd":
                        def fn():
                            with torch.no_grad():
                                return fwd(pick())
                    elif mode == "fwd_bwd":
                        def fn():
                            i = pick()
                            fwd(i).backward(dot[i])
                    else:
                        outs = [fwd(i) for i in range(copies)]

                        def fn():
                            i = pick()
                            outs[i].backward(dot[i], retain_graph=True)
                    fn()
                torch.cuda.synchronize()
                ms = bench_ms(fn)
                results[(system, mode)] = {"ms": ms, "tflops": flops(b, h, seqlen, seqlen, d, causal, mode) / ms / 1e9}
            except Exception as exc:  # noqa: BLE001 - an anchor that does not support the point
                results[(system, mode)] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            torch.cuda.synchronize()
    return results


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a small grid (bf16, seqlen 1k and 4k)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--head-dims", default="64,128,256")
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--systems", default="cuflash,sdpa_flash,sdpa_cudnn,sdpa_mem_efficient")
    args = ap.parse_args()
    import torch

    dtypes = ["bf16"] if args.quick else args.dtypes.split(",")
    seqlens = [1024, 4096] if args.quick else [int(s) for s in args.seqlens.split(",")]
    head_dims = [int(d) for d in args.head_dims.split(",")]
    systems = args.systems.split(",")
    modes = ["fwd", "fwd_bwd"] if args.quick else ["fwd", "bwd", "fwd_bwd"]
    rows = []
    started = time.time()
    for dtype_name in dtypes:
        for d in head_dims:
            for causal in (False, True):
                tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
                err = check_against_float64(tdtype, d, causal)
                for seqlen in seqlens:
                    res = run_point(dtype_name, d, causal, seqlen, modes, systems)
                    for (system, mode), r in res.items():
                        rows.append(dict(dtype=dtype_name, head_dim=d, causal=causal, seqlen=seqlen, system=system,
                                         mode=mode, check_rel_err=err, **r))
                    line = " ".join(
                        f"{s}:{m}={res[(s, m)].get('tflops', float('nan')):.0f}" for s in systems for m in modes
                    )
                    print(f"{dtype_name} d={d} causal={int(causal)} n={seqlen}: {line}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "seconds": round(time.time() - started, 1)}
    (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "bench.md").write_text(markdown_table(rows, systems, meta))
    print(markdown_table(rows, systems, meta))
    return 0


def markdown_table(rows, systems, meta) -> str:
    lines = [f"GPU: {meta['gpu']}, torch {meta['torch']}. TFLOP/s, and cuflash / anchor in parentheses.", ""]
    anchors = [s for s in systems if s != "cuflash"]
    lines.append("| dtype | d | causal | mode | seqlen | cuflash | " + " | ".join(anchors) + " |")
    lines.append("|---|---|---|---|---|---|" + "---|" * len(anchors))
    index = {(r["dtype"], r["head_dim"], r["causal"], r["mode"], r["seqlen"], r["system"]): r for r in rows}
    keys = sorted({k[:5] for k in index}, key=lambda k: (k[0], k[1], k[2], k[3], k[4]))
    for key in keys:
        mine = index.get(key + ("cuflash",), {}).get("tflops")
        cells = []
        for a in anchors:
            t = index.get(key + (a,), {}).get("tflops")
            if t is None:
                cells.append("—")
            else:
                ratio = f" ({mine / t:.2f}×)" if mine else ""
                cells.append(f"{t:.0f}{ratio}")
        mine_cell = f"{mine:.0f}" if mine else "—"
        lines.append(f"| {key[0]} | {key[1]} | {int(key[2])} | {key[3]} | {key[4]} | {mine_cell} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
