"""End-to-end: training steps with cuflash against PyTorch's SDPA, on one GPU.

    python benchmarks/bench_e2e.py                # everything (sized for < 5 min on an H200)
    python benchmarks/bench_e2e.py --steps 5      # fewer timed steps
    python benchmarks/bench_e2e.py --parts gpt --batches 8 --compile-scope model
    python benchmarks/bench_e2e.py --selftest     # no GPU: every part at toy sizes on the CPU

Models:

  gpt    GPT-2-small-like (12 layers, d=768, 12 heads, T=1024, vocab 50304), batch 8 and 16,
         bf16 autocast, AdamW; one training step = forward, loss, backward, optimizer step.
         Attention: q, k, v are head-transposed views of one fused qkv projection, causal;
         cuflash.torch.scaled_dot_product_attention for "cuflash", F.scaled_dot_product_attention
         for "sdpa_default" (PyTorch's choice: cuDNN on Hopper) and for each backend forced
         with torch.nn.attention.sdpa_kernel ("sdpa_cudnn", "sdpa_flash", "sdpa_mem_efficient").
         Eager, and torch.compile (inductor) of each transformer block (--compile-scope
         block, the default: one compiled graph reused by the 12 blocks, which keeps compile
         time inside the budget; --compile-scope model compiles the whole model).
  llama  transformers' LlamaForCausalLM, random init (8 layers, hidden 1024, 16 heads over
         4 kv heads, T=1024, batch 8), bf16 weights, forward + loss + backward; cuflash
         through cuflash.transformers (attn_implementation "cufa") against "sdpa".

Each row: step_ms (median of --steps steps after warm-up, CUDA events), attn_ms and copy_ms
per step (torch.profiler over --profile-steps steps: the summed device time of kernels whose
names match the attention patterns, cuflash's `cuflash_*` kernels or SDPA's flash / fmha /
cuDNN attention kernels, and of copy kernels: copy, clone, cat, transpose, contiguous;
dtype casts under autocast are copies too and appear in every system's graph), the heaviest
kernels by device time, and host_us_per_call / host_us_bwd_per_call: CPU time per attention
forward call and per backward, in a loop of calls on tiny inputs (batch 1, 12 heads, 64
tokens) where the GPU work is negligible, eager or compiled like the row.

Before any timing, the first --check-steps losses of cuflash and of SDPA's default, from
the same initial weights and batches, must agree within --loss-rtol (bf16 autocast changes
the loss in the third digit; a wrong attention changes it in the first); a system that
fails is not timed and its row says why.

Results: benchmarks/results/e2e.json ({"meta": {..., "git_commit"}, "rows": [...]}) and
e2e.md (the table), rewritten after each row so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import cuflash  # noqa: E402
import cuflash.torch as ct  # noqa: E402

SYSTEMS = ("cuflash", "sdpa_default", "sdpa_cudnn", "sdpa_flash", "sdpa_mem_efficient")
ATTENTION_KERNEL = re.compile(r"cuflash_|flash|fmha|attention|sdpa|cudnn", re.I)
COPY_KERNEL = re.compile(r"copy|clone|(^|_)cat(_|\b)|CatArray|transpose|contiguous", re.I)


# ---- the models -----------------------------------------------------------------------------


def sdpa_backend(system: str):
    """The context a system's attention runs in: a forced SDPA backend or nothing."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    forced = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION,
              "sdpa_mem_efficient": SDPBackend.EFFICIENT_ATTENTION}.get(system)
    return sdpa_kernel([forced]) if forced is not None else contextlib.nullcontext()


