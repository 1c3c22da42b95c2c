"""Tile-shape candidates for the 16-bit kernels, checked against float64 and timed side
by side (bf16, batch x seqlen = 16k tokens, heads x head_dim = 2048).

    python benchmarks/tune.py --prebuild sm_90     # compile every candidate (no GPU needed)
    python benchmarks/tune.py [--seqlen 4096]      # check and time them on the GPU

Each line: kernel, head dim, causal, tiles, relative error vs float64, TFLOP/s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cuflash import _build, _tiles  # noqa: E402
from cuflash._interop import BFLOAT16  # noqa: E402

T = _tiles.Tiles
W = dict(wgmma=True)
O = dict(wgmma=True, overlap=True)
CANDIDATES = {
    # Hopper forward (warpgroup MMA): block_m = 64 x warpgroups, warps = 4 x warpgroups;
    # overlap = P·V of one key tile during the softmax of the next.
    ("fwd_sm90", 64): [T(192, 128, 12, **W), T(128, 128, 8, **O), T(192, 128, 12, **O), T(64, 128, 4, min_blocks=2, **W),
                       T(64, 128, 4, min_blocks=2, **O), T(64, 128, 4, min_blocks=3, **W)],
    ("fwd_sm90", 128): [T(128, 128, 8, **W), T(128, 128, 8, **O), T(128, 64, 8, **O), T(192, 64, 12, **O)],
    ("fwd_sm90", 256): [T(128, 64, 8, **W), T(128, 64, 8, **O), T(128, 32, 8, **O)],
    # Hopper backward dK/dV: block_n = 64 x key groups, block_m = the query tile.
    ("bwd_sm90", 64): [T(128, 128, 8, 2, **W), T(64, 64, 4, 2, min_blocks=2, **W)],
    ("bwd_sm90", 128): [T(64, 128, 8, 2, **W), T(64, 64, 4, 2, min_blocks=2, **W)],
    # d=256: two warpgroups per 64 keys, splitting the head dim (the only shape that fits).
    ("bwd_sm90", 256): [T(64, 64, 8, 2, **W)],
}


def variants(arch: str):
    limit = _tiles.SMEM_LIMIT[arch]
    for (kernel, d), cands in CANDIDATES.items():
        for tiles in cands:
            _tiles.OVERRIDES.clear()
            _tiles.OVERRIDES[(kernel, False, d)] = tiles
            if kernel == "fwd_sm90":
                yield _tiles.forward_variant(BFLOAT16, d, False, limit, arch)[0]
            elif kernel == "fwd":
                yield _tiles.forward_variant(BFLOAT16, d, False, limit)[0]
            else:
                plan = _tiles.backward_variant(BFLOAT16, d, False, limit, arch if kernel == "bwd_sm90" else None)
                yield plan.variant
                if plan.dkdv_variant is not None:
                    yield plan.dkdv_variant
                    yield _tiles.forward_variant(BFLOAT16, d, False, limit, arch)[0]
    _tiles.OVERRIDES.clear()


def _build_one(job):
    variant, arch = job
    try:
        _build.build(variant, arch)
        return variant.tag, None
    except _build.CompileError as exc:
        return variant.tag, str(exc)[:500]


def prebuild(arch: str) -> None:
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(v, arch) for v in variants(arch)]
    with ProcessPoolExecutor() as pool:
        for tag, err in pool.map(_build_one, jobs):
            print(("FAIL " + tag + ": " + err) if err else ("ok " + tag))


def run(seqlen: int) -> None:
    import torch
    import triton.testing

    import cuflash
    from cuflash import reference

    for (kernel, d), cands in CANDIDATES.items():
        b, h = 16384 // seqlen, 2048 // d
        for causal in (False, True):
            g = torch.Generator(device="cuda").manual_seed(d)
            q, k, v, do = (torch.randn(b, seqlen, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
            small = [t[:1, :300, :2].contiguous() for t in (q, k, v, do)]
            args64 = [t.double().cpu().numpy() for t in small]
            ref_out, ref_lse = reference.forward(*args64[:3], causal=causal)
            ref_dq = reference.backward(args64[3], *args64[:3], ref_out, ref_lse, causal=causal)[0]
            flops = 4 * b * h * seqlen * seqlen * d / (2 if causal else 1) * (1 if kernel.startswith("fwd") else 2.5)
            for tiles in cands:
                _tiles.OVERRIDES.clear()
                _tiles.OVERRIDES[(kernel, False, d)] = tiles
                _tiles.WGMMA_ENABLED = kernel.endswith("_sm90")  # otherwise the portable mma.sync kernels
                out, lse = cuflash.forward(*small[:3], causal=causal)
                dq = cuflash.backward(small[3], *small[:3], out, lse, causal=causal)[0]
                err_o = float(np.abs(out.double().cpu().numpy() - ref_out).max())
                err_o = max(err_o, float(np.abs(lse.double().cpu().numpy() - ref_lse).max()))
                err_q = float(np.abs(dq.double().cpu().numpy() - ref_dq).max() / np.abs(ref_dq).max())
                modes = [False] if kernel.startswith("fwd") else [False, True]
                for deterministic in modes:
                    if kernel.startswith("fwd"):
                        fn = lambda: cuflash.forward(q, k, v, causal=causal)  # noqa: E731
                    else:
                        o, l = cuflash.forward(q, k, v, causal=causal)
                        fn = lambda: cuflash.backward(do, q, k, v, o, l, causal=causal,  # noqa: E731
                                                      deterministic=deterministic)
                    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                    print(f"{kernel} d={d} causal={int(causal)} tiles={tiles.block_m},{tiles.block_n},{tiles.warps},"
                          f"s{tiles.stages},q{int(tiles.q_regs)},w{tiles.wm_s}{tiles.wn_kv}{tiles.wm_q},b{tiles.min_blocks},o{int(tiles.overlap)}"
                          f"{' det' if deterministic else ''} err_out={err_o:.1e} err_dq={err_q:.1e} "
                          f"{flops / ms / 1e9:6.1f} TFLOP/s", flush=True)
    _tiles.OVERRIDES.clear()
    _tiles.WGMMA_ENABLED = True


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--prebuild", metavar="ARCH")
    ap.add_argument("--seqlen", type=int, default=4096)
    a = ap.parse_args()
    if a.prebuild:
        prebuild(a.prebuild)
    else:
        run(a.seqlen)
