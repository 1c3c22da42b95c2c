"""FlashAttention-3's FP8 accuracy experiment, on the CPU, through the kernel emulation.

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

    python benchmarks/fp8_accuracy.py            # d 64/128, seqlen 1024/2048, 2 heads
"""

from __future__ import annotations

import argparse
import time

import ml_dtypes
import numpy as np

from cuflash import fp8, reference

METHODS = ("bf16", "fp8_per_tensor", "fp8_block", "fp8_block_hadamard")


def inputs(rng: np.random.Generator, shape: tuple[int, ...], outlier_fraction: float = 1e-3,
           outlier_std: float = 10.0) -> np.ndarray:
    x = rng.standard_normal(shape)
    outliers = rng.random(shape) < outlier_fraction
    x[outliers] = rng.normal(0.0, outlier_std, int(outliers.sum()))
    return x


def _bf16(x: np.ndarray) -> np.ndarray:
    return x.astype(ml_dtypes.bfloat16).astype(np.float64)


def method_output(method: str, q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool, seed: int) -> np.ndarray:
    if method == "bf16":
        out, _ = reference.forward(_bf16(q), _bf16(k), _bf16(v), causal=causal)
        return _bf16(out)
    if method == "fp8_block_hadamard":
        q, k = fp8.hadamard_transform(q, seed), fp8.hadamard_transform(k, seed)
    granularity = "tensor" if method == "fp8_per_tensor" else "block"
    quantized = [fp8.quantize(x, granularity) for x in (q, k, v)]
    (q8, dq), (k8, dk), (v8, dv) = quantized
    out, _ = fp8.emulate_forward(q8, k8, v8, dq, dk, dv, causal=causal)
    return _bf16(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--outlier-std", type=float, default=10.0, help="standard deviation of the outliers")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"{'head_dim':>8} {'seqlen':>6} {'causal':>6} " + " ".join(f"{m:>18}" for m in METHODS)
          + f" {'per_tensor/hadamard':>20} {'s':>5}")
    for head_dim in args.head_dims:
        for seqlen in args.seqlens:
            start = time.perf_counter()
            shape = (1, seqlen, args.heads, head_dim)
            q, k, v = (inputs(rng, shape, outlier_std=args.outlier_std) for _ in range(3))
            exact, _ = reference.forward(q, k, v, causal=args.causal)
            rmse = {}
            for method in METHODS:
                out = method_output(method, q, k, v, args.causal, seed=args.seed + 1)
                rmse[method] = float(np.sqrt(np.mean((out - exact) ** 2)))
            ratio = rmse["fp8_per_tensor"] / rmse["fp8_block_hadamard"]
            print(f"{head_dim:>8} {seqlen:>6} {args.causal!s:>6} " + " ".join(f"{rmse[m]:>18.3e}" for m in METHODS)
                  + f" {ratio:>20.2f} {time.perf_counter() - start:>5.1f}", flush=True)


if __name__ == "__main__":
    main()
