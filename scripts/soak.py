#!/usr/bin/env python3
"""Soak: many calls of random shapes, options and dtypes from two threads on two streams.

    python3 scripts/soak.py [--calls 100000] [--threads 2] [--check-every 500] [--json PATH]

Each thread draws calls (forward, attention, backward) over a fixed pool of problem
templates (so the plan cache sees repeats and new signatures alike) on its own CuPy
stream. Every `--check-every`-th call is checked against the float64 reference. At the end
it checks that device memory (CuPy's pool) and the plan cache stayed bounded, and prints
one JSON line with the counts. Exit status 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cuflash  # noqa: E402
from cuflash import _fast, reference  # noqa: E402
from cuflash._interop import BFLOAT16  # noqa: E402

OPTION_SETS = (
    {},
    {"causal": True},
    {"window_size": (16, 4)},
    {"softcap": 20.0},
    {"causal": True, "causal_alignment": "top_left"},
)


def _templates(rng, count: int):
    shapes = []
    for _ in range(count):
        heads_kv = int(rng.choice([1, 2]))
        shapes.append(dict(
            batch=int(rng.integers(1, 3)), seqlen_q=int(rng.integers(1, 130)), seqlen_k=int(rng.integers(1, 130)),
            heads=heads_kv * int(rng.choice([1, 2])), heads_kv=heads_kv,
            head_dim=int(rng.choice([32, 64, 80, 128])), dtype=(np.dtype(np.float16), BFLOAT16)[int(rng.integers(2))],
            options=OPTION_SETS[int(rng.integers(len(OPTION_SETS)))],
        ))
    return shapes


def _host(x) -> np.ndarray:
    import cupy

    return cupy.asnumpy(x.astype(np.float32)).astype(np.float64)


class Worker(threading.Thread):
    def __init__(self, index: int, calls: int, check_every: int, templates, seed: int):
        super().__init__(name=f"soak-{index}")
        self.calls, self.check_every, self.templates = calls, check_every, templates
        self.rng = np.random.default_rng(seed)
        self.checked = 0
        self.errors: list[str] = []

    def run(self) -> None:
        import cupy

        try:
            stream = cupy.cuda.Stream(non_blocking=True)
            with stream:
                inputs = []
                for t in self.templates:
                    shape_q = (t["batch"], t["seqlen_q"], t["heads"], t["head_dim"])
                    shape_k = (t["batch"], t["seqlen_k"], t["heads_kv"], t["head_dim"])
                    arrays = {n: cupy.asarray(self.rng.standard_normal(s).astype(np.float32)).astype(t["dtype"])
                              for n, s in (("q", shape_q), ("k", shape_k), ("v", shape_k), ("dout", shape_q))}
                    out, lse = cuflash.forward(arrays["q"], arrays["k"], arrays["v"], **t["options"])
                    arrays["out"], arrays["lse"] = out, lse
                    inputs.append(arrays)
                for call in range(self.calls):
                    i = int(self.rng.integers(len(self.templates)))
                    t, a = self.templates[i], inputs[i]
                    kind = call % 3
                    if kind == 0:
                        result = cuflash.forward(a["q"], a["k"], a["v"], **t["options"])[0]
                    elif kind == 1:
                        result = cuflash.attention(a["q"], a["k"], a["v"], **t["options"])
                    else:
                        result = cuflash.backward(a["dout"], a["q"], a["k"], a["v"], a["out"], a["lse"],
                                                  **t["options"])[0]
                    if call % self.check_every == 0:
                        stream.synchronize()
                        self._check(kind, t, a, result)
                stream.synchronize()
        except Exception as exc:  # noqa: BLE001 - reported, and the soak fails
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def _check(self, kind: int, t, a, result) -> None:
        q, k, v, dout = (_host(a[n]) for n in ("q", "k", "v", "dout"))
        if kind < 2:
            want, _ = reference.forward(q, k, v, **t["options"])
        else:
            want = reference.backward(dout, q, k, v, _host(a["out"]), _host(a["lse"]), **t["options"])[0]
        got = _host(result)
        scale = max(float(np.abs(want).max(initial=0.0)), 1e-3)
        # 16-bit inputs and outputs: errors of a few 1e-3 of the largest value; 3e-2 flags wrong results.
        err = float(np.abs(got - want).max(initial=0.0)) / scale
        self.checked += 1
        if not np.all(np.isfinite(got)) or err > 3e-2:
            self.errors.append(f"call kind {kind} {t}: error {err:.3e} (finite={np.all(np.isfinite(got))})")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=100_000, help="calls in all, over every thread")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--templates", type=int, default=40)
    ap.add_argument("--check-every", type=int, default=500)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import cupy

    rng = np.random.default_rng()
    templates = _templates(rng, args.templates)
    pool = cupy.get_default_memory_pool()
    start = time.time()
    # A short warm-up sizes the steady state: compiled variants loaded, first plans made.
    warm = [Worker(i, 300, 10**9, templates, int(rng.integers(2**31))) for i in range(args.threads)]
    for w in warm:
        w.start()
    for w in warm:
        w.join()
    cupy.cuda.runtime.deviceSynchronize()
    steady_bytes = pool.total_bytes()
    workers = [Worker(i, args.calls // args.threads, args.check_every, templates, int(rng.integers(2**31)))
               for i in range(args.threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    cupy.cuda.runtime.deviceSynchronize()
    end_bytes = pool.total_bytes()
    errors = [e for w in warm + workers for e in w.errors]
    plans = len(_fast._plans)
    # Bounded: the pool may grow by what two threads' outputs in flight can hold, not with the call count.
    memory_ok = end_bytes <= 2 * steady_bytes + 256 * 2**20
    plans_ok = plans <= _fast._MAX_PLANS
    summary = {
        "calls": sum(w.calls for w in workers), "threads": args.threads, "templates": len(templates),
        "checked": sum(w.checked for w in workers), "errors": len(errors), "first_errors": errors[:5],
        "pool_bytes_steady": steady_bytes, "pool_bytes_end": end_bytes, "memory_bounded": memory_ok,
        "plans": plans, "plans_bounded": plans_ok, "seconds": round(time.time() - start, 1),
    }
    summary["passed"] = not errors and memory_ok and plans_ok and summary["checked"] > 0
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
