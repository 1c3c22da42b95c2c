"""cuflash against the anchors, in one process on one GPU.

    python benchmarks/bench.py                          # every section (sized for < 8 min on an H200)
    python benchmarks/bench.py --quick                  # bf16 grid, seqlen 1k and 4k, fwd and fwd+bwd
    python benchmarks/bench.py --sections grid,jax      # some of: grid, fp32, memory, features, jax
    python benchmarks/bench.py --selftest               # no GPU: every section at toy sizes on the CPU

Sections (run in this order whatever the order given; JAX last because its allocator keeps
what it takes):

  grid      bf16 and fp16, head dims 64/128/256, causal and not, seqlen 512..16k with
            batch x seqlen = 16k tokens and heads x head_dim = 2048; fwd, bwd, fwd+bwd.
            cuflash against PyTorch SDPA with one backend forced: flash (FlashAttention-2),
            cuDNN, memory-efficient, and math up to seqlen 4k (--math-max-seqlen).
  fp32      float32, head dims 64/128, seqlen 1k and 4k: cuflash, SDPA memory-efficient, math.
  features  seqlen 4k, batch 4, 16 heads, d=128, bf16, fwd and fwd+bwd: sliding windows,
            ALiBi, softcap, key-padding mask, dense bias with its gradient, dropout, varlen;
            against cuflash's own plain path and SDPA wherever SDPA can express the feature.
  memory    peak memory of one fwd and one fwd+bwd of each system at seqlen 16k and 64k
            (batch 1, 16 heads, d=128, bf16, causal), and cuflash at seqlen 128k (8 heads).
  jax       jax.nn.dot_product_attention, implementation "cudnn" and "xla", jit-compiled,
            bf16, on the grid's head dims at seqlen 1k/4k/16k (--jax-seqlens), fwd and fwd+bwd.

Method: triton.testing.do_bench medians (warm-up 25 ms, 100 ms of repeats; it flushes L2
before each repeat); inputs are random normal (never zeros) and rotated among 3 copies;
every cuflash configuration, each feature included, is checked against the float64
reference (cuflash.reference) on a small problem of the same variant before it is timed,
and is not timed if the check fails. FLOPs: forward 4·B·H·Nq·Nk·d (halved when causal),
backward 2.5x, forward+backward 3.5x. Ratios are cuflash / anchor in TFLOP/s (above 1:
cuflash is faster). Results in --out (default benchmarks/results): bench.json (every
number and the environment), bench.md (the tables), tflops_<mode>.png and tflops_fp32.png
(benchmarks/plot.py; also runs on its own on a bench.json). bench.json and bench.md are
rewritten after each section, so a run cut short keeps what it measured. Points left
after --time-limit-s (default 420 s after the kernels are built) are skipped and listed.
"""

from __future__ import annotations

import os

# JAX and PyTorch share the GPU in this process: JAX must not take 75% of it when it starts.
os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import cuflash  # noqa: E402
from cuflash import reference  # noqa: E402

SECTIONS = ("grid", "fp32", "features", "memory", "jax")  # the order they run in
MODES = ("fwd", "bwd", "fwd_bwd")
MODE_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
SDPA_SYSTEMS = ("sdpa_flash", "sdpa_cudnn", "sdpa_mem_efficient", "sdpa_math")
JAX_SYSTEMS = ("jax_cudnn", "jax_xla")
SYSTEM_ORDER = ("cuflash",) + SDPA_SYSTEMS + JAX_SYSTEMS
TOLERANCE = {"bf16": 0.05, "fp16": 0.05, "fp32": 0.01}  # max |err| / max |ref| against float64
GIB = 2.0**30

DEV = "cuda"  # "cpu" only in --selftest, where cuflash takes its float64 host path


@dataclasses.dataclass
class Plan:
    """What to run. The defaults are the full benchmark; --quick and --selftest shrink it."""

    sections: tuple[str, ...] = SECTIONS
    dtypes: tuple[str, ...] = ("bf16", "fp16")
    head_dims: tuple[int, ...] = (64, 128, 256)
    seqlens: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
    modes: tuple[str, ...] = MODES
    systems: tuple[str, ...] = ("cuflash",) + SDPA_SYSTEMS
    tokens: int = 16384  # batch * seqlen
    hidden: int = 2048  # heads * head_dim
    math_max_seqlen: int = 4096
    fp32_head_dims: tuple[int, ...] = (64, 128)
    fp32_seqlens: tuple[int, ...] = (1024, 4096)
    fp32_systems: tuple[str, ...] = ("cuflash", "sdpa_mem_efficient", "sdpa_math")
    feature_shape: tuple[int, int, int, int] = (4, 4096, 16, 128)  # batch, seqlen, heads, head_dim
    feature_modes: tuple[str, ...] = ("fwd", "fwd_bwd")
    varlen_lengths: tuple[int, ...] = (4096, 512, 2048, 3072, 1024, 1536, 2560, 1536)  # 16384 tokens
    memory_seqlens: tuple[int, ...] = (16384, 65536)
    memory_heads: int = 16
    memory_head_dim: int = 128
    long_seqlen: int = 131072
    long_heads: int = 8
    jax_seqlens: tuple[int, ...] = (1024, 4096, 16384)
    jax_modes: tuple[str, ...] = ("fwd", "fwd_bwd")
    check_seqlen: int = 257  # the small problem each grid variant is checked on (batch 1, 2 heads)
    feature_check: tuple[int, int, int] = (2, 577, 2)  # batch, seqlen, heads of the feature checks
    varlen_check_lengths: tuple[int, ...] = (100, 257, 64, 156)
    copies: int = 3
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    time_limit_s: float = 420.0  # points past this are skipped (and listed), so a run always reports
    prebuild: bool = True


# ---- small helpers ---------------------------------------------------------------------------


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def flops(b: int, h: int, nq: int, nk: int, d: int, causal: bool, mode: str) -> float:
    return MODE_FLOPS[mode] * 4 * b * h * nq * nk * d / (2 if causal else 1)


def sync() -> None:
    import torch

    if DEV == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    import torch

    text = str(exc)
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    return isinstance(exc, oom_types) or "out of memory" in text.lower() or "RESOURCE_EXHAUSTED" in text


def error_text(exc: BaseException, caught: list | None = None) -> str:
    if is_oom(exc):
        return "OOM"
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"
    # SDPA says why a forced backend cannot run in warnings, not in the exception.
    reasons = [re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", str(w.message)).strip() for w in (caught or [])]
    reasons = [r.splitlines()[0][:160] for r in reasons if r]
    if reasons:
        text += " | " + "; ".join(dict.fromkeys(reasons))
    return text[:600]


class Rotation:
    """0, 1, ..., n-1, 0, ...: which copy of the inputs the next call uses."""

    def __init__(self, n: int):
        self.n, self.i = n, -1

    def __call__(self) -> int:
        self.i = (self.i + 1) % self.n
        return self.i


class Deadline:
    def __init__(self, limit_s: float):
        self.start, self.limit_s, self.warned = time.time(), limit_s, False

    def elapsed(self) -> float:
        return time.time() - self.start

    def over(self, what: str, state: dict) -> bool:
        if not self.limit_s or self.elapsed() < self.limit_s:
            return False
        if not self.warned:
            print(f"!! time limit of {self.limit_s:.0f} s reached: skipping the remaining points "
                  "(listed under 'skipped' in bench.json; raise --time-limit-s to run them)", flush=True)
            self.warned = True
        state["skipped"].append(what)
        return True


def bench_ms(fn: Callable[[], Any], plan: Plan) -> float:
    """Median milliseconds of fn()."""
    if DEV == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=plan.warmup_ms, rep=plan.rep_ms, return_mode="median"))
    times = []  # CPU self-test only: a plain wall clock
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def peak_delta(fn: Callable[[], Any]) -> int | None:
    """Bytes allocated at the peak of one call of fn, beyond what was allocated before it
    (its results included). PyTorch's allocator: cuflash's torch path allocates through it."""
    import torch

    if DEV != "cuda":
        fn()
        return None
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    sync()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return int(peak)


class Stopwatch:
    """Device time between marks (CUDA events; a wall clock on the CPU)."""

    def __init__(self):
        self.marks: list[Any] = []

    def mark(self) -> None:
        import torch

        if DEV == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def ms(self, a: int, b: int) -> float:
        sync()
        if DEV == "cuda":
            return float(self.marks[a].elapsed_time(self.marks[b]))
        return (self.marks[b] - self.marks[a]) * 1e3


