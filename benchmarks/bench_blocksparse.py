"""Block-sparse attention: time against density, cuflash vs FlexAttention vs cuDNN.

    python benchmarks/bench_blocksparse.py               # H200: ~4 minutes (--time-limit-s)
    python benchmarks/bench_blocksparse.py --selftest    # no GPU: toy sizes on the CPU

bf16, batch 1, 16 heads, head dims 64 and 128, seqlen 8k-64k, block size 128 x 128;
random block masks, shared by the heads, with the same number of key blocks in every
query-block row (the diagonal block always kept), densities 1.0 (the dense baseline: every block listed),
0.5, 0.2, 0.1, 0.05; forward and forward+backward. Systems:

  cuflash         cuflash.torch.attention with the compact lists (built once per mask)
  flex_attention  torch.nn.attention.flex_attention under torch.compile, given a BlockMask
                  built from the same lists (BlockMask.from_kv_blocks, every listed block
                  full, so no mask_mod runs inside a block)
  sdpa_cudnn      torch SDPA with the cuDNN backend forced and the equivalent dense boolean
                  mask (1, 1, N, N), 4 GiB of bools at 64k: skipped above --cudnn-max-seqlen
                  or the backend refuses it (the reason is recorded)

Before timing, each system is checked on a small problem (seqlen 1024, the same masks'
construction) against the float64 reference given the same block mask; a system that
fails is not timed. Timing: CUDA events around each call, median of repeats filling
~60 ms after warm-up (at least 3). Points left after --time-limit-s are listed in
meta.skipped, not guessed. Results: benchmarks/results/blocksparse.json
({"meta": {...}, "rows": [{"seqlen", "head_dim", "pattern", "density", "mode", "system",
"ms"}]}), blocksparse.md (the table, with time / (density x dense time) and the speedups)
and blocksparse.png (time against density).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

import cuflash  # noqa: E402
import cuflash.torch as cft  # noqa: E402
from cuflash import block_sparse, reference  # noqa: E402

SYSTEMS = ("cuflash", "flex_attention", "sdpa_cudnn")
MODES = ("fwd", "fwd_bwd")
DENSITIES = (1.0, 0.5, 0.2, 0.1, 0.05)
BLOCK = 128
TOLERANCE = 0.05  # max |err| / max |ref| against float64 (bf16)


def random_rows(query_blocks: int, key_blocks: int, density: float, heads: int, seed: int) -> np.ndarray:
    """(1, heads, QB, KB) bool: each query-block row keeps round(density * KB) key blocks
    (at least 1), its diagonal block among them, the rest drawn at random."""
    rng = np.random.default_rng(seed)
    keep = max(1, round(density * key_blocks))
    m = np.zeros((1, heads, query_blocks, key_blocks), bool)
    for h in range(heads):
        for r in range(query_blocks):
            diag = min(r * key_blocks // max(query_blocks, 1), key_blocks - 1)
            others = np.delete(np.arange(key_blocks), diag)
            chosen = rng.choice(others, size=keep - 1, replace=False) if keep > 1 else []
            m[0, h, r, diag] = True
            m[0, h, r, chosen] = True
    return m


class Problem:
    """One (seqlen, head_dim, density) with inputs and every system's mask form."""

    def __init__(self, seqlen: int, head_dim: int, heads: int, density: float, device: str, dtype, seed: int):
        self.seqlen, self.head_dim, self.density_nominal = seqlen, head_dim, density
        nb = block_sparse.num_blocks(seqlen, BLOCK)
        self.blocks = random_rows(nb, nb, density, 1, seed)  # shared by the heads
        self.density = float(self.blocks.mean())
        g = torch.Generator(device="cpu").manual_seed(seed)
        shape = (1, seqlen, heads, head_dim)  # bshd
        self.q, self.k, self.v = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(3))
        self.dout = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
        self.device = device
        tb = torch.from_numpy(self.blocks).to(device)
        self.compact = block_sparse.compact(tb, (BLOCK, BLOCK))
        self._flex_mask = None
        self._dense_mask = None

    def flex_mask(self):
        from torch.nn.attention.flex_attention import BlockMask

        if self._flex_mask is None:
            c = self.compact
            zeros = torch.zeros_like(c.kv_count)
            blocks = torch.from_numpy(self.blocks[0, 0]).to(self.device)

            def inside_listed_block(b, h, q_idx, kv_idx):
                # Evaluated only where FlexAttention does not know the block is full: its
                # unfused (eager) path applies the mask element by element; compiled, every
                # listed block is full and this never runs.
                return blocks[q_idx // BLOCK, kv_idx // BLOCK]

            self._flex_mask = BlockMask.from_kv_blocks(
                zeros, torch.zeros_like(c.kv_index), c.kv_count, c.kv_index, BLOCK_SIZE=BLOCK,
                mask_mod=inside_listed_block, seq_lengths=(self.seqlen, self.seqlen),
            )
        return self._flex_mask

    def dense_mask(self):
        """(1, 1, N, N) bool for SDPA (expanded on the device)."""
        if self._dense_mask is None:
            tb = torch.from_numpy(self.blocks).to(self.device)
            m = tb.repeat_interleave(BLOCK, dim=2).repeat_interleave(BLOCK, dim=3)
            self._dense_mask = m[..., : self.seqlen, : self.seqlen].contiguous()
        return self._dense_mask


# ---- the systems: f(q, k, v) on bhsd or bshd tensors as each wants --------------------------


def run_cuflash(p: Problem, q, k, v):
    return cft.attention(q, k, v, block_mask=p.compact)


def run_cuflash_plain(p: Problem, q, k, v):
    """cuflash without a block mask (the plain kernels): what density 1.0 costs over them."""
    return cft.attention(q, k, v)


_compiled_flex = {}


def run_flex(p: Problem, q, k, v, compiled: bool = True):
    from torch.nn.attention.flex_attention import flex_attention

    if compiled:
        fn = _compiled_flex.get("fn")
        if fn is None:
            # One compiled graph per shape; each mask's mask_mod is a new closure. Past the
            # default recompile limit dynamo would fall back to the unfused eager path and
            # time that instead.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
            if hasattr(torch._dynamo.config, "recompile_limit"):
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
            fn = _compiled_flex["fn"] = torch.compile(flex_attention, dynamic=False)
    else:
        fn = flex_attention
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=p.flex_mask())
    return out.transpose(1, 2)