def attention_fn(system: str) -> Callable:
    if system == "cuflash":
        return lambda q, k, v: ct.scaled_dot_product_attention(q, k, v, is_causal=True)
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, attn: Callable):
        super().__init__()
        self.heads, self.attn = heads, attn
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        # (B, T, C) -> (B, H, T, D): head-transposed views of the fused projection.
        q, k, v = (t.view(B, T, h, C // h).transpose(1, 2) for t in (q, k, v))
        y = self.attn(q, k, v)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, layers: int, d: int, heads: int, seqlen: int, vocab: int, attn: Callable):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seqlen, d)
        self.blocks = nn.ModuleList(Block(d, heads, attn) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


# ---- measuring --------------------------------------------------------------------------------


class Timer:
    """Device time of a callable: CUDA events on a GPU, the wall clock on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def median_ms(self, fn: Callable[[], Any], steps: int) -> float:
        times = []
        for _ in range(steps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def profile(fn: Callable[[], Any], steps: int, device: str) -> dict:
    """Per-step device time of attention kernels, of copy kernels, and the heaviest kernels.
    (On the CPU self-test the "kernels" are operators' self CPU times.)"""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        Timer(device).sync()
    totals: dict[str, float] = {}
    if device == "cuda":
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                totals[e.name] = totals.get(e.name, 0.0) + e.time_range.elapsed_us()
    else:
        for e in prof.key_averages():
            totals[e.key] = totals.get(e.key, 0.0) + e.self_cpu_time_total
    attn = sum(us for name, us in totals.items() if ATTENTION_KERNEL.search(name) and not COPY_KERNEL.search(name))
    copies = sum(us for name, us in totals.items() if COPY_KERNEL.search(name))
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:12]
    return {"attn_ms": attn / steps / 1e3, "copy_ms": copies / steps / 1e3,
            "kernels": [{"name": n[:160], "ms_per_step": round(us / steps / 1e3, 4)} for n, us in top],
            "copy_kernels": [{"name": n[:160], "ms_per_step": round(us / steps / 1e3, 4)}
                             for n, us in sorted(totals.items(), key=lambda kv: -kv[1]) if COPY_KERNEL.search(n)][:8]}


_host_cache: dict = {}


def host_us(system: str, compiled: bool, device: str, dtype: torch.dtype, calls: int) -> tuple[float, float]:
    """CPU microseconds per attention forward call and per backward call, on inputs so
    small that the GPU never holds the host back (batch 1, 12 heads, 64 tokens, d 64).
    Measured once per (system, compiled, dtype): it does not depend on the model's batch."""
    key = (system, compiled, device, dtype)
    if key not in _host_cache:
        _host_cache[key] = _measure_host_us(system, compiled, device, dtype, calls)
    return _host_cache[key]


def _measure_host_us(system: str, compiled: bool, device: str, dtype: torch.dtype, calls: int) -> tuple[float, float]:
    fn = attention_fn(system)
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, backend=("inductor" if device == "cuda" else "aot_eager"))
    g = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(1, 64, 3, 12, 64, device=device, dtype=dtype, generator=g)
    q, k, v = (base[:, :, i].transpose(1, 2).detach().requires_grad_() for i in range(3))
    dout = torch.randn(1, 12, 64, 64, device=device, dtype=dtype, generator=g)
    timer = Timer(device)
    with sdpa_backend(system):
        for _ in range(5):
            torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
        timer.sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(q, k, v)
        timer.sync()
        forward = (time.perf_counter() - t0) / calls * 1e6
        outs = [fn(q, k, v) for _ in range(calls)]
        timer.sync()
        t0 = time.perf_counter()
        for out in outs:
            torch.autograd.grad(out, (q, k, v), dout)
        timer.sync()
        backward = (time.perf_counter() - t0) / calls * 1e6
    return forward, backward


# ---- the GPT rows -----------------------------------------------------------------------------


def time_step(row: dict, step: Callable[[], Any], args, device: str) -> None:
    """Warm up, then the step's median time and its profiler breakdown into `row`."""
    for _ in range(args.warmup):
        step()
    timer = Timer(device)
    timer.sync()
    row["step_ms"] = timer.median_ms(step, args.steps)
    row.update(profile(step, args.profile_steps, device))