def measure(make_fn: Callable[[], Callable[[], Any]], flop_count: float, plan: Plan, peak: bool = False) -> dict:
    """{"ms", "tflops"[, "peak_bytes"]} of the step make_fn() builds, or {"error"} saying why
    it could not run ("OOM" when out of memory)."""
    caught: list = []
    fn = None
    result: dict = {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn = make_fn()
            fn()  # first call: compiles, plans and loads outside the timing
            sync()
        ms = bench_ms(fn, plan)
        result = {"ms": ms, "tflops": flop_count / ms / 1e9}
        if peak:
            result["peak_bytes"] = peak_delta(fn)
    except Exception as exc:  # noqa: BLE001 - a system that cannot run the point is recorded, not fatal
        result = {"error": error_text(exc, caught)}
    fn = None
    if "error" in result:
        free_memory()
    return result


def _short(r: dict, key: str = "tflops", fmt: str = "{:.0f}") -> str:
    if key in r and r[key] is not None:
        return fmt.format(r[key])
    return "OOM" if r.get("error") == "OOM" else "n/a"


def to_host(x: Any) -> Any:
    """Torch tensors as NumPy arrays for the float64 reference (floats as float64)."""
    import torch

    if not isinstance(x, torch.Tensor):
        return x
    x = x.detach().cpu()
    if x.is_floating_point():
        x = x.to(torch.float64)
    return x.numpy()


def random_inputs(shape: tuple[int, ...], dtype_name: str, copies: int, seed: int):
    """copies of (q, k, v, dout), standard normal."""
    import torch

    gen = torch.Generator(device=DEV).manual_seed(seed)
    dtype = torch_dtype(dtype_name)

    def draw():
        return [torch.randn(shape, device=DEV, dtype=dtype, generator=gen) for _ in range(copies)]

    return draw(), draw(), draw(), draw()


# ---- the float64 check -----------------------------------------------------------------------


def check_against_float64(q, k, v, dout, opts: dict, dtype_name: str) -> dict:
    """cuflash's out, dq, dk, dv (and dbias when a bias is given) on this small problem
    against cuflash.reference in float64, with the same options. Returns
    {"ok", "max_rel_err", "errors": {output: max |err| / max |ref|}} or {"ok": False, "error"}."""
    try:
        out, lse = cuflash.forward(q, k, v, **opts)
        grads = cuflash.backward(dout, q, k, v, out, lse, **opts)  # compute_dbias: on
        host_opts = {name: to_host(value) for name, value in opts.items()}
        q64, k64, v64, dout64 = (to_host(t) for t in (q, k, v, dout))
        ref_out, ref_lse = reference.forward(q64, k64, v64, **host_opts)
        ref_grads = reference.backward(dout64, q64, k64, v64, ref_out, ref_lse, **host_opts)
        errors = {}
        for name, got, want in zip(("out", "dq", "dk", "dv", "dbias"), (out, *grads), (ref_out, *ref_grads)):
            got = to_host(got)
            errors[name] = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-9))
        worst = max(errors.values())
        ok = bool(np.isfinite(worst)) and worst <= TOLERANCE[dtype_name]
        return {"ok": ok, "max_rel_err": worst, "errors": errors}
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "error": error_text(exc)}


def record_check(state: dict, label: str, dtype_name: str, result: dict) -> dict:
    state["checks"].append({"label": label, "dtype": dtype_name, "tolerance": TOLERANCE[dtype_name], **result})
    if not result["ok"]:
        why = result.get("error") or f"errors {result['errors']} above {TOLERANCE[dtype_name]}"
        print(f"!! float64 check FAILED for {label}: {why}; cuflash is not timed there", flush=True)
    return result


def check_failed_row(result: dict) -> dict:
    return {"error": "float64 check failed: " + (result.get("error") or f"max rel err {result['max_rel_err']:.3g}")}


# ---- one timed step per system ------------------------------------------------------------------


def cuflash_step(mode: str, qs, ks, vs, dos, opts: list[dict], bwd_opts: dict | None = None):
    """A call of cuflash on the next copy of the inputs. opts: one option dict per copy."""
    rot, bwd_opts = Rotation(len(qs)), dict(bwd_opts or {})
    if mode == "fwd":
        def fwd():
            i = rot()
            return cuflash.forward(qs[i], ks[i], vs[i], **opts[i])

        return fwd
    saved = [cuflash.forward(qs[i], ks[i], vs[i], **opts[i]) for i in range(len(qs))] if mode == "bwd" else None

    def step():
        i = rot()
        out, lse = saved[i] if saved is not None else cuflash.forward(qs[i], ks[i], vs[i], **opts[i])
        return cuflash.backward(dos[i], qs[i], ks[i], vs[i], out, lse, **opts[i], **bwd_opts)

    return step


def sdpa_backend(system: str):
    from torch.nn.attention import SDPBackend

    return {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa_mem_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH}[system]


def sdpa_step(system: str, mode: str, qs, ks, vs, dos, kws: list[dict], mask_grad: bool = False):
    """torch.nn.functional.scaled_dot_product_attention with one backend forced, on the next
    copy. Inputs are (B, N, H, D); SDPA gets (B, H, N, D) views of them (what FlashAttention-2
    reads natively). kws: SDPA keywords per copy (is_causal, attn_mask, dropout_p);
    mask_grad: the float attn_mask is a bias whose gradient the backward computes."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    backend = sdpa_backend(system)
    grad = mode != "fwd"
    qt = [x.transpose(1, 2).detach().requires_grad_(grad) for x in qs]
    kt = [x.transpose(1, 2).detach().requires_grad_(grad) for x in ks]
    vt = [x.transpose(1, 2).detach().requires_grad_(grad) for x in vs]
    dot = [x.transpose(1, 2) for x in dos]
    kws = [dict(kw) for kw in kws]
    leaves = [[qt[i], kt[i], vt[i]] for i in range(len(qs))]
    if grad and mask_grad:
        for i, kw in enumerate(kws):
            kw["attn_mask"] = kw["attn_mask"].detach().requires_grad_(True)
            leaves[i].append(kw["attn_mask"])
    rot = Rotation(len(qs))

    def fwd(i):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt[i], kt[i], vt[i], **kws[i])

    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fwd(rot())
    elif mode == "fwd_bwd":
        def step():
            i = rot()
            return torch.autograd.grad(fwd(i), leaves[i], dot[i])  # fresh gradients: no accumulation
    else:
        outs = [fwd(i) for i in range(len(qs))]

        def step():
            i = rot()
            return torch.autograd.grad(outs[i], leaves[i], dot[i], retain_graph=True)
    return step


def jax_step(jax, impl: str, mode: str, qs, ks, vs, dos, causal: bool):
    """jax.nn.dot_product_attention, jit-compiled, on the next copy. do_bench's CUDA events
    live on PyTorch's stream, JAX runs on its own: the step first waits for PyTorch's stream
    (do_bench's L2 flush and start event), then blocks until JAX's results are ready, so
    the events bracket JAX's work (plus one host round trip)."""
    import torch

    def attn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)

    if mode == "fwd":
        f = jax.jit(attn)

        def call(i):
            return f(qs[i], ks[i], vs[i])
    elif mode == "fwd_bwd":
        def fwd_bwd(q, k, v, dout):
            out, pull = jax.vjp(attn, q, k, v)
            return (out, *pull(dout))

        f = jax.jit(fwd_bwd)

        def call(i):
            return f(qs[i], ks[i], vs[i], dos[i])
    else:
        forward = jax.jit(attn)
        pulls = [jax.vjp(forward, qs[i], ks[i], vs[i])[1] for i in range(len(qs))]
        f = jax.jit(lambda pull, dout: pull(dout))  # the pullback is a pytree (jax.tree_util.Partial)

        def call(i):
            return f(pulls[i], dos[i])

    rot = Rotation(len(qs))

    def step():
        if DEV == "cuda":
            torch.cuda.current_stream().synchronize()
        return jax.block_until_ready(call(rot()))

    return step


# ---- grid and fp32 ----------------------------------------------------------------------------


