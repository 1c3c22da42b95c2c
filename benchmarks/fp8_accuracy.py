"""FlashAttention-3's FP8 accuracy experiment, on the CPU, through the kernel emulation,
and the design study behind the FP8 kernel's quantisation choices (benchmarks/NOTES.md
"FP8 accuracy in emulation").

q, k, v are drawn from N(0, 1) with 0.1 % of their entries replaced by draws from
N(0, 10) (standard deviation 10), and each method's output is compared with the float64
attention of the unquantised inputs (RMSE over every output element):

    bf16                 q, k, v rounded to bfloat16, exact attention, out rounded to bf16
    fp8_per_tensor       one e4m3 scale per tensor
    fp8_block            one scale per 128 rows of each (batch, head)
    fp8_block_hadamard   q and k through the seeded random Hadamard transform, then fp8_block

The FP8 methods run `cuflash.fp8.emulate_forward` (e4m3 operands, fp32 scores and
accumulators, P quantised to e4m3 as P * 256, 128-key tiles) and round out to bf16 as the
kernel will. This measures the arithmetic the FP8 kernel is specified to do, not a kernel:
the numbers for benchmarks/results/fp8.json come from the GPU kernel, and this script
writes no results file.

Design options (each changes the two block methods; --p-mode all three FP8 methods):

    --qk-block N      rows per q and k scale (1: one scale per row, token-wise)
    --p-mode MODE     how P is rounded for P V (cuflash.fp8.P_MODES)
    --v-scale G       v's scales: tensor, block (--v-block rows) or channel (one per
                      head_dim column of each (batch, head), applied in the epilogue)
    --v-hadamard      v through the Hadamard transform too (fp8_block_hadamard), its
                      inverse applied to out in float64 before the bf16 rounding
    --protocol fa3    FlashAttention-3's section 4.3 as written: outliers added
                      (N(0, 1) + N(0, 100) Bernoulli(0.001)), and fp8_per_tensor is the
                      "standard attention" baseline: per-tensor e4m3 q, k, v, fp32
                      matmul accumulators, the scores and softmax output kept in fp16,
                      P V from fp16 P and the dequantised v, out in fp16

    python benchmarks/fp8_accuracy.py            # d 64/128, seqlen 1024/2048, 2 heads
    python benchmarks/fp8_accuracy.py --qk-block 1 --p-mode e4m3_rowmax --v-scale channel
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from cuflash import fp8, reference

METHODS = ("bf16", "fp8_per_tensor", "fp8_block", "fp8_block_hadamard")


def inputs(rng: np.random.Generator, shape: tuple[int, ...], outlier_fraction: float = 1e-3,
           outlier_std: float = 10.0, added: bool = False) -> np.ndarray:
    """N(0, 1) entries, a fraction of them replaced by N(0, outlier_std**2) draws, or with
    such a draw added (FlashAttention-3's N(0, 1) + N(0, 100) Bernoulli(0.001))."""
    x = rng.standard_normal(shape)
    outliers = rng.random(shape) < outlier_fraction
    draws = rng.normal(0.0, outlier_std, int(outliers.sum()))
    if added:
        x[outliers] += draws
    else:
        x[outliers] = draws
    return x


def _bf16(x: np.ndarray) -> np.ndarray:
    return x.astype(ml_dtypes.bfloat16).astype(np.float64)


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float64)


@dataclass(frozen=True)
class Design:
    """The quantisation choices of the block methods (and P's of all FP8 methods)."""

    qk_block: int = fp8.BLOCK_ROWS
    p_mode: str = "e4m3"
    v_scale: str = "block"
    v_block: int = fp8.BLOCK_ROWS
    v_hadamard: bool = False
    protocol: str = "cuflash"


