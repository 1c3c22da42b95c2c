#!/usr/bin/env python3
"""Decode benchmark: attention over a KV cache against PyTorch SDPA, in one process.

    python benchmarks/bench_decode.py [--quick] [--out benchmarks/results]

bf16, head_dim 128, 32 query heads, 8 and 32 kv heads, batch 1/8/64, cache lengths
1k-128k, query lengths 1 and 4 (points whose cache does not fit are skipped), then
paged caches (page sizes 16, 64, 256). Achieved bandwidth = bytes of K and V read / time;
the device's copy bandwidth (a large device-to-device copy: bytes read + written / time)
is measured in the same run. Every cuflash configuration is first checked against a
float64 computation of sequence 0 on the GPU. Writes decode.json ({"meta", "rows"}),
decode.md and decode.png under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cuflash  # noqa: E402
from cuflash.torch import flash_attn_with_kvcache  # noqa: E402

HEADS, HEAD_DIM = 32, 128
BATCHES = (1, 8, 64)
HEADS_KV = (8, 32)
LENGTHS = (1024, 4096, 16384, 65536, 131072)
SEQLEN_Q = (1, 4)
PAGE_SIZES = (16, 64, 256)
MAX_CACHE_BYTES = 40 * 2**30  # K + V, so that SDPA's and our buffers fit beside it
SDPA = {
    "sdpa_default": None,
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_mem_efficient": "EFFICIENT_ATTENTION",
}


def time_us(fn, min_seconds=0.05, max_iters=200) -> float:
    """Median of five CUDA-event timings of back-to-back calls."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end) / 1e3, 1e-6)
    iters = max(3, min(max_iters, int(min_seconds / once)))
    samples = []
    for _ in range(5):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / iters)
    samples.sort()
    return samples[2]


def copy_tb_s() -> float:
    n = 2 * 2**30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), min_seconds=0.2)
    del src, dst
    return 2 * n / us / 1e6


def check_sequence0(out, q, kc, vc, length) -> float:
    """Max |cuflash - float64| over sequence 0 (no new keys; all `length` keys)."""
    q64 = q[0].double()  # (sq, h, d)
    k64, v64 = kc[0, :length].double(), vc[0, :length].double()  # (L, hk, d)
    group = q.shape[2] // kc.shape[2]
    k64 = k64.repeat_interleave(group, dim=1)
    v64 = v64.repeat_interleave(group, dim=1)
    s = torch.einsum("ihd,jhd->hij", q64, k64) / math.sqrt(q.shape[-1])
    p = torch.softmax(s, dim=-1)
    ref = torch.einsum("hij,jhd->ihd", p, v64)
    return float((out[0].double() - ref).abs().max())


def sdpa_call(q, kc, vc, backend):
    qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
    gqa = kt.shape[1] != qt.shape[1]

    def call():
        return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=gqa)

    if backend is None:
        return call
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = getattr(SDPBackend, backend)

    def with_backend():
        with sdpa_kernel([chosen]):
            return call()

    return with_backend


def row(batch, sq, length, hk, page_size, system, us):
    kv_bytes = 2 * batch * length * hk * HEAD_DIM * 2
    return dict(batch=batch, seqlen_q=sq, seqlen_k=length, heads=HEADS, heads_kv=hk, head_dim=HEAD_DIM,
                page_size=page_size, system=system, us=round(us, 2), kv_bytes=kv_bytes,
                tb_s=round(kv_bytes / us / 1e6, 3))


