"""TFLOP/s against seqlen from bench.py's rows (matplotlib, Agg backend).

    python benchmarks/plot.py benchmarks/results/grid.json [extra.json ...] [--out DIR]

Rows of several runs are drawn together: the grid run's cuflash and SDPA rows with the
JAX rows of a run of the jax section, for instance. Plotting one run's JSON alone writes
only what it has (a jax-section run alone draws JAX lines without cuflash's).

One figure per mode for the 16-bit grid (tflops_fwd.png, tflops_bwd.png,
tflops_fwd_bwd.png): a panel per (dtype, causal) row and head-dim column, cuflash in
black, the anchors (SDPA backends, JAX) alongside. float32 rows go to one figure,
tflops_fp32.png, a panel row per mode. Few files on purpose: the GPU machine hands back at
most 8.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODES = ("fwd", "bwd", "fwd_bwd")
MODE_TITLE = {"fwd": "forward", "bwd": "backward", "fwd_bwd": "forward + backward"}
STYLE = {
    "cuflash": dict(color="black", linewidth=2.4, marker="o", zorder=5),
    "sdpa_flash": dict(color="tab:blue", marker="s"),
    "sdpa_cudnn": dict(color="tab:green", marker="^"),
    "sdpa_mem_efficient": dict(color="tab:orange", marker="v"),
    "sdpa_math": dict(color="tab:gray", marker="x"),
    "jax_cudnn": dict(color="tab:olive", marker="^", linestyle="--"),
    "jax_xla": dict(color="tab:purple", marker="d", linestyle="--"),
}


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullLocator

        return plt, NullLocator
    except ImportError:
        return None, None


def _label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _panel(ax, rows, title, null_locator):
    systems = [s for s in STYLE if any(r["system"] == s for r in rows)]
    systems += sorted({r["system"] for r in rows} - set(systems))
    seqlens = sorted({r["seqlen"] for r in rows})
    for system in systems:
        points = sorted((r["seqlen"], r["tflops"]) for r in rows if r["system"] == system)
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=system, **STYLE.get(system, {}))
    ax.set_xscale("log", base=2)
    ax.xaxis.set_minor_locator(null_locator())
    ax.set_xticks(seqlens)
    ax.set_xticklabels([_label(n) for n in seqlens])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)


def _save(plt, fig, axes, title, path):
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    order = [s for s in STYLE if s in handles] + sorted(set(handles) - set(STYLE))
    fig.legend([handles[s] for s in order], order, loc="lower center", ncol=min(len(order), 7), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rows(rows: list[dict], out_dir) -> list[Path]:
    """Write the figures for `rows` (bench.json's "rows") into out_dir; returns their paths."""
    plt, null_locator = _matplotlib()
    if plt is None:
        print("matplotlib is not installed: no plots (pip install matplotlib; bench.json has every number)")
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in rows if r.get("tflops") and r.get("section") in ("grid", "jax", "fp32")]
    paths = []
    sixteen = [r for r in rows if r["section"] in ("grid", "jax")]
    for mode in MODES:
        sel = [r for r in sixteen if r["mode"] == mode]
        if not sel:
            continue
        panel_rows = sorted({(r["dtype"], r["causal"]) for r in sel})
        dims = sorted({r["head_dim"] for r in sel})
        fig, axes = plt.subplots(len(panel_rows), len(dims), figsize=(4.4 * len(dims), 3.3 * len(panel_rows) + 0.6),
                                 squeeze=False)
        for i, (dtype, causal) in enumerate(panel_rows):
            for j, d in enumerate(dims):
                ax = axes[i][j]
                cell = [r for r in sel if r["dtype"] == dtype and r["causal"] == causal and r["head_dim"] == d]
                _panel(ax, cell, f"{dtype}, d={d}, {'causal' if causal else 'non-causal'}", null_locator)
                if j == 0:
                    ax.set_ylabel("TFLOP/s")
                if i == len(panel_rows) - 1:
                    ax.set_xlabel("seqlen (batch × seqlen = 16k tokens)")
        path = out / f"tflops_{mode}.png"
        _save(plt, fig, axes, f"{MODE_TITLE[mode]}: TFLOP/s (heads × head_dim = 2048)", path)
        paths.append(path)
    fp32 = [r for r in rows if r["section"] == "fp32"]
    if fp32:
        modes = [m for m in MODES if any(r["mode"] == m for r in fp32)]
        columns = sorted({(r["head_dim"], r["causal"]) for r in fp32})
        fig, axes = plt.subplots(len(modes), len(columns), figsize=(3.8 * len(columns), 3.1 * len(modes) + 0.6),
                                 squeeze=False)
        for i, mode in enumerate(modes):
            for j, (d, causal) in enumerate(columns):
                cell = [r for r in fp32 if r["mode"] == mode and r["head_dim"] == d and r["causal"] == causal]
                _panel(axes[i][j], cell, f"{MODE_TITLE[mode]}, d={d}, {'causal' if causal else 'non-causal'}",
                       null_locator)
                if j == 0:
                    axes[i][j].set_ylabel("TFLOP/s")
        path = out / "tflops_fp32.png"
        _save(plt, fig, axes, "float32: TFLOP/s", path)
        paths.append(path)
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench_json", nargs="+", help="bench.py's JSON files; their rows are drawn together")
    ap.add_argument("--out", help="folder for the figures (default: the first JSON's folder)")
    args = ap.parse_args()
    rows = [row for name in args.bench_json for row in json.loads(Path(name).read_text())["rows"]]
    for path in plot_rows(rows, args.out or Path(args.bench_json[0]).parent):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