def make_gpt(cfg: dict, system: str, device: str, compiled: bool, scope: str, state: dict | None) -> nn.Module:
    torch.manual_seed(0)
    model = GPT(cfg["layers"], cfg["d"], cfg["heads"], cfg["seqlen"], cfg["vocab"], attention_fn(system)).to(device)
    if state is not None:
        model.load_state_dict(state)
    if compiled:
        backend = "inductor" if device == "cuda" else "aot_eager"
        if scope == "model":
            model.forward = torch.compile(model.forward, backend=backend)
        else:
            for b in model.blocks:
                b.compile(backend=backend)
    return model


def gpt_step(model: nn.Module, batches: list, device: str, autocast_dtype):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=(device == "cuda"))
    counter = [0]

    def step():
        idx, targets = batches[counter[0] % len(batches)]
        counter[0] += 1
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def gpt_rows(args, cfg: dict, device: str, autocast_dtype, results: dict, save: Callable) -> None:
    torch.manual_seed(1)
    initial = GPT(cfg["layers"], cfg["d"], cfg["heads"], cfg["seqlen"], cfg["vocab"], attention_fn("sdpa_default"))
    state = {k_: v_.to(device) for k_, v_ in initial.state_dict().items()}
    for compiled in (False, True):
        for batch in cfg["batches"]:
            g = torch.Generator().manual_seed(batch)
            batches = [(torch.randint(0, cfg["vocab"], (batch, cfg["seqlen"]), generator=g).to(device),
                        torch.randint(0, cfg["vocab"], (batch, cfg["seqlen"]), generator=g).to(device))
                       for _ in range(3)]
            reference_losses = None
            for system in SYSTEMS:
                if args.deadline.over():
                    results["meta"]["skipped"].append(f"gpt compile={compiled} batch={batch} {system}")
                    continue
                row = {"model": "gpt", "compile": compiled, "batch": batch, "system": system,
                       "step_ms": None, "attn_ms": None, "copy_ms": None, "host_us_per_call": None}
                label = f"gpt compile={compiled} batch={batch} {system}"
                try:
                    torch._dynamo.reset()
                    with sdpa_backend(system):
                        model = make_gpt(cfg, system, device, compiled, args.compile_scope, state)
                        step = gpt_step(model, batches, device, autocast_dtype)
                        t0 = time.perf_counter()
                        losses = [step().item() for _ in range(args.check_steps)]
                        row["warmup_s"] = round(time.perf_counter() - t0, 2)
                        row["losses"] = [round(x, 5) for x in losses]
                        if system == "sdpa_default":
                            reference_losses = losses
                        elif system == "cuflash" and reference_losses is None:
                            # cuflash runs first: check it against sdpa_default from the same state.
                            ref_model = make_gpt(cfg, "sdpa_default", device, False, args.compile_scope, state)
                            ref_step = gpt_step(ref_model, batches, device, autocast_dtype)
                            reference_losses = [ref_step().item() for _ in range(args.check_steps)]
                            del ref_model, ref_step
                        if system == "cuflash" or system.startswith("sdpa_") and system != "sdpa_default":
                            bad = [(a, b) for a, b in zip(losses, reference_losses)
                                   if not math.isfinite(a) or abs(a - b) > args.loss_rtol * abs(b)]
                            if bad:
                                raise RuntimeError(f"losses {losses} disagree with sdpa_default's {reference_losses} "
                                                   f"(rtol {args.loss_rtol})")
                        time_step(row, step, args, device)
                    del model, step
                    fwd, bwd = host_us(system, compiled, device, autocast_dtype or torch.float32, args.host_calls)
                    row["host_us_per_call"], row["host_us_bwd_per_call"] = fwd, bwd
                except Exception as exc:  # noqa: BLE001 - a backend that cannot run says why in its row
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                results["rows"].append(row)
                print(f"{label}: " + (row.get("error") or f"step {row['step_ms']:.2f} ms, attn {row['attn_ms']:.2f}, "
                                      f"copy {row['copy_ms']:.2f}, host {row['host_us_per_call']:.1f} us"), flush=True)
                save()
                if device == "cuda":
                    torch.cuda.empty_cache()


# ---- the transformers Llama rows -------------------------------------------------------------