def contiguous_grid(rows, checks, lengths, batches):
    for hk in HEADS_KV:
        for batch in batches:
            for length in lengths:
                if 2 * batch * length * hk * HEAD_DIM * 2 > MAX_CACHE_BYTES:
                    continue
                kc = torch.randn(batch, length, hk, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                vc = torch.randn_like(kc)
                lens = torch.full((batch,), length, dtype=torch.int32, device="cuda")
                for sq in SEQLEN_Q:
                    q = torch.randn(batch, sq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                    out = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens)
                    err = check_sequence0(out, q, kc, vc, length)
                    checks.append(dict(batch=batch, seqlen_q=sq, seqlen_k=length, heads_kv=hk, max_err=err))
                    if not err < 2e-2:
                        raise AssertionError(f"cuflash differs from float64 by {err} at batch={batch} sq={sq} L={length} hk={hk}")
                    us = time_us(lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens))
                    mine = row(batch, sq, length, hk, None, "cuflash", us)
                    rows.append(mine)
                    theirs = []
                    for name, backend in SDPA.items():
                        try:
                            fn = sdpa_call(q, kc, vc, backend)
                            fn()
                            us = time_us(fn)
                        except Exception as exc:  # noqa: BLE001 - a backend that refuses the shape
                            print(f"  {name}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
                            continue
                        theirs.append(row(batch, sq, length, hk, None, name, us))
                    rows.extend(theirs)
                    best = min(theirs, key=lambda r: r["us"], default=None)
                    print(f"hk={hk:2d} b={batch:2d} L={length:6d} sq={sq}: cuflash {mine['us']:8.1f} us {mine['tb_s']:.2f} TB/s"
                          + (f" | best SDPA {best['system']} {best['us']:.1f} us" if best else ""), flush=True)
                del kc, vc
                torch.cuda.empty_cache()


def paged_grid(rows, lengths):
    hk, batch, sq = 8, 8, 1
    for length in lengths:
        for page_size in PAGE_SIZES:
            pages = batch * length // page_size
            kc = torch.randn(pages, page_size, hk, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            vc = torch.randn_like(kc)
            table = torch.randperm(pages, device="cuda", dtype=torch.int32).reshape(batch, length // page_size)
            lens = torch.full((batch,), length, dtype=torch.int32, device="cuda")
            q = torch.randn(batch, sq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            us = time_us(lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=table))
            rows.append(row(batch, sq, length, hk, page_size, "cuflash", us))
            print(f"paged ps={page_size:3d} L={length:6d}: {us:8.1f} us {rows[-1]['tb_s']:.2f} TB/s", flush=True)
            del kc, vc
            torch.cuda.empty_cache()


def host_cost_us() -> float:
    """Wall time per eager call of a tiny decode step, no sync between calls."""
    q = torch.randn(1, 1, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(1, 1024, 8, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    k = torch.randn(1, 1, 8, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lens = torch.tensor([100], dtype=torch.int32, device="cuda")
    for _ in range(10):
        flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens)
    torch.cuda.synchronize()
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens)
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / n * 1e6


def write_outputs(out_dir: Path, meta: dict, rows: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "decode.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    copy = meta["copy_tb_s"]
    lines = [
        f"# Decode: attention over a KV cache ({meta['device']}, bf16, d=128, 32 query heads)",
        "",
        f"Copy bandwidth measured in the same run: {copy:.2f} TB/s. Host cost per eager call (PyTorch, "
        f"plan cache): {meta['host_us_per_call']:.1f} us. cuflash commit {meta['git_commit']}.",
        "",
        "| heads_kv | batch | seqlen_q | seqlen_k | cuflash us | TB/s | % copy | best SDPA | SDPA us | speedup |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    contiguous = [r for r in rows if r["page_size"] is None]
    for r in contiguous:
        if r["system"] != "cuflash":
            continue
        same = [s for s in contiguous if s["system"] != "cuflash" and all(
            s[k] == r[k] for k in ("batch", "seqlen_q", "seqlen_k", "heads_kv"))]
        best = min(same, key=lambda s: s["us"], default=None)
        lines.append(
            f"| {r['heads_kv']} | {r['batch']} | {r['seqlen_q']} | {r['seqlen_k']} | {r['us']:.1f} | {r['tb_s']:.2f} | "
            f"{100 * r['tb_s'] / copy:.0f}% | {best['system'] if best else '-'} | {best['us'] if best else float('nan'):.1f} | "
            f"{(best['us'] / r['us']) if best else float('nan'):.2f}x |")
    paged = [r for r in rows if r["page_size"] is not None]
    if paged:
        lines += ["", "Paged caches (heads_kv 8, batch 8, seqlen_q 1):", "",
                  "| page_size | seqlen_k | us | TB/s | vs contiguous |", "|---:|---:|---:|---:|---:|"]
        for r in paged:
            base = next((c for c in contiguous if c["system"] == "cuflash" and c["batch"] == r["batch"]
                         and c["heads_kv"] == r["heads_kv"] and c["seqlen_k"] == r["seqlen_k"] and c["seqlen_q"] == 1), None)
            ratio = f"{r['us'] / base['us']:.2f}x time" if base else "-"
            lines.append(f"| {r['page_size']} | {r['seqlen_k']} | {r['us']:.1f} | {r['tb_s']:.2f} | {ratio} |")
    (out_dir / "decode.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, hk in zip(axes, HEADS_KV):
        for system in ["cuflash", *SDPA]:
            for batch in BATCHES:
                pts = [r for r in contiguous if r["system"] == system and r["heads_kv"] == hk and r["batch"] == batch
                       and r["seqlen_q"] == 1]
                if pts:
                    ax.plot([r["seqlen_k"] for r in pts], [r["tb_s"] for r in pts], marker="o",
                            linestyle="-" if system == "cuflash" else ":", label=f"{system} b={batch}")
        ax.axhline(copy, color="k", linewidth=0.8, label="copy bandwidth")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cache length (keys)")
        ax.set_title(f"{HEADS} query heads, {hk} kv heads, seqlen_q 1")
    axes[0].set_ylabel("K+V bytes read / time (TB/s)")
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / "decode.png", dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--quick", action="store_true", help="a small grid (smoke test)")
    args = parser.parse_args()
    begin = time.time()
    lengths = LENGTHS[:2] if args.quick else LENGTHS
    batches = BATCHES[:2] if args.quick else BATCHES
    # The commit measured: CUFLASH_GIT_COMMIT where the checkout is a copy without .git.
    commit = os.environ.get("CUFLASH_GIT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
        cwd=Path(__file__).resolve().parent).stdout.strip()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cuflash=cuflash.__version__,
                git_commit=commit, dtype="bfloat16", head_dim=HEAD_DIM, heads=HEADS, causal=False,
                note="kv_bytes = K and V bytes of the attended keys; tb_s = kv_bytes / time")
    meta["copy_tb_s"] = round(copy_tb_s(), 3)
    print(f"copy bandwidth {meta['copy_tb_s']:.2f} TB/s", flush=True)
    rows: list[dict] = []
    checks: list[dict] = []
    contiguous_grid(rows, checks, lengths, batches)
    paged_grid(rows, (8192, 32768, 131072) if not args.quick else (8192,))
    meta["host_us_per_call"] = round(host_cost_us(), 2)
    meta["checks_max_err"] = max(c["max_err"] for c in checks)
    meta["seconds"] = round(time.time() - begin, 1)
    write_outputs(Path(args.out), meta, rows)
    print(f"done in {meta['seconds']} s; host cost {meta['host_us_per_call']} us per call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