def run_grid(plan: Plan, state: dict, deadline: Deadline, section: str) -> None:
    """The TFLOP/s grid (section "grid") or its float32 rows (section "fp32")."""
    if section == "fp32":
        dtypes, head_dims, seqlens, systems = ("fp32",), plan.fp32_head_dims, plan.fp32_seqlens, plan.fp32_systems
    else:
        dtypes, head_dims, seqlens, systems = plan.dtypes, plan.head_dims, plan.seqlens, plan.systems
    for dtype_name in dtypes:
        for d in head_dims:
            for causal in (False, True):
                check = None
                if "cuflash" in systems:
                    q, k, v, do = (x[0] for x in random_inputs((1, plan.check_seqlen, 2, d), dtype_name, 1, 7 + d))
                    check = record_check(state, f"{section} {dtype_name} d={d} causal={int(causal)}", dtype_name,
                                         check_against_float64(q, k, v, do, dict(causal=causal), dtype_name))
                for seqlen in seqlens:
                    label = f"{section} {dtype_name} d={d} causal={int(causal)} n={seqlen}"
                    if deadline.over(label, state):
                        continue
                    b, h = plan.tokens // seqlen, plan.hidden // d
                    qs, ks, vs, dos = random_inputs((b, seqlen, h, d), dtype_name, plan.copies, seqlen + d + causal)
                    line = []
                    for system in systems:
                        if system == "sdpa_math" and seqlen > plan.math_max_seqlen:
                            continue
                        cells = []
                        for mode in plan.modes:
                            if system == "cuflash" and not check["ok"]:
                                r = check_failed_row(check)
                            elif system == "cuflash":
                                opts = [dict(causal=causal)] * plan.copies
                                r = measure(lambda: cuflash_step(mode, qs, ks, vs, dos, opts),
                                            flops(b, h, seqlen, seqlen, d, causal, mode), plan)
                                r["check_rel_err"] = check["max_rel_err"]
                            else:
                                kws = [dict(is_causal=causal)] * plan.copies
                                r = measure(lambda: sdpa_step(system, mode, qs, ks, vs, dos, kws),  # noqa: B023
                                            flops(b, h, seqlen, seqlen, d, causal, mode), plan)
                            state["rows"].append(dict(section=section, dtype=dtype_name, head_dim=d, causal=causal,
                                                      seqlen=seqlen, batch=b, heads=h, system=system, mode=mode, **r))
                            cells.append(_short(r))
                        line.append(f"{system}=" + "/".join(cells))
                    print(f"{label} [{'/'.join(plan.modes)} TFLOP/s]: " + " ".join(line), flush=True)
                    qs = ks = vs = dos = None  # frees them now


# ---- features -------------------------------------------------------------------------------


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's geometric slopes (Press et al.): 2^(-8k/h), k = 1..h, for h a power of two;
    otherwise those of the power of two below h, then every other slope of the one above."""
    def power_of_two(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    low = 2 ** int(math.floor(math.log2(heads)))
    slopes = power_of_two(low)
    if low < heads:
        slopes += power_of_two(2 * low)[0::2][: heads - low]
    return slopes


@dataclasses.dataclass(frozen=True)
class Feature:
    """One feature row: how to build its options for any (batch, seqlen, heads) and what SDPA
    runs as its anchor. build(b, n, h, d, dtype_name, gen, copy) -> (cuflash options,
    SDPA keywords or None, extra cuflash.backward keywords)."""

    name: str
    causal: bool
    what: str
    anchors: tuple[str, ...]
    anchor_note: str
    build: Callable[..., tuple[dict, dict | None, dict]] | None = None
    varlen: bool = False
    mask_grad: bool = False


def _causal_window_mask(n: int, left: int):
    import torch

    i = torch.arange(n, device=DEV)
    return ((i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - left))[None, None]


def _plain(causal):
    return lambda b, n, h, d, dt, gen, copy: (dict(causal=causal), dict(is_causal=causal), {})


def _window(left):
    def build(b, n, h, d, dt, gen, copy):
        return dict(causal=True, window_size=(left, 0)), dict(attn_mask=_causal_window_mask(n, left)), {}
    return build


def _alibi(b, n, h, d, dt, gen, copy):
    import torch

    slopes = torch.tensor(alibi_slopes(h), dtype=torch.float32, device=DEV)
    i = torch.arange(n, device=DEV)
    bias = -slopes[:, None, None] * (i[:, None] - i[None, :]).abs().to(torch.float32)[None]
    bias = bias.masked_fill(i[None, :] > i[:, None], float("-inf")).to(torch_dtype(dt))[None]  # (1, H, N, N)
    return dict(causal=True, alibi_slopes=slopes), dict(attn_mask=bias), {}


def _softcap(b, n, h, d, dt, gen, copy):
    return dict(causal=True, softcap=30.0), None, {}


def _key_padding(b, n, h, d, dt, gen, copy):
    """The last 5%..15% of each sequence's keys are padding (10% on average)."""
    import torch

    fractions = [0.1 * (0.5 + (i / (b - 1) if b > 1 else 0.5)) for i in range(b)]
    lengths = torch.tensor([n - round(n * f) for f in fractions], device=DEV)
    mask = (torch.arange(n, device=DEV)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, N)
    return dict(mask=mask), dict(attn_mask=mask), {}


def _bias(b, n, h, d, dt, gen, copy):
    import torch

    bias = torch.randn(b, h, n, n, device=DEV, dtype=torch_dtype(dt), generator=gen)
    return dict(bias=bias), dict(attn_mask=bias), dict(compute_dbias=True)


def _dropout(b, n, h, d, dt, gen, copy):
    return dict(dropout_p=0.1, seed=1234 + copy), dict(dropout_p=0.1), {}


FEATURES = (
    Feature("plain", False, "no feature", ("sdpa_flash", "sdpa_cudnn", "sdpa_mem_efficient"),
            "SDPA, is_causal=False", _plain(False)),
    Feature("plain_causal", True, "causal", ("sdpa_flash", "sdpa_cudnn", "sdpa_mem_efficient"),
            "SDPA, is_causal=True", _plain(True)),
    Feature("window_256", True, "causal, window_size=(256, 0)", ("sdpa_cudnn", "sdpa_mem_efficient"),
            "SDPA has no window: the equivalent dense bool attn_mask (1, 1, N, N), full N×N work", _window(256)),
    Feature("window_4096", True, "causal, window_size=(4096, 0)", ("sdpa_cudnn", "sdpa_mem_efficient"),
            "SDPA has no window: the equivalent dense bool attn_mask (1, 1, N, N)", _window(4096)),
    Feature("alibi", True, "causal, ALiBi slopes 2^(-8k/H)", ("sdpa_cudnn", "sdpa_mem_efficient"),
            "SDPA has no ALiBi: float attn_mask (1, H, N, N) = -slope·|i-j|, -inf above the diagonal", _alibi),
    Feature("softcap", True, "causal, softcap=30", (), "SDPA has no softcap", _softcap),
    Feature("key_padding", False, "bool mask (B, 1, 1, N), 10% of keys padded", ("sdpa_cudnn", "sdpa_mem_efficient"),
            "SDPA: the same bool attn_mask", _key_padding),
    Feature("bias", False, "float bias (B, H, N, N), bf16, with its gradient", ("sdpa_cudnn", "sdpa_mem_efficient"),
            "SDPA: attn_mask=bias with requires_grad (gradient computed)", _bias, mask_grad=True),
    Feature("dropout", False, "dropout_p=0.1", ("sdpa_flash", "sdpa_cudnn", "sdpa_mem_efficient"),
            "SDPA: dropout_p=0.1", _dropout),
    Feature("varlen", True, "causal, 8 sequences of 512..4096 tokens, 16k in all", (),
            "SDPA has no varlen (packed) batches", varlen=True),
)


def attended_pairs(feature: Feature, b: int, n: int, lengths: tuple[int, ...]) -> float:
    """Query-key pairs per head that count as work: N² (N²/2 causal, as in the grid), the
    exact count for a causal window narrower than the sequence, Σ L² (/2) for varlen."""
    if feature.varlen:
        return sum(length * length for length in lengths) / (2 if feature.causal else 1)
    if feature.name.startswith("window_"):
        left = int(feature.name.split("_")[1])
        if left < n - 1:
            return b * float(sum(min(i, left) + 1 for i in range(n)))
    return b * n * n / (2 if feature.causal else 1)