def run_cudnn(p: Problem, q, k, v, backend: str = "cudnn"):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]
    with sdpa_kernel(chosen):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=p.dense_mask())
    return out.transpose(1, 2)


# ---- checking and timing ---------------------------------------------------------------------------


def check(name: str, fn, head_dim: int, device: str, dtype, backward: bool = True) -> str | None:
    """None if `fn` matches the float64 reference on a small block-sparse problem, else why
    (forward only with backward=False: FlexAttention has no CPU backward)."""
    p = Problem(1024 if device == "cuda" else 256, head_dim, 2, 0.3, device, dtype, seed=7)
    q, k, v = (t.detach().clone().requires_grad_(backward) for t in (p.q, p.k, p.v))
    try:
        out = fn(p, q, k, v)
        if backward:
            out.backward(p.dout)
    except Exception as exc:  # a system that cannot run this problem is reported, not timed
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    host = [t.detach().double().cpu().numpy() for t in (p.q, p.k, p.v, p.dout)]
    ref_out, ref_lse = reference.forward(*host[:3], block_mask=p.blocks, block_size=(BLOCK, BLOCK))
    ref_grads = reference.backward(host[3], *host[:3], ref_out, ref_lse, block_mask=p.blocks, block_size=(BLOCK, BLOCK))
    pairs = [("out", out, ref_out)]
    if backward:
        pairs += [("dq", q.grad, ref_grads[0]), ("dk", k.grad, ref_grads[1]), ("dv", v.grad, ref_grads[2])]
    for label, got, want in pairs:
        err = float(np.abs(got.detach().double().cpu().numpy() - want).max()) / max(float(np.abs(want).max()), 1e-30)
        if not err <= TOLERANCE:
            return f"{label}: max|err|/max|ref| = {err:.3g} > {TOLERANCE}"
    return None