def quantize_channels(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """v (batch, seqlen, heads, d) to e4m3 with one scale per head_dim column of each
    (batch, head): (v8, descale (batch, heads, d) float32), v ≈ v8 * descale."""
    amax = np.abs(v).max(axis=1)  # (batch, heads, d)
    descale = (amax / fp8.E4M3_MAX).astype(np.float32)
    descale = np.where(descale > 0, descale, np.float32(1))
    scaled = np.clip(v / descale[:, None].astype(np.float64), -fp8.E4M3_MAX, fp8.E4M3_MAX)
    return scaled.astype(ml_dtypes.float8_e4m3fn), descale


def standard_attention_fp8(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool) -> np.ndarray:
    """FlashAttention-3's FP8 baseline as its section 4.3 describes it: per-tensor e4m3
    q, k, v; S = q kᵀ with an fp32 accumulator, scaled and stored in fp16; the softmax
    (in fp32) stored in fp16; P V with an fp32 accumulator; out in fp16. The text leaves
    open how P V is fed (an e4m3 matmul needs P in e4m3); "softmax results kept in fp16"
    is read literally: fp16 P against the dequantised v."""
    (q8, dq), (k8, dk), (v8, dv) = (fp8.quantize(x, "tensor") for x in (q, k, v))
    qh, kh, vh = (fp8.dequantize(x8, d).transpose(0, 2, 1, 3) for x8, d in ((q8, dq), (k8, dk), (v8, dv)))
    scale = np.float32(1 / np.sqrt(q.shape[-1]))
    s = _fp16(np.matmul(qh, np.swapaxes(kh, -1, -2)) * scale).astype(np.float32)
    if causal:
        sq, sk = s.shape[-2:]
        s = np.where(np.arange(sk)[None, :] <= np.arange(sq)[:, None] + (sk - sq), s, np.float32(-np.inf))
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    p = _fp16(e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    return _fp16(np.matmul(p, vh)).transpose(0, 2, 1, 3)


def method_output(method: str, q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool, seed: int,
                  design: Design = Design()) -> np.ndarray:
    if method == "bf16":
        out, _ = reference.forward(_bf16(q), _bf16(k), _bf16(v), causal=causal)
        return _bf16(out)
    if method == "fp8_per_tensor":
        if design.protocol == "fa3":
            return standard_attention_fp8(q, k, v, causal)
        (q8, dq), (k8, dk), (v8, dv) = (fp8.quantize(x, "tensor") for x in (q, k, v))
        out, _ = fp8.emulate_forward(q8, k8, v8, dq, dk, dv, causal=causal, p_mode=design.p_mode)
        return _bf16(out)
    v_hadamard = method == "fp8_block_hadamard" and design.v_hadamard
    if method == "fp8_block_hadamard":
        q, k = fp8.hadamard_transform(q, seed), fp8.hadamard_transform(k, seed)
        if v_hadamard:
            v = fp8.hadamard_transform(v, seed)
    (q8, dq), (k8, dk) = (fp8.quantize(x, "block", block_size=design.qk_block) for x in (q, k))
    channel = None
    if design.v_scale == "channel":
        (v8, channel), dv = quantize_channels(v), np.float32(1)
    elif design.v_scale == "block":
        v8, dv = fp8.quantize(v, "block", block_size=design.v_block)
    else:
        v8, dv = fp8.quantize(v, "tensor")
    out, _ = fp8.emulate_forward(q8, k8, v8, dq, dk, dv, causal=causal, block_size=design.qk_block,
                                 p_mode=design.p_mode, v_block_size=design.v_block, v_channel_descale=channel)
    if v_hadamard:
        # out = P (v M) = (P v) M: M's inverse is Mᵀ (orthogonal); the rows of the identity
        # through the transform are the rows of M.
        m = fp8.hadamard_transform(np.eye(q.shape[-1]), seed)
        out = out @ m.T
    return _bf16(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--outlier-std", type=float, default=10.0, help="standard deviation of the outliers")
    parser.add_argument("--qk-block", type=int, default=fp8.BLOCK_ROWS, help="rows per q and k scale (1: per row)")
    parser.add_argument("--p-mode", choices=fp8.P_MODES, default="e4m3")
    parser.add_argument("--v-scale", choices=("tensor", "block", "channel"), default="block")
    parser.add_argument("--v-block", type=int, default=fp8.BLOCK_ROWS, help="rows per v scale (--v-scale block)")
    parser.add_argument("--v-hadamard", action="store_true")
    parser.add_argument("--protocol", choices=("cuflash", "fa3"), default="cuflash")
    args = parser.parse_args()
    design = Design(args.qk_block, args.p_mode, args.v_scale, args.v_block, args.v_hadamard, args.protocol)
    print(f"# {design}", flush=True)
    rng = np.random.default_rng(args.seed)
    print(f"{'head_dim':>8} {'seqlen':>6} {'causal':>6} " + " ".join(f"{m:>18}" for m in METHODS)
          + f" {'per_tensor/hadamard':>20} {'s':>5}")
    for head_dim in args.head_dims:
        for seqlen in args.seqlens:
            start = time.perf_counter()
            shape = (1, seqlen, args.heads, head_dim)
            q, k, v = (inputs(rng, shape, outlier_std=args.outlier_std, added=args.protocol == "fa3") for _ in range(3))
            exact, _ = reference.forward(q, k, v, causal=args.causal)
            rmse = {}
            for method in METHODS:
                out = method_output(method, q, k, v, args.causal, seed=args.seed + 1, design=design)
                rmse[method] = float(np.sqrt(np.mean((out - exact) ** 2)))
            ratio = rmse["fp8_per_tensor"] / rmse["fp8_block_hadamard"]
            print(f"{head_dim:>8} {seqlen:>6} {args.causal!s:>6} " + " ".join(f"{rmse[m]:>18.3e}" for m in METHODS)
                  + f" {ratio:>20.2f} {time.perf_counter() - start:>5.1f}", flush=True)


if __name__ == "__main__":
    main()