def varlen_inputs(lengths: tuple[int, ...], h: int, d: int, dt: str, copies: int, seed: int, causal: bool):
    import torch

    total = sum(lengths)
    qs, ks, vs, dos = random_inputs((total, h, d), dt, copies, seed)
    cu = torch.tensor(np.cumsum((0,) + tuple(lengths)), dtype=torch.int32, device=DEV)
    opts = dict(causal=causal, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths))
    return qs, ks, vs, dos, [opts] * copies


def run_features(plan: Plan, state: dict, deadline: Deadline) -> None:
    for feature in FEATURES:
        if deadline.over(f"features {feature.name}", state):
            continue
        try:
            run_feature(plan, state, feature)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory building a feature's inputs
            state["notes"].append(f"feature {feature.name} stopped early: {error_text(exc)}")
            print(f"features {feature.name}: stopped early: {error_text(exc)}", flush=True)
        free_memory()


def run_feature(plan: Plan, state: dict, feature: Feature) -> None:
    """Check one feature against float64 on a small problem, then time it (and its SDPA
    anchors) at the feature shape."""
    import torch

    b, n, h, d = plan.feature_shape
    dt = "bf16"
    cb, cn, ch = plan.feature_check
    gen = torch.Generator(device=DEV).manual_seed(11)
    if feature.varlen:
        q, k, v, do, opts = varlen_inputs(plan.varlen_check_lengths, ch, d, dt, 1, 13, feature.causal)
        q, k, v, do, opts = q[0], k[0], v[0], do[0], opts[0]
    else:
        q, k, v, do = (x[0] for x in random_inputs((cb, cn, ch, d), dt, 1, 13))
        opts = feature.build(cb, cn, ch, d, dt, gen, 0)[0]
    check = record_check(state, f"features {feature.name}", dt, check_against_float64(q, k, v, do, opts, dt))
    q = k = v = do = opts = None  # frees them now

    if feature.varlen:
        qs, ks, vs, dos, cu_opts = varlen_inputs(plan.varlen_lengths, h, d, dt, plan.copies, 17, feature.causal)
        built = [(o, None, {}) for o in cu_opts]
        pairs = attended_pairs(feature, 1, 0, plan.varlen_lengths)
    else:
        qs, ks, vs, dos = random_inputs((b, n, h, d), dt, plan.copies, 17)
        built = [feature.build(b, n, h, d, dt, gen, i) for i in range(plan.copies)]
        pairs = attended_pairs(feature, b, n, ())
    cu_opts = [x[0] for x in built]
    kws = [x[1] for x in built]
    bwd_opts = built[0][2]
    line = []
    for mode in plan.feature_modes:
        flop = MODE_FLOPS[mode] * 4 * h * d * pairs
        want_peak = mode == "fwd_bwd"
        for system in ("cuflash",) + feature.anchors:
            if system == "cuflash" and not check["ok"]:
                r = check_failed_row(check)
            elif system == "cuflash":
                r = measure(lambda: cuflash_step(mode, qs, ks, vs, dos, cu_opts, bwd_opts), flop, plan,  # noqa: B023
                            peak=want_peak)
                r["check_rel_err"] = check["max_rel_err"]
            else:
                r = measure(lambda: sdpa_step(system, mode, qs, ks, vs, dos, kws,  # noqa: B023
                                              mask_grad=feature.mask_grad), flop, plan, peak=want_peak)
            state["features"].append(dict(feature=feature.name, what=feature.what, causal=feature.causal,
                                          anchor_note=feature.anchor_note, batch=b if not feature.varlen else 1,
                                          seqlen=n, heads=h, head_dim=d, dtype=dt, system=system, mode=mode,
                                          pairs=pairs, **r))
            line.append(f"{system}:{mode}=" + _short(r, "ms", "{:.2f}ms"))
    print(f"features {feature.name}: " + " ".join(line), flush=True)


# ---- memory ---------------------------------------------------------------------------------


def one_shot(make_fn: Callable[[], Callable[[], Any]], repeat_below_ms: float = 2000.0) -> dict:
    """Peak memory beyond the inputs and the time of one call; a call that took under
    repeat_below_ms is repeated and the second (warm) call reported."""
    caught: list = []
    result: dict = {}
    fn = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn = make_fn()
            for _ in range(2):
                free_memory()
                watch = Stopwatch()

                def timed():
                    watch.mark()
                    out = fn()
                    watch.mark()
                    return out

                peak = peak_delta(timed)
                ms = watch.ms(0, 1)
                result = {"ms": ms, "peak_bytes": peak}
                if ms >= repeat_below_ms:
                    break
    except Exception as exc:  # noqa: BLE001
        result = {"error": error_text(exc, caught)}
    fn = None
    free_memory()
    return result


def run_memory(plan: Plan, state: dict, deadline: Deadline) -> None:
    d, h, dt = plan.memory_head_dim, plan.memory_heads, "bf16"
    q, k, v, do = (x[0] for x in random_inputs((1, 257, 2, d), dt, 1, 19))
    check = record_check(state, f"memory bf16 d={d} causal=1", dt,
                         check_against_float64(q, k, v, do, dict(causal=True), dt))
    for n in plan.memory_seqlens:
        if deadline.over(f"memory n={n}", state):
            continue
        qs, ks, vs, dos = random_inputs((1, n, h, d), dt, 1, 23)
        input_bytes = 4 * qs[0].numel() * qs[0].element_size()
        line = []
        for system in ("cuflash",) + SDPA_SYSTEMS:
            for mode in ("fwd", "fwd_bwd"):
                if system == "cuflash" and not check["ok"]:
                    r = check_failed_row(check)
                elif system == "cuflash":
                    r = one_shot(lambda: cuflash_step(mode, qs, ks, vs, dos, [dict(causal=True)]))  # noqa: B023
                else:
                    r = one_shot(lambda: sdpa_step(system, mode, qs, ks, vs, dos, [dict(is_causal=True)]))  # noqa: B023
                if "ms" in r:
                    r["tflops"] = flops(1, h, n, n, d, True, mode) / r["ms"] / 1e9
                state["memory"].append(dict(system=system, mode=mode, seqlen=n, batch=1, heads=h, head_dim=d,
                                            dtype=dt, causal=True, input_bytes=input_bytes, **r))
                peak = r.get("peak_bytes")
                line.append(f"{system}:{mode}=" + (f"{peak / GIB:.2f}GiB" if peak is not None else _short(r)))
        print(f"memory n={n}: " + " ".join(line), flush=True)
        qs = ks = vs = dos = None  # frees them now
        free_memory()
    run_long(plan, state, check, deadline)


def run_long(plan: Plan, state: dict, check: dict, deadline: Deadline) -> None:
    """cuflash forward + backward at seqlen 128k on one GPU: time, peak memory, finite outputs."""
    import torch

    n, h, d, dt = plan.long_seqlen, plan.long_heads, plan.memory_head_dim, "bf16"
    if deadline.over(f"memory long n={n}", state):
        return
    entry: dict = dict(seqlen=n, batch=1, heads=h, head_dim=d, dtype=dt, causal=True)
    if not check["ok"]:
        state["long"] = {**entry, **check_failed_row(check)}
        return
    try:
        qs, ks, vs, dos = random_inputs((1, n, h, d), dt, 1, 29)
        q, k, v, do = qs[0], ks[0], vs[0], dos[0]
        entry["input_bytes"] = 4 * q.numel() * q.element_size()
        free_memory()
        watch = Stopwatch()
        results: list = []

        def fwd_bwd():
            watch.mark()
            out, lse = cuflash.forward(q, k, v, causal=True)
            watch.mark()
            grads = cuflash.backward(do, q, k, v, out, lse, causal=True)
            watch.mark()
            results.extend((out, lse, *grads))
            return results

        entry["peak_bytes"] = peak_delta(fwd_bwd)
        entry["fwd_ms"], entry["bwd_ms"] = watch.ms(0, 1), watch.ms(1, 2)
        entry["fwd_tflops"] = flops(1, h, n, n, d, True, "fwd") / entry["fwd_ms"] / 1e9
        entry["bwd_tflops"] = flops(1, h, n, n, d, True, "bwd") / entry["bwd_ms"] / 1e9
        # Checked after the peak was read: the checks allocate.
        entry["finite"] = bool(all(bool(torch.isfinite(t).all()) for t in results))
        q = k = v = do = qs = ks = vs = dos = results = None  # frees them now
    except Exception as exc:  # noqa: BLE001
        entry["error"] = error_text(exc)
    state["long"] = entry
    free_memory()
    print("memory long: " + json.dumps(entry), flush=True)


