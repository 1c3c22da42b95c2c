"""Host (CPU) cost per attention call through cuflash.torch, against SDPA's.

    python benchmarks/host_cost.py            # on a GPU: real calls on tiny CUDA tensors
    python benchmarks/host_cost.py --stub     # anywhere: the Python path on a plan-cache hit,
                                              # with the plan's launch replaced by a stub

Inputs are tiny (batch 1, 12 heads, 64 tokens, head dim 64; q, k, v head-transposed views
of one fused projection, as a model passes them), so the GPU work of a call is a few
microseconds and the loop measures the host: wall time per call over a loop of calls,
best of --repeats loops (the least disturbed by other processes; with --stub the thread's
CPU time, which other processes on a shared machine disturb less). Paths:

  eager fwd / fwd+bwd       cuflash.torch.scaled_dot_product_attention, autograd on
  op fwd / op bwd           torch.ops.cuflash.attention_fwd / attention_bwd .default,
                            positional, as torch.compile's generated code calls them
  compiled fwd / fwd+bwd    torch.compile of a function making one call (backend inductor
                            on a GPU, aot_eager with --stub)
  sdpa ...                  the same with torch.nn.functional.scaled_dot_product_attention
                            (not with --stub: on the CPU, SDPA's times are its compute)

With --stub, the core's plan cache treats the CPU tensors as device arrays and its `run`
(CuPy device context, stream, output allocation, record repointing, kernel launches) is
replaced by a lookup that returns preallocated outputs: what remains is cuflash's own
Python on a cache hit, the part the adapter and the cache key decide. Results are
printed and written to --out (JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import cuflash.torch as ct  # noqa: E402
from cuflash import _fast  # noqa: E402

B, H, T, D = 1, 12, 64, 64


def stub_plan_cache() -> None:
    """Make the plan cache take CPU tensors and answer every lookup with a hit."""
    library = _fast._library_of(torch.Tensor)
    _fast._libraries[torch.Tensor] = dataclasses.replace(
        library, signature=lambda t: (t.shape, t.stride(), t.dtype, t.device, True))
    outputs: dict = {}

    def run(key, arrays, seed):
        found = outputs.get(key)
        if found is None:
            q = arrays[0] if key[0] == "forward" else arrays[1]
            if key[0] == "forward":
                found = (torch.empty(q.shape), torch.empty(q.shape[0], q.shape[2], q.shape[1]))
            else:
                found = tuple(torch.empty(a.shape) for a in arrays[1:4])
            outputs[key] = found
        return found

    _fast.run = run


def per_call_us(fn, calls: int, repeats: int, sync, clock=time.perf_counter) -> float:
    for _ in range(max(calls // 10, 20)):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        for _ in range(calls):
            fn()
        sync()
        best = min(best, (clock() - t0) / calls * 1e6)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stub", action="store_true")
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--skip-compiled", action="store_true")
    args = ap.parse_args(argv)

    if args.stub:
        stub_plan_cache()
        device, dtype, backend = "cpu", torch.float32, "aot_eager"
    else:
        if not torch.cuda.is_available():
            print("host_cost: no GPU here; use --stub", file=sys.stderr)
            return 2
        device, dtype, backend = "cuda", torch.bfloat16, "inductor"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    # On a shared CPU the thread's own CPU time, not the wall clock, is the stable measure.
    clock = time.perf_counter if device == "cuda" else time.thread_time
    g = torch.Generator(device=device).manual_seed(0)
    fused = torch.randn(B, T, 3 * H * D, device=device, dtype=dtype, generator=g)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2).detach().requires_grad_() for t in fused.split(H * D, dim=2))
    dout = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=g).transpose(1, 2)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    results: dict = {"device": device, "stub": args.stub, "shape": [B, H, T, D], "us_per_call": {}}

    def record(name, fn, calls=args.calls):
        results["us_per_call"][name] = round(per_call_us(fn, calls, args.repeats, sync, clock), 2)
        print(f"{name:28s} {results['us_per_call'][name]:8.1f} us", flush=True)

    # With --stub the tensors are on the CPU, where SDPA computes: its times there are not host cost.
    systems = (("cuflash", ct.scaled_dot_product_attention),) + (
        () if args.stub else (("sdpa", F.scaled_dot_product_attention),))
    for system, attention in systems:
        record(f"{system} eager fwd", lambda attention=attention: attention(q, k, v, is_causal=True))
        record(f"{system} eager fwd+bwd",
               lambda attention=attention: torch.autograd.grad(attention(q, k, v, is_causal=True), (q, k, v), dout),
               args.calls // 2)
    op_args = (qd, kd, vd, None, None, None, None, None, None, None, True, "top_left", -1, -1, 0.0, 0.0, None, None,
               False, "bhsd")
    out, lse = torch.ops.cuflash.attention_fwd.default(*op_args)
    with torch.no_grad():
        record("cuflash op fwd", lambda: torch.ops.cuflash.attention_fwd.default(*op_args))
        record("cuflash op bwd", lambda: torch.ops.cuflash.attention_bwd.default(dout, *op_args[:3], out, lse,
                                                                                 *op_args[3:], False))
    if not args.skip_compiled:
        for system, attention in systems:
            torch._dynamo.reset()
            compiled = torch.compile(lambda a, b, c, attention=attention: attention(a, b, c, is_causal=True),
                                     backend=backend)
            record(f"{system} compiled fwd", lambda compiled=compiled: compiled(q, k, v))
            record(f"{system} compiled fwd+bwd",
                   lambda compiled=compiled: torch.autograd.grad(compiled(q, k, v), (q, k, v), dout), args.calls // 2)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