def timed(fn, reps_ms: float = 60.0) -> float:
    """Median milliseconds of fn() (CUDA events; wall clock on the CPU)."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    reps = int(min(50, max(3, reps_ms / max(first, 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(system_fn, p: Problem, mode: str) -> float:
    if mode == "fwd":
        with torch.no_grad():
            return timed(lambda: system_fn(p, p.q, p.k, p.v))
    q, k, v = (t.detach().requires_grad_(True) for t in (p.q, p.k, p.v))

    def step():
        q.grad = k.grad = v.grad = None
        system_fn(p, q, k, v).backward(p.dout)

    return timed(step)


# ---- reporting ---------------------------------------------------------------------------------------


def git_commit() -> str:
    if os.environ.get("CUFLASH_GIT_COMMIT"):  # a checkout copied without .git
        return os.environ["CUFLASH_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_markdown(rows: list[dict], meta: dict, path: Path) -> None:
    by = {(r["head_dim"], r["seqlen"], r["mode"], r["system"], r["density_nominal"]): r for r in rows}
    lines = ["# Block-sparse attention: time against density", "",
             f"{meta['gpu']}, {meta['dtype']}, batch 1, {meta['heads']} heads, block {BLOCK} x {BLOCK}, random blocks; "
             "ms (median). `vs dense` = cuflash time / (density x cuflash dense time) (target <= 1.1); "
             "`x flex`, `x cudnn` = their time / cuflash time (target >= 1).", ""]
    lines.append("| d | seqlen | mode | density | cuflash ms | flex ms | cudnn ms | vs dense | x flex | x cudnn |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["head_dim"], r["seqlen"], r["mode"], r["density_nominal"]) for r in rows},
                  key=lambda t: (t[0], t[1], t[2], -t[3]))
    for d, n, mode, dens in keys:
        cells = {s: by.get((d, n, mode, s, dens)) for s in SYSTEMS}
        cf = cells["cuflash"]
        dense = by.get((d, n, mode, "cuflash", 1.0))

        def ms(r):
            return f"{r['ms']:.3f}" if r else "-"

        vs_dense = f"{cf['ms'] / (cf['density'] * dense['ms']):.2f}" if cf and dense else "-"
        x_flex = f"{cells['flex_attention']['ms'] / cf['ms']:.2f}" if cf and cells["flex_attention"] else "-"
        x_cudnn = f"{cells['sdpa_cudnn']['ms'] / cf['ms']:.2f}" if cf and cells["sdpa_cudnn"] else "-"
        actual = cf["density"] if cf else dens
        lines.append(f"| {d} | {n} | {mode} | {actual:.3f} | {ms(cf)} | {ms(cells['flex_attention'])} | "
                     f"{ms(cells['sdpa_cudnn'])} | {vs_dense} | {x_flex} | {x_cudnn} |")
    if meta.get("cuflash_plain_dense"):
        lines += ["", "cuflash without a block mask (plain kernels) at the dense points, ms:", ""]
        lines += [f"- d={r['head_dim']} N={r['seqlen']} {r['mode']}: {r['ms']:.3f}" for r in meta["cuflash_plain_dense"]]
    if meta.get("skipped"):
        lines += ["", "Not measured:", ""] + [f"- {s}" for s in meta["skipped"]]
    if meta.get("checks"):
        lines += ["", "Float64 checks before timing:", ""] + [f"- {k}: {v}" for k, v in meta["checks"].items()]
    path.write_text("\n".join(lines) + "\n")


def write_plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    panels = sorted({(r["head_dim"], r["mode"]) for r in rows})
    seqlens = sorted({r["seqlen"] for r in rows})
    fig, axes = plt.subplots(len(panels), len(seqlens), figsize=(4 * len(seqlens), 3.2 * len(panels)), squeeze=False)
    for i, (d, mode) in enumerate(panels):
        for j, n in enumerate(seqlens):
            ax = axes[i][j]
            for system, style in zip(SYSTEMS, ("o-", "s--", "^:")):
                pts = sorted((r["density"], r["ms"]) for r in rows
                             if (r["head_dim"], r["mode"], r["seqlen"], r["system"]) == (d, mode, n, system))
                if pts:
                    ax.plot(*zip(*pts), style, label=system)
            dense = [r for r in rows if (r["head_dim"], r["mode"], r["seqlen"], r["system"], r["density_nominal"])
                     == (d, mode, n, "cuflash", 1.0)]
            if dense:
                xs = np.linspace(0.05, 1.0, 20)
                ax.plot(xs, xs * dense[0]["ms"], color="grey", lw=0.8, label="density x dense")
            ax.set_title(f"d={d} {mode} N={n // 1024}k", fontsize=9)
            ax.set_xlabel("density")
            ax.set_ylabel("ms")
            ax.set_xscale("log")
            ax.set_yscale("log")
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- main --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", default="8192,16384,32768,65536")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--cudnn-max-seqlen", type=int, default=65536,
                    help="the dense (1, 1, N, N) bool mask is N^2 bytes (4 GiB at 64k)")
    ap.add_argument("--time-limit-s", type=float, default=180.0, help="after the checks; later points are skipped")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--selftest", action="store_true", help="no GPU: toy sizes on the CPU (float64 host path)")
    args = ap.parse_args(argv)

    device = "cpu" if args.selftest else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --selftest", file=sys.stderr)
        return 2
    dtype = torch.float64 if args.selftest else torch.bfloat16
    seqlens = [256, 512] if args.selftest else [int(x) for x in args.seqlens.split(",")]
    head_dims = [int(x) for x in args.head_dims.split(",")]
    heads = 2 if args.selftest else args.heads
    cudnn_fn = (lambda p, q, k, v: run_cudnn(p, q, k, v, "math")) if args.selftest else run_cudnn
    flex_fn = (lambda p, q, k, v: run_flex(p, q, k, v, compiled=False)) if args.selftest else run_flex
    systems = {"cuflash": run_cuflash, "flex_attention": flex_fn, "sdpa_cudnn": cudnn_fn}

    meta = {
        "git_commit": git_commit(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else f"CPU selftest ({platform.processor() or 'cpu'})",
        "torch": torch.__version__,
        "cuflash": getattr(cuflash, "__version__", "unknown"),
        "dtype": str(dtype).replace("torch.", ""),
        "batch": 1,
        "heads": heads,
        "block_size": [BLOCK, BLOCK],
        "pattern": "random rows shared by the heads: round(density * KB) key blocks per query-block row, diagonal kept",
        "timing": "CUDA events, median of >= 3 repeats filling ~60 ms after warm-up",
        "checks": {},
        "skipped": [],
        # cuflash's plain kernels (no block mask) at the density-1.0 points, ms: the block
        # mask's own overhead is rows' density-1.0 cuflash time over these.
        "cuflash_plain_dense": [],
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    ok = {}
    for name, fn in systems.items():
        for d in head_dims:
            why = check(name, fn, d, device, dtype, backward=not (args.selftest and name == "flex_attention"))
            meta["checks"][f"{name} d={d}"] = "ok" if why is None else why
            ok[(name, d)] = why is None
            print(f"check {name} d={d}: {'ok' if why is None else why}", flush=True)

    rows: list[dict] = []
    deadline = time.perf_counter() + args.time_limit_s
    # cuflash everywhere first (the baseline every ratio needs), then FlexAttention, then
    # cuDNN; each by increasing sequence length.
    for system in SYSTEMS:
        for n in seqlens:
            for d in head_dims:
                if not ok[(system, d)]:
                    meta["skipped"].append(f"{system} d={d} N={n}: failed its float64 check")
                    continue
                if system == "sdpa_cudnn" and n > args.cudnn_max_seqlen and not args.selftest:
                    meta["skipped"].append(f"sdpa_cudnn d={d} N={n}: dense mask over --cudnn-max-seqlen")
                    continue
                for density in DENSITIES:
                    if time.perf_counter() > deadline:
                        meta["skipped"].append(f"{system} d={d} N={n} density={density}: time limit")
                        continue
                    p = Problem(n, d, heads, density, device, dtype, seed=n + d)
                    for mode in MODES:
                        try:
                            ms = measure(systems[system], p, mode)
                        except Exception as exc:  # recorded, e.g. cuDNN refusing a mask, or out of memory
                            meta["skipped"].append(f"{system} d={d} N={n} density={density} {mode}: "
                                                   f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                            if device == "cuda":
                                torch.cuda.empty_cache()
                            continue
                        rows.append(dict(seqlen=n, head_dim=d, pattern="random", density=round(p.density, 4),
                                         density_nominal=density, mode=mode, system=system, ms=round(ms, 4)))
                        if system == "cuflash" and density == 1.0:
                            plain = measure(run_cuflash_plain, p, mode)
                            meta["cuflash_plain_dense"].append(dict(seqlen=n, head_dim=d, mode=mode, ms=round(plain, 4)))
                        print(f"{system:15s} d={d:3d} N={n:6d} density={p.density:.3f} {mode:8s} {ms:9.3f} ms",
                              flush=True)
                    del p
                    if device == "cuda":
                        torch.cuda.empty_cache()
                (out_dir / "blocksparse.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    (out_dir / "blocksparse.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    write_markdown(rows, meta, out_dir / "blocksparse.md")
    write_plot(rows, out_dir / "blocksparse.png")
    print(f"wrote {out_dir / 'blocksparse.json'} and blocksparse.md (and blocksparse.png with matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