# ---- jax ------------------------------------------------------------------------------------


def import_jax():
    """(jax, None) when JAX has a GPU here (any device in the CPU self-test), else (None, why)."""
    try:
        import jax

        devices = jax.devices() if DEV == "cpu" else jax.devices("gpu")
        if not devices:
            return None, "JAX sees no GPU"
        return jax, None
    except Exception as exc:  # noqa: BLE001
        return None, f"JAX has no GPU here ({error_text(exc)})"


def run_jax(plan: Plan, state: dict, deadline: Deadline) -> None:
    free_memory()  # hand PyTorch's cached blocks back so that JAX can use them
    jax, why = import_jax()
    if jax is None:
        print(f"jax: skipped: {why}", flush=True)
        state["notes"].append(f"jax section skipped: {why}")
        return
    import jax.numpy as jnp

    state["meta"]["jax_devices"] = [str(x) for x in jax.devices()]
    seqlens = plan.jax_seqlens
    for d in sorted(plan.head_dims, key=lambda d: (d != 128, d)):  # d=128 first: ANCHORS.md's JAX point
        for causal in (False, True):
            for seqlen in seqlens:
                label = f"jax bf16 d={d} causal={int(causal)} n={seqlen}"
                if deadline.over(label, state):
                    continue
                b, h = plan.tokens // seqlen, plan.hidden // d
                keys = jax.random.split(jax.random.key(seqlen + d + causal), 4 * plan.copies)
                arrays = [jax.random.normal(key, (b, seqlen, h, d), dtype=jnp.bfloat16) for key in keys]
                qs, ks, vs, dos = (arrays[j::4] for j in range(4))
                line = []
                for impl in ("cudnn", "xla"):
                    cells = []
                    for mode in plan.jax_modes:
                        r = measure(lambda: jax_step(jax, impl, mode, qs, ks, vs, dos, causal),  # noqa: B023
                                    flops(b, h, seqlen, seqlen, d, causal, mode), plan)
                        state["rows"].append(dict(section="jax", dtype="bf16", head_dim=d, causal=causal, seqlen=seqlen,
                                                  batch=b, heads=h, system=f"jax_{impl}", mode=mode, **r))
                        cells.append(_short(r))
                    line.append(f"jax_{impl}=" + "/".join(cells))
                print(f"{label} [{'/'.join(plan.jax_modes)} TFLOP/s]: " + " ".join(line), flush=True)
                arrays = qs = ks = vs = dos = None  # frees them now


# ---- prebuild -------------------------------------------------------------------------------


def _compile_one(job):
    from cuflash import _build

    variant, arch = job
    try:
        return variant.tag, _build.build(variant, arch)[1], None
    except Exception as exc:  # noqa: BLE001
        return variant.tag, 0.0, f"{type(exc).__name__}: {str(exc)[:300]}"