def llama_rows(args, cfg: dict, device: str, dtype, results: dict, save: Callable) -> None:
    try:
        import transformers

        import cuflash.transformers as cft
    except ImportError as exc:
        results["meta"]["notes"].append(f"llama skipped: {exc}")
        return
    name = cft.register()
    config = transformers.LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["d"], intermediate_size=cfg["ffn"], num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"], max_position_embeddings=cfg["seqlen"])
    torch.manual_seed(2)
    state = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).state_dict()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seqlen"]), generator=g).to(device)
    reference_loss = None
    for system, impl in (("sdpa_default", "sdpa"), ("cuflash", name)):
        if args.deadline.over():
            results["meta"]["skipped"].append(f"llama {system}")
            continue
        row = {"model": "llama", "compile": False, "batch": cfg["batch"], "system": system,
               "step_ms": None, "attn_ms": None, "copy_ms": None, "host_us_per_call": None}
        try:
            model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=impl)
            model = model.to(device=device, dtype=dtype)
            model.load_state_dict(state)

            def step(model=model):
                model.zero_grad(set_to_none=True)
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                return loss

            loss = step().item()
            row["losses"] = [round(loss, 5)]
            if reference_loss is None:
                reference_loss = loss
            elif not math.isfinite(loss) or abs(loss - reference_loss) > args.loss_rtol * abs(reference_loss):
                raise RuntimeError(f"loss {loss} disagrees with sdpa's {reference_loss} (rtol {args.loss_rtol})")
            time_step(row, step, args, device)
            del model, step
            fwd, bwd = host_us(system, False, device, dtype, args.host_calls)
            row["host_us_per_call"], row["host_us_bwd_per_call"] = fwd, bwd
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        results["rows"].append(row)
        print(f"llama {system}: " + (row.get("error") or f"step {row['step_ms']:.2f} ms, attn {row['attn_ms']:.2f}, "
                                     f"copy {row['copy_ms']:.2f}"), flush=True)
        save()


# ---- output ---------------------------------------------------------------------------------


def environment(device: str, commit: str | None) -> dict:
    import importlib.metadata as md
    import platform

    env: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "argv": sys.argv[1:], "python": platform.python_version(),
                 "cuflash": cuflash.__version__, "notes": []}
    for name in ("torch", "triton", "transformers", "cupy-cuda12x", "cupy-cuda13x"):
        try:
            env[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE.parent, capture_output=True, text=True,
                                    timeout=10).stdout.strip() or None
        except Exception:  # noqa: BLE001
            commit = None
    env["git_commit"] = commit
    if device == "cuda":
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", torch_cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    else:
        env["gpu"] = "none (CPU self-test: toy sizes, cuflash on its float64 host path)"
    return env


class Deadline:
    def __init__(self, limit_s: float):
        self.end = time.perf_counter() + limit_s

    def over(self) -> bool:
        return time.perf_counter() > self.end