def needed_variants(plan: Plan, limit: int, arch: str | None = None) -> list:
    """The kernel variants (forward and backward) the planned sections launch."""
    from cuflash import _tiles
    from cuflash._interop import BFLOAT16

    np_dtype = {"bf16": BFLOAT16, "fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32)}
    wanted = set()
    s = plan.sections
    if "grid" in s:
        wanted |= {(dt, d, False) for dt in plan.dtypes for d in plan.head_dims}
    if "fp32" in s:
        wanted |= {("fp32", d, False) for d in plan.fp32_head_dims}
    if "features" in s:  # window and varlen use the plain kernels, the other features the general ones
        wanted |= {("bf16", plan.feature_shape[3], general) for general in (False, True)}
    if "memory" in s:
        wanted.add(("bf16", plan.memory_head_dim, False))
    variants = set()
    for dt, d, general in wanted:
        variants.add(_tiles.forward_variant(np_dtype[dt], d, general, limit, arch)[0])
        try:
            plan = _tiles.backward_variant(np_dtype[dt], d, general, limit, arch)
        except _tiles.UnsupportedConfig:
            continue
        variants.add(plan.variant)
        if plan.dkdv_variant is not None:
            variants.add(plan.dkdv_variant)
    return sorted(variants, key=lambda v: v.tag)


def compile_variants(variants: list, arch: str) -> dict:
    """Compile the variants not yet in cuflash's cubin cache, in parallel processes (NVRTC
    needs no GPU; spawned, so that no child inherits the parent's CUDA context)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from cuflash import _build

    missing = [v for v in variants if not _build.cubin_path(v, arch).is_file()]
    start = time.time()
    failures = []
    if missing:
        workers = max(1, min(len(missing), os.cpu_count() or 2))
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for tag, _seconds, error in pool.map(_compile_one, [(v, arch) for v in missing]):
                if error:
                    failures.append(f"{tag}: {error}")
    return dict(arch=arch, variants=len(variants), compiled=len(missing), seconds=round(time.time() - start, 1),
                failures=failures)


def prebuild(plan: Plan) -> dict:
    """Compile the kernel variants the run needs before anything is timed (they would
    otherwise compile one by one on first use)."""
    import torch

    from cuflash import _build, _launch

    device = torch.cuda.current_device()
    arch, limit = _build.arch_of(device), _launch.smem_limit(device)
    info = compile_variants(needed_variants(plan, limit, arch), arch)
    print(f"prebuild: {info}", flush=True)
    return info


# ---- environment ----------------------------------------------------------------------------


COMMIT: str | None = None  # set by --commit


def environment() -> dict:
    import importlib.metadata as md
    import platform

    import torch

    env: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "argv": sys.argv[1:],
                 "python": platform.python_version(), "cuflash": cuflash.__version__}
    for name in ("torch", "triton", "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "cupy-cuda13x",
                 "cupy-cuda12x", "cupy", "numpy", "ml_dtypes", "matplotlib"):
        try:
            env[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    if COMMIT:  # --commit: the copy being measured may carry stale git metadata
        env["git_commit"] = COMMIT
    else:
        try:
            env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE.parent, capture_output=True,
                                               text=True, timeout=10).stdout.strip() or None
        except Exception:  # noqa: BLE001
            env["git_commit"] = None
    if DEV != "cuda":
        env["gpu"] = "none (CPU self-test: cuflash runs its float64 host path)"
        return env
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
               gpu_memory_gib=round(p.total_memory / GIB, 1), torch_cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version())
    try:
        import cupy

        from cuflash import _build

        env["nvrtc"] = ".".join(map(str, _build.nvrtc_version()))
        env["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
        env["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
    except Exception as exc:  # noqa: BLE001
        env["nvrtc"] = f"unavailable ({exc})"
    try:
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return env


# ---- reports --------------------------------------------------------------------------------


def _seq(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _gib(x) -> str:
    return "—" if x is None else f"{x / GIB:.2f}"


def _cell(r: dict | None, mine: float | None = None) -> str:
    if r is None:
        return "—"
    if "error" in r:
        return "OOM" if r["error"] == "OOM" else "n/a"
    text = f"{r['tflops']:.0f}"
    if mine:
        text += f" ({mine / r['tflops']:.2f}×)"
    return text


def _not_run_notes(rows: list[dict], where: Callable[[dict], str]) -> list[str]:
    """One line per (system, reason) a backend gave for refusing points, with where."""
    reasons: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if "error" in r and r["error"] != "OOM":
            places = reasons.setdefault((r["system"], r["error"][:300]), [])
            if where(r) not in places:
                places.append(where(r))
    lines = []
    for (system, text), places in sorted(reasons.items()):
        shown = ", ".join(places[:8]) + (f" and {len(places) - 8} more" if len(places) > 8 else "")
        lines.append(f"- n/a, {system} ({shown}): {text}")
    return lines


def _systems_in(rows: list[dict]) -> list[str]:
    present = {r["system"] for r in rows}
    return [s for s in SYSTEM_ORDER if s in present] + sorted(present - set(SYSTEM_ORDER))


def tflops_table(rows: list[dict], title: str) -> str:
    """Every (dtype, d, causal, mode, seqlen): TFLOP/s of each system, cuflash / anchor in ()."""
    if not rows:
        return ""
    anchors = [s for s in _systems_in(rows) if s != "cuflash"]
    index = {(r["dtype"], r["head_dim"], r["causal"], r["mode"], r["seqlen"], r["system"]): r for r in rows}
    keys = sorted({k[:5] for k in index}, key=lambda k: (k[0], k[1], k[2], MODES.index(k[3]), k[4]))
    lines = [f"### {title}", "", "TFLOP/s; in parentheses cuflash / anchor (above 1: cuflash faster). "
             "OOM: out of memory; n/a: the backend refuses the point (reasons below); —: not run.", "",
             "| dtype | d | causal | mode | seqlen | cuflash | " + " | ".join(anchors) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(anchors)]
    for key in keys:
        mine_row = index.get(key + ("cuflash",))
        mine = mine_row.get("tflops") if mine_row else None
        cells = [_cell(index.get(key + (a,)), mine) for a in anchors]
        lines.append(f"| {key[0]} | {key[1]} | {int(key[2])} | {key[3]} | {_seq(key[4])} | {_cell(mine_row)} | "
                     + " | ".join(cells) + " |")
    notes = _not_run_notes(rows, lambda r: f"{r['dtype']} d={r['head_dim']} {r['mode']}")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def headline_table(rows: list[dict]) -> str:
    """cuflash / sdpa_flash and cuflash / sdpa_cudnn (TFLOP/s ratios) for fwd and fwd+bwd at
    seqlen >= 1k: the targets of ANCHORS.md."""
    rows = [r for r in rows if r.get("section") == "grid" and r["seqlen"] >= 1024 and r["mode"] in ("fwd", "fwd_bwd")]
    if not rows:
        return ""
    index = {(r["dtype"], r["head_dim"], r["causal"], r["mode"], r["seqlen"], r["system"]): r.get("tflops")
             for r in rows}
    seqlens = sorted({r["seqlen"] for r in rows})
    lines = ["### Headline: cuflash / SDPA flash (FlashAttention-2) and cuflash / SDPA cuDNN", "",
             "TFLOP/s ratios, each cell `vs flash / vs cuDNN` (above 1: cuflash faster; target 1: ≥ 1.0 vs flash).", "",
             "| dtype | d | causal | mode | " + " | ".join(_seq(n) for n in seqlens)
             + " | min vs flash | min vs cuDNN |",
             "|---|---|---|---|" + "---|" * len(seqlens) + "---|---|"]
    tally = {"sdpa_flash": [0, 0], "sdpa_cudnn": [0, 0]}
    groups = sorted({(r["dtype"], r["head_dim"], r["causal"], r["mode"]) for r in rows},
                    key=lambda g: (g[0], g[1], g[2], MODES.index(g[3])))
    for group in groups:
        cells, mins = [], {"sdpa_flash": [], "sdpa_cudnn": []}
        for n in seqlens:
            mine = index.get(group + (n, "cuflash"))
            parts = []
            for anchor in ("sdpa_flash", "sdpa_cudnn"):
                theirs = index.get(group + (n, anchor))
                if mine and theirs:
                    ratio = mine / theirs
                    mins[anchor].append(ratio)
                    tally[anchor][0] += ratio >= 1.0
                    tally[anchor][1] += 1
                    parts.append(f"{ratio:.2f}")
                else:
                    parts.append("–")
            cells.append(" / ".join(parts))
        lows = [f"{min(mins[a]):.2f}" if mins[a] else "–" for a in ("sdpa_flash", "sdpa_cudnn")]
        lines.append(f"| {group[0]} | {group[1]} | {int(group[2])} | {group[3]} | " + " | ".join(cells)
                     + f" | {lows[0]} | {lows[1]} |")
    lines += ["", f"cuflash ≥ SDPA flash at {tally['sdpa_flash'][0]} of {tally['sdpa_flash'][1]} points; "
              f"≥ SDPA cuDNN at {tally['sdpa_cudnn'][0]} of {tally['sdpa_cudnn'][1]}."]
    return "\n".join(lines) + "\n"


def memory_table(mem_rows: list[dict], long: dict | None) -> str:
    if not mem_rows and not long:
        return ""
    lines = ["### Peak memory", ""]
    if mem_rows:
        r0 = mem_rows[0]
        lines += [f"torch.cuda.max_memory_allocated beyond the inputs (Q, K, V, dO) during one call, results "
                  f"included; batch 1, {r0['heads']} heads, d={r0['head_dim']}, {r0['dtype']}, causal. "
                  "fwd: forward only (no autograd graph). ms: that call (the second of two when under 2 s). "
                  "JAX is not measured here (its allocator is not PyTorch's).", "",
                  "| system | seqlen | inputs GiB | fwd peak GiB | fwd+bwd peak GiB | fwd+bwd ms | fwd+bwd TFLOP/s |",
                  "|---|---|---|---|---|---|---|"]
        index = {(r["system"], r["seqlen"], r["mode"]): r for r in mem_rows}
        for n in sorted({r["seqlen"] for r in mem_rows}):
            for system in _systems_in([r for r in mem_rows if r["seqlen"] == n]):
                f, fb = index.get((system, n, "fwd"), {}), index.get((system, n, "fwd_bwd"), {})

                def peak(r):
                    if "error" in r:
                        return "OOM" if r["error"] == "OOM" else "n/a"
                    return _gib(r.get("peak_bytes"))

                inputs = (f or fb).get("input_bytes")
                ms = f"{fb['ms']:.1f}" if "ms" in fb else "—"
                tf = f"{fb['tflops']:.0f}" if "tflops" in fb else "—"
                lines.append(f"| {system} | {_seq(n)} | {_gib(inputs)} | {peak(f)} | {peak(fb)} | {ms} | {tf} |")
        notes = _not_run_notes(mem_rows, lambda r: f"{_seq(r['seqlen'])} {r['mode']}")
        if notes:
            lines += [""] + notes
    if long:
        what = (f"seqlen {_seq(long['seqlen'])} on one GPU (cuflash, batch 1, {long['heads']} heads, "
                f"d={long['head_dim']}, {long['dtype']}, causal)")
        if "error" in long:
            lines += ["", f"**{what}: failed: {long['error']}**"]
        else:
            lines += ["", f"**{what}:** forward {long['fwd_ms']:.0f} ms ({long['fwd_tflops']:.0f} TFLOP/s), backward "
                      f"{long['bwd_ms']:.0f} ms ({long['bwd_tflops']:.0f} TFLOP/s); "
                      f"peak {_gib(long.get('peak_bytes'))} "
                      f"GiB beyond the inputs ({_gib(long.get('input_bytes'))} GiB); outputs and gradients finite: "
                      f"{'yes' if long.get('finite') else 'NO'}."]
    return "\n".join(lines) + "\n"


def feature_table(feat_rows: list[dict]) -> str:
    if not feat_rows:
        return ""
    r0 = feat_rows[0]
    anchors = [s for s in _systems_in(feat_rows) if s != "cuflash"]
    index = {(r["feature"], r["mode"], r["system"]): r for r in feat_rows}
    order = list(dict.fromkeys(r["feature"] for r in feat_rows))
    lines = ["### Features", "",
             f"batch {r0['batch']}, seqlen {_seq(r0['seqlen'])}, {r0['heads']} heads, d={r0['head_dim']}, "
             f"{r0['dtype']}. "
             "TFLOP/s counts attended pairs (N²; N²/2 causal; exact for a window narrower than N; Σ L² for varlen). "
             "× plain: cuflash time / cuflash time without the feature (same causal flag). Anchor cells: ms "
             "(anchor time / cuflash time: above 1, cuflash faster); fwd+bwd rows add the peak memory in GiB.", "",
             "| feature | causal | mode | cuflash ms | TFLOP/s | × plain | cuflash peak GiB | "
             + " | ".join(anchors) + " | SDPA anchor |",
             "|---|---|---|---|---|---|---|" + "---|" * len(anchors) + "---|"]
    plain_for = {False: "plain", True: "plain_causal"}
    for name in order:
        for mode in MODES:
            mine = index.get((name, mode, "cuflash"))
            if mine is None:
                continue
            ok = "ms" in mine
            base = index.get((plain_for[mine["causal"]], mode, "cuflash"), {})
            rel = f"{mine['ms'] / base['ms']:.2f}" if ok and "ms" in base else "—"
            cells = []
            for a in anchors:
                r = index.get((name, mode, a))
                if r is None:
                    cells.append("—")
                elif "error" in r:
                    cells.append("OOM" if r["error"] == "OOM" else "n/a")
                else:
                    cell = f"{r['ms']:.2f}" + (f" ({r['ms'] / mine['ms']:.2f}×)" if ok else "")
                    if r.get("peak_bytes") is not None:
                        cell += f", {_gib(r['peak_bytes'])}"
                    cells.append(cell)
            ms = f"{mine['ms']:.2f}" if ok else ("OOM" if mine.get("error") == "OOM" else "n/a")
            tf = f"{mine['tflops']:.0f}" if ok else "—"
            lines.append(f"| {name} ({mine['what']}) | {int(mine['causal'])} | {mode} | {ms} | {tf} | {rel} | "
                         f"{_gib(mine.get('peak_bytes'))} | " + " | ".join(cells) + f" | {mine['anchor_note']} |")
    notes = _not_run_notes(feat_rows, lambda r: f"{r['feature']} {r['mode']}")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def checks_summary(checks: list[dict]) -> str:
    if not checks:
        return ""
    failed = [c for c in checks if not c["ok"]]
    worst = max((c.get("max_rel_err", 0.0) for c in checks if c["ok"]), default=float("nan"))
    lines = [f"Float64 checks before timing: {len(checks) - len(failed)} of {len(checks)} passed "
             f"(worst passing max |err| / max |ref|: {worst:.3g})."]
    for c in failed:
        lines.append(f"- FAILED {c['label']}: {c.get('error') or c.get('errors')}")
    return "\n".join(lines) + "\n"


def env_line(meta: dict) -> str:
    keys = ("gpu", "torch", "triton", "jax", "jaxlib", "cupy-cuda13x", "cupy-cuda12x", "cupy", "nvrtc", "cudnn",
            "git_commit")
    return ", ".join(f"{k} {meta[k]}" for k in keys if meta.get(k) is not None)


def markdown_report(state: dict) -> str:
    meta = state["meta"]
    rows = state["rows"]
    parts = [f"## cuflash benchmark\n\n{env_line(meta)}. Sections: {', '.join(meta.get('sections', []))}; "
             f"{meta.get('seconds', '?')} s.\n", checks_summary(state["checks"])]
    if state["skipped"]:
        parts.append(f"**Skipped at the time limit ({len(state['skipped'])} points):** "
                     + ", ".join(state["skipped"][:20]) + (" …" if len(state["skipped"]) > 20 else "") + "\n")
    parts += [f"- {note}\n" for note in state["notes"]]
    parts.append(headline_table(rows))
    sixteen = [r for r in rows if r.get("section") in ("grid", "jax")]
    parts.append(tflops_table(sixteen, "TFLOP/s, 16-bit (batch × seqlen = 16k tokens, heads × head_dim = 2048)"))
    parts.append(tflops_table([r for r in rows if r.get("section") == "fp32"],
                              "TFLOP/s, float32 (SDPA's flash and cuDNN backends take no float32)"))
    parts.append(memory_table(state["memory"], state.get("long")))
    parts.append(feature_table(state["features"]))
    return "\n".join(p for p in parts if p)


def write_reports(state: dict, out: Path, plots: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state["meta"]["seconds"] = round(time.time() - state["started"], 1)
    payload = {k: v for k, v in state.items() if k != "started"}
    (out / "bench.json").write_text(json.dumps(payload, indent=1, default=str))
    (out / "bench.md").write_text(markdown_report(state))
    if plots:
        import plot

        for path in plot.plot_rows(state["rows"], out):
            print(f"plot: {path}", flush=True)


# ---- main -----------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def make_plan(args: argparse.Namespace) -> Plan:
    plan = Plan()
    if args.quick:
        plan = dataclasses.replace(plan, sections=("grid",), dtypes=("bf16",), seqlens=(1024, 4096),
                                   modes=("fwd", "fwd_bwd"), systems=("cuflash", "sdpa_flash", "sdpa_cudnn",
                                                                      "sdpa_mem_efficient"),
                                   jax_seqlens=(1024, 4096), time_limit_s=0.0)
    changes: dict[str, Any] = {}
    if args.sections:
        sections = _names(args.sections)
        unknown = sorted(set(sections) - set(SECTIONS))
        if unknown:
            raise SystemExit(f"--sections: unknown {unknown}; choose from {','.join(SECTIONS)}")
        changes["sections"] = tuple(s for s in SECTIONS if s in sections)
    for name, conv in (("dtypes", _names), ("head_dims", _ints), ("seqlens", _ints), ("modes", _names),
                       ("systems", _names), ("jax_seqlens", _ints), ("jax_modes", _names)):
        value = getattr(args, name)
        if value:
            changes[name] = conv(value)
    for name in ("warmup_ms", "rep_ms", "math_max_seqlen", "time_limit_s"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.no_prebuild:
        changes["prebuild"] = False
    plan = dataclasses.replace(plan, **changes)
    bad = [m for m in plan.modes + plan.jax_modes if m not in MODES]
    bad += [s for s in plan.systems if s not in ("cuflash",) + SDPA_SYSTEMS]
    bad += [t for t in plan.dtypes if t not in ("bf16", "fp16")]
    if bad:
        raise SystemExit(f"unknown values {bad}: modes {MODES}, systems cuflash,{','.join(SDPA_SYSTEMS)}, "
                         "dtypes bf16,fp16 (fp32 is its own section)")
    return plan


def run(plan: Plan, out: Path, plots: bool = True) -> dict:
    import torch

    state: dict = {"started": time.time(), "meta": {}, "plan": dataclasses.asdict(plan), "rows": [], "features": [],
                   "memory": [], "long": None, "checks": [], "skipped": [], "notes": []}
    state["meta"] = environment()
    state["meta"]["sections"] = list(plan.sections)
    print("environment: " + env_line(state["meta"]), flush=True)
    if DEV == "cuda" and plan.prebuild:
        try:
            state["meta"]["prebuild"] = prebuild(plan)
        except Exception as exc:  # noqa: BLE001 - kernels then compile on first use
            state["notes"].append(f"prebuild failed ({error_text(exc)}); kernels compiled on first use")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 anchors in true fp32 (PyTorch's default)
    deadline = Deadline(plan.time_limit_s)
    runners = {"grid": lambda: run_grid(plan, state, deadline, "grid"),
               "fp32": lambda: run_grid(plan, state, deadline, "fp32"),
               "features": lambda: run_features(plan, state, deadline),
               "memory": lambda: run_memory(plan, state, deadline),
               "jax": lambda: run_jax(plan, state, deadline)}
    for section in plan.sections:
        started = time.time()
        print(f"== {section}", flush=True)
        try:
            runners[section]()
        except Exception as exc:  # noqa: BLE001 - a broken section must not cost the others
            import traceback

            traceback.print_exc()
            state["notes"].append(f"section {section} stopped early: {error_text(exc)}")
            free_memory()
        state["meta"].setdefault("section_seconds", {})[section] = round(time.time() - started, 1)
        print(f"== {section}: {time.time() - started:.0f} s", flush=True)
        write_reports(state, out, plots=False)
    write_reports(state, out, plots=plots)
    return state


def selftest() -> int:
    """No GPU needed: (1) the reports and plots on synthetic rows; (2) every section at toy
    sizes on the CPU, where cuflash takes its float64 host path and SDPA's CPU kernels (flash,
    math) stand in; cuDNN and memory-efficient refuse and must show as n/a."""
    global DEV
    rng = np.random.default_rng(0)
    out = Path(tempfile.mkdtemp(prefix="cuflash-bench-selftest-"))
    state = synthetic_state(rng)
    text = markdown_report(state)
    (out / "synthetic.md").write_text(text)
    for needle in ("Headline", "| bf16 | 128 | 1 | fwd_bwd |", "Peak memory", "Features", "OOM", "n/a", "128k",
                   "jax_cudnn", "× plain"):
        assert needle in text, f"synthetic report lacks {needle!r}"
    import plot

    paths = plot.plot_rows(state["rows"], out / "synthetic")
    print(f"synthetic report: {out / 'synthetic.md'}; plots: {[str(p) for p in paths]}")

    # The parallel prebuild, for real (NVRTC needs no GPU), into a throw-away cache.
    from cuflash import _build, _tiles

    try:
        _build.nvrtc_version()
    except Exception as exc:  # noqa: BLE001
        print(f"prebuild not checked: no NVRTC here ({error_text(exc)})")
    else:
        os.environ["CUFLASH_CACHE_DIR"] = str(out / "cubins")
        variants = needed_variants(Plan(sections=("memory",)), _tiles.SMEM_LIMIT["sm_90"])
        info = compile_variants(variants, "sm_90")
        assert info["compiled"] == len(variants) == 2 and not info["failures"], info
        assert compile_variants(variants, "sm_90")["compiled"] == 0  # cached now
        print(f"prebuild: {info}")

    DEV = "cpu"
    plan = Plan(dtypes=("bf16", "fp16"), head_dims=(32, 64), seqlens=(64, 128), tokens=256, hidden=128,
                math_max_seqlen=64, fp32_head_dims=(32,), fp32_seqlens=(64,), feature_shape=(2, 96, 2, 32),
                varlen_lengths=(64, 32, 96), memory_seqlens=(64, 128), memory_heads=2, memory_head_dim=32,
                long_seqlen=256, long_heads=2, jax_seqlens=(64,), jax_modes=MODES, check_seqlen=33,
                feature_check=(2, 41, 2), varlen_check_lengths=(20, 33, 12), copies=2, time_limit_s=0.0,
                prebuild=False)
    state = run(plan, out / "cpu", plots=True)
    assert all(c["ok"] for c in state["checks"]), [c for c in state["checks"] if not c["ok"]]
    cuflash_rows = [r for r in state["rows"] + state["features"] if r["system"] == "cuflash"]
    assert cuflash_rows and all("ms" in r for r in cuflash_rows), [r for r in cuflash_rows if "ms" not in r]
    assert any(r["system"] == "sdpa_flash" and "ms" in r for r in state["rows"]), "SDPA flash (CPU) did not run"
    assert any(r["system"] == "sdpa_math" and "ms" in r for r in state["rows"]), "SDPA math did not run"
    assert any(r["system"] == "jax_xla" and "ms" in r for r in state["rows"]), "JAX xla did not run"
    assert state["long"] and state["long"].get("finite"), state["long"]
    assert {f.name for f in FEATURES} == {r["feature"] for r in state["features"] if r["system"] == "cuflash"}
    print((out / "cpu" / "bench.md").read_text())
    print(f"self-test passed; files in {out}")
    return 0


def synthetic_state(rng) -> dict:
    rows = []
    for section, dtypes, systems in (("grid", ("bf16", "fp16"), ("cuflash",) + SDPA_SYSTEMS),
                                     ("jax", ("bf16",), JAX_SYSTEMS),
                                     ("fp32", ("fp32",), ("cuflash", "sdpa_mem_efficient", "sdpa_math"))):
        for dt in dtypes:
            for d in ((64, 128, 256) if section != "fp32" else (64, 128)):
                for causal in (False, True):
                    for n in ((512, 1024, 2048, 4096, 8192, 16384) if section != "fp32" else (1024, 4096)):
                        for system in systems:
                            for mode in MODES:
                                r = dict(section=section, dtype=dt, head_dim=d, causal=causal, seqlen=n,
                                         batch=16384 // n, heads=2048 // d, system=system, mode=mode)
                                if system == "sdpa_math" and n > 4096:
                                    continue
                                if system == "sdpa_cudnn" and d == 256 and mode == "bwd":
                                    r["error"] = "RuntimeError: No available kernel. | cuDNN refuses d=256 here"
                                elif system == "jax_xla" and n == 16384:
                                    r["error"] = "OOM"
                                else:
                                    r["tflops"] = float(rng.uniform(50, 600))
                                    r["ms"] = 1.0
                                rows.append(r)
    memory = []
    for n in (16384, 65536):
        for system in ("cuflash",) + SDPA_SYSTEMS:
            for mode in ("fwd", "fwd_bwd"):
                r = dict(system=system, mode=mode, seqlen=n, batch=1, heads=16, head_dim=128, dtype="bf16",
                         causal=True, input_bytes=4 * n * 16 * 128 * 2)
                if system == "sdpa_math" and n == 65536:
                    r["error"] = "OOM"
                else:
                    r.update(ms=float(rng.uniform(10, 900)), peak_bytes=int(rng.uniform(1, 40) * GIB))
                    r["tflops"] = flops(1, 16, n, n, 128, True, mode) / r["ms"] / 1e9
                memory.append(r)
    features = []
    for f in FEATURES:
        for mode in ("fwd", "fwd_bwd"):
            for system in ("cuflash",) + f.anchors:
                r = dict(feature=f.name, what=f.what, causal=f.causal, anchor_note=f.anchor_note, batch=4, seqlen=4096,
                         heads=16, head_dim=128, dtype="bf16", system=system, mode=mode, pairs=1.0)
                if system == "sdpa_cudnn" and f.name == "bias" and mode == "fwd_bwd":
                    r["error"] = "RuntimeError: No available kernel. | cuDNN: attn_mask gradient unsupported"
                else:
                    r.update(ms=float(rng.uniform(0.5, 5)), tflops=float(rng.uniform(50, 400)))
                    if mode == "fwd_bwd":
                        r["peak_bytes"] = int(rng.uniform(0.1, 8) * GIB)
                features.append(r)
    long = dict(seqlen=131072, batch=1, heads=8, head_dim=128, dtype="bf16", causal=True, input_bytes=4 * GIB // 8,
                peak_bytes=GIB, fwd_ms=900.0, bwd_ms=2400.0, fwd_tflops=150.0, bwd_tflops=140.0, finite=True)
    checks = [dict(label="grid bf16 d=64 causal=0", dtype="bf16", tolerance=0.05, ok=True, max_rel_err=0.004,
                   errors={"out": 0.004})]
    return {"started": time.time(), "meta": {"gpu": "synthetic", "torch": "x", "sections": list(SECTIONS)},
            "plan": {}, "rows": rows, "features": features, "memory": memory, "long": long, "checks": checks,
            "skipped": ["jax bf16 d=256 causal=1 n=16384"], "notes": ["synthetic rows"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="bf16, seqlen 1k and 4k, fwd and fwd+bwd, d 64/128/256, causal and not, without SDPA math; "
                         "sections default to grid (add --sections grid,jax for JAX at the same points)")
    ap.add_argument("--sections", help=f"comma list from {','.join(SECTIONS)} (default: all; --quick: grid)")
    ap.add_argument("--out", default=str(HERE / "results"), help="output folder (default: benchmarks/results)")
    ap.add_argument("--dtypes", help="grid dtypes (default bf16,fp16)")
    ap.add_argument("--head-dims", help="grid and JAX head dims (default 64,128,256)")
    ap.add_argument("--seqlens", help="grid seqlens (default 512,1024,2048,4096,8192,16384)")
    ap.add_argument("--modes", help="grid modes from fwd,bwd,fwd_bwd (default all three)")
    ap.add_argument("--systems", help=f"grid systems (default cuflash,{','.join(SDPA_SYSTEMS)})")
    ap.add_argument("--jax-seqlens", help="JAX seqlens (default 1024,4096,16384)")
    ap.add_argument("--jax-modes", help="JAX modes (default fwd,fwd_bwd)")
    ap.add_argument("--warmup-ms", type=float, help="do_bench warm-up (default 25)")
    ap.add_argument("--rep-ms", type=float, help="do_bench repetition time (default 100)")
    ap.add_argument("--math-max-seqlen", type=int, help="largest seqlen for SDPA math (default 4096)")
    ap.add_argument("--time-limit-s", type=float,
                    help="skip (and list) the points left after this many seconds (default 420; 0: none)")
    ap.add_argument("--no-prebuild", action="store_true", help="compile kernels on first use, not in parallel upfront")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--commit", help="the commit being measured, recorded as git_commit (default: git rev-parse HEAD)")
    ap.add_argument("--selftest", action="store_true", help="no GPU: reports on synthetic rows, then every section "
                                                            "at toy sizes on the CPU")
    args = ap.parse_args(argv)
    global COMMIT
    COMMIT = args.commit
    if args.selftest:
        return selftest()
    plan = make_plan(args)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: the benchmark needs one (--selftest runs without)")
    state = run(plan, Path(args.out), plots=not args.no_plots)
    print()
    print(headline_table(state["rows"]) or tflops_table(state["rows"], "TFLOP/s"))
    print(checks_summary(state["checks"]))
    print(f"results in {args.out} ({state['meta']['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