def fmt(x, spec="{:.2f}"):
    return "—" if x is None else spec.format(x)


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = ["## End-to-end training steps\n",
             f"{meta.get('gpu')}; torch {meta.get('torch')}, transformers {meta.get('transformers')}, "
             f"commit {meta.get('git_commit')}. GPT: {meta.get('gpt')}; compile scope {meta.get('compile_scope')}. "
             f"Llama: {meta.get('llama')}. Median of {meta.get('steps')} steps; attention and copy kernels per step "
             f"from torch.profiler; host µs per attention call (forward / backward) on tiny inputs.\n",
             "| model | compile | batch | system | step ms | vs sdpa_default | attn ms | copy ms | host µs fwd | host µs bwd |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    anchors = {(r["model"], r["compile"], r["batch"]): r["step_ms"] for r in results["rows"]
               if r["system"] == "sdpa_default"}
    for r in results["rows"]:
        anchor = anchors.get((r["model"], r["compile"], r["batch"]))
        ratio = anchor / r["step_ms"] if anchor and r["step_ms"] else None
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['compile']} | {r['batch']} | {r['system']} | "
                         f"{r['error'][:80]} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['compile']} | {r['batch']} | {r['system']} | {fmt(r['step_ms'])} | "
                     f"{fmt(ratio, '{:.2f}×')} | {fmt(r['attn_ms'])} | {fmt(r['copy_ms'])} | "
                     f"{fmt(r['host_us_per_call'], '{:.0f}')} | {fmt(r.get('host_us_bwd_per_call'), '{:.0f}')} |")
    lines.append("\n`vs sdpa_default` above 1: faster than PyTorch's default. Losses of the first steps agree "
                 "with sdpa_default's in every row that has a time (rows that did not say why).")
    if meta.get("skipped"):
        lines.append(f"- Skipped at the time limit: {', '.join(meta['skipped'])}")
    for note in meta["notes"]:
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per row (median)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after the loss check")
    ap.add_argument("--check-steps", type=int, default=3, help="steps whose losses must match sdpa_default's")
    ap.add_argument("--loss-rtol", type=float, default=1e-2)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--host-calls", type=int, default=300)
    ap.add_argument("--batches", default="8,16", help="GPT batch sizes")
    ap.add_argument("--time-limit-s", type=float, default=210,
                    help="rows not started by then are skipped and listed (a compiled row takes up to ~1 min)")
    ap.add_argument("--compile-scope", choices=("block", "model"), default="block")
    ap.add_argument("--parts", default="gpt,llama", help="some of: gpt, llama")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--commit", help="the commit measured, recorded as git_commit (default: git rev-parse HEAD)")
    ap.add_argument("--selftest", action="store_true", help="no GPU: toy sizes on the CPU, results under /tmp")
    args = ap.parse_args(argv)

    if args.selftest:
        device, autocast_dtype, llama_dtype = "cpu", None, torch.float32
        gpt = dict(layers=2, d=64, heads=4, seqlen=32, vocab=97, batches=(2,))
        llama = dict(layers=2, d=64, ffn=128, heads=4, kv_heads=2, seqlen=32, vocab=97, batch=2)
        args.steps, args.warmup, args.check_steps, args.profile_steps, args.host_calls = 2, 1, 2, 1, 5
        if args.out == HERE / "results":
            args.out = Path("/tmp/cuflash_bench_e2e_selftest")
    else:
        if not torch.cuda.is_available():
            print("bench_e2e: needs a CUDA GPU (use --selftest on a machine without one)", file=sys.stderr)
            return 2
        device, autocast_dtype, llama_dtype = "cuda", torch.bfloat16, torch.bfloat16
        gpt = dict(layers=12, d=768, heads=12, seqlen=1024, vocab=50304,
                   batches=tuple(int(b) for b in args.batches.split(",")))
        llama = dict(layers=8, d=1024, ffn=2816, heads=16, kv_heads=4, seqlen=1024, vocab=32000, batch=8)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = environment(device, args.commit)
    meta.update(gpt={k: v for k, v in gpt.items()}, llama=llama, compile_scope=args.compile_scope, steps=args.steps,
                autocast=str(autocast_dtype), attention_kernel_pattern=ATTENTION_KERNEL.pattern,
                copy_kernel_pattern=COPY_KERNEL.pattern)
    meta["skipped"] = []
    results: dict = {"meta": meta, "rows": []}
    start = time.perf_counter()
    args.deadline = Deadline(args.time_limit_s)

    def save():
        meta["seconds"] = round(time.perf_counter() - start, 1)
        (args.out / "e2e.json").write_text(json.dumps(results, indent=1, default=str))
        (args.out / "e2e.md").write_text(markdown(results))

    parts = set(args.parts.split(","))
    # Llama first: two eager rows, cheap; the compiled GPT rows last, the first to go at the limit.
    if "llama" in parts:
        llama_rows(args, llama, device, llama_dtype, results, save)
    if "gpt" in parts:
        gpt_rows(args, gpt, device, autocast_dtype, results, save)
    save()
    print(f"wrote {args.out / 'e2e.json'} and e2e.md in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
