"""Context-parallel attention on 2 GPUs against one GPU (cuflash.distributed, NCCL).

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        torchrun --standalone --nproc-per-node 2 benchmarks/bench_cp.py [--quick]

Causal bf16, head_dim 128, 32 heads, batch 1, 128k and 256k tokens in all. World 1 rows
are one GPU computing the whole sequence (each GPU runs it at once, on its own; the
slower one counts); world 2 rows are ring, zigzag and allgather placements. For each:
forward ("fwd") and forward + backward ("fwd_bwd") in ms (CUDA events, the slower rank),
efficiency = t(world 1) / (2 x t(world 2)), and peak memory per GPU (GiB, the larger
rank's torch.cuda.max_memory_allocated; cuflash allocates through PyTorch).

Before timing: a small case (8k tokens) of every placement is checked against one GPU
(out and gradients); a failure stops the run. The link is measured too: one K/V chunk
(128k tokens' chunk) exchanged both ways at once with batch_isend_irecv, as a ring step
does, recorded in meta as GB/s per direction.

Writes benchmarks/results/context_parallel.json ({"meta": {...}, "rows": [...]}) and
context_parallel.md (rank 0).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

# NVLink multicast stays off in every launch (NCCL, PyTorch symmetric memory, NVSHMEM).
os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import cuflash  # noqa: E402
import cuflash.distributed as cp  # noqa: E402
import cuflash.torch as ct  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
HEADS, HEAD_DIM, BATCH = 32, 128, 1
PLACEMENTS = ("ring", "zigzag", "allgather")


def log(*args) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


def slowest(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def timed(fn, warmup: int, reps: int) -> float:
    """Median ms of fn() (CUDA events), the slower rank's."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return slowest(times[len(times) // 2])


def peak_gib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return slowest(torch.cuda.max_memory_allocated() / 2**30)


def inputs(seqlen: int, requires_grad: bool):
    g = torch.Generator(device="cuda").manual_seed(seqlen)
    make = lambda: torch.randn(BATCH, seqlen, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16,  # noqa: E731
                               generator=g)
    q, k, v, dout = make(), make(), make(), make()
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, dout


def local_inputs(seqlen: int, placement: str, requires_grad: bool):
    rank, world = dist.get_rank(), dist.get_world_size()
    sharding = "zigzag" if placement == "zigzag" else "contiguous"
    whole = inputs(seqlen, False)
    local = [cp.shard_sequence(t, rank, world, sharding).contiguous() for t in whole]
    del whole
    for t in local[:3]:
        t.requires_grad_(requires_grad)
    return local


def check_small() -> None:
    """Every placement against one GPU on 8k tokens, forward and backward."""
    rank, world = dist.get_rank(), dist.get_world_size()
    seqlen = 8192
    q, k, v, dout = inputs(seqlen, True)
    out = ct.attention(q, k, v, causal=True)
    out.backward(dout)
    reference = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    for placement in PLACEMENTS:
        sharding = "zigzag" if placement == "zigzag" else "contiguous"
        local = [cp.shard_sequence(t.detach(), rank, world, sharding).contiguous() for t in (q, k, v, dout)]
        for t in local[:3]:
            t.requires_grad_(True)
        out_l = cp.ring_attention(*local[:3], placement=placement, causal=True)
        out_l.backward(local[3])
        got = {"out": out_l.detach(), "dq": local[0].grad, "dk": local[1].grad, "dv": local[2].grad}
        for name, ref in reference.items():
            mine = cp.shard_sequence(ref, rank, world, sharding).float()
            err = float((got[name].float() - mine).abs().max())
            scale = float(mine.abs().max())
            # bf16: a few ulps at the result's scale separate two correct summation orders.
            if not err <= 8 * 2.0**-8 * scale:
                raise SystemExit(f"rank {rank}: {placement} {name} differs from one GPU by {err:.3e} "
                                 f"(scale {scale:.3e}); not timing a wrong result")
    log("check: ring, zigzag and allgather match one GPU on 8k tokens (out, dq, dk, dv)")


def link_bandwidth(seqlen: int) -> float:
    """GB/s per direction for one K/V chunk exchanged both ways at once."""
    rank, world = dist.get_rank(), dist.get_world_size()
    chunk = torch.empty(2, BATCH, seqlen // world, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    incoming = torch.empty_like(chunk)
    peer = (rank + 1) % world

    def exchange():
        ops = [dist.P2POp(dist.isend, chunk, peer), dist.P2POp(dist.irecv, incoming, (rank - 1) % world)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    ms = timed(exchange, 2, 5)
    return chunk.numel() * chunk.element_size() / (ms * 1e-3) / 1e9


def workload(seqlen: int, placement: str, mode: str):
    """The timed call: one GPU over the whole sequence ("single"; every rank runs it on
    its own GPU at once) or a placement over the ranks; forward, or forward + backward."""
    backward = mode == "fwd_bwd"
    if placement == "single":
        q, k, v, dout = inputs(seqlen, backward)
        if not backward:
            return lambda: cuflash.forward(q, k, v, causal=True)
        return lambda: ct.attention(q, k, v, causal=True).backward(dout)
    q, k, v, dout = local_inputs(seqlen, placement, backward)
    if not backward:
        return lambda: cp.ring_attention(q, k, v, placement=placement, causal=True)
    return lambda: cp.ring_attention(q, k, v, placement=placement, causal=True).backward(dout)


def git_commit() -> str:
    if os.environ.get("CUFLASH_GIT_COMMIT"):
        return os.environ["CUFLASH_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="16k and 32k tokens (a smoke run)")
    args = parser.parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    world = dist.get_world_size()
    seqlens = (16384, 32768) if args.quick else (131072, 262144)
    started = time.perf_counter()

    check_small()
    link = link_bandwidth(seqlens[0])
    log(f"link: {link:.1f} GB/s per direction (one {seqlens[0] // 1024}k-token K/V chunk each way)")

    rows = []

    def record(world_, seqlen, placement, mode, ms, gib):
        base = next((r["ms"] for r in rows if r["world"] == 1 and r["seqlen_total"] == seqlen and r["mode"] == mode),
                    None)
        eff = None if world_ == 1 or base is None else base / (world_ * ms)
        rows.append(dict(world=world_, seqlen_total=seqlen, causal=True, placement=placement, mode=mode,
                         ms=round(ms, 3), efficiency=None if eff is None else round(eff, 4), peak_gib=round(gib, 3)))
        log(f"world {world_} {seqlen // 1024:>4}k {placement:>9} {mode:>7}: {ms:9.2f} ms"
            + ("" if eff is None else f"  efficiency {100 * eff:5.1f} %") + f"  peak {gib:6.2f} GiB")

    for seqlen in seqlens:
        reps = 3 if seqlen <= 131072 else 2
        for placement in ("single",) + PLACEMENTS:
            for mode in ("fwd", "fwd_bwd"):
                fn = workload(seqlen, placement, mode)
                ms = timed(fn, 1, reps)
                record(1 if placement == "single" else world, seqlen, placement, mode, ms, peak_gib(fn))
                del fn
                torch.cuda.empty_cache()

    single = next(r for r in rows if r["world"] == 1 and r["mode"] == "fwd" and r["seqlen_total"] == seqlens[-1])
    flops = 4 * seqlens[-1] ** 2 * HEADS * HEAD_DIM * BATCH / 2  # causal: half the score matrix
    meta = dict(
        benchmark="context_parallel", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=git_commit(), gpu=torch.cuda.get_device_name(), world=world, torch=torch.__version__,
        nccl=".".join(map(str, torch.cuda.nccl.version())), cuflash=cuflash.__version__, dtype="bfloat16",
        batch=BATCH, heads=HEADS, heads_kv=HEADS, head_dim=HEAD_DIM, causal=True,
        link_gbps_per_direction=round(link, 1),
        link_measure=f"one K/V chunk ({seqlens[0] // world} tokens x {HEADS} heads x {HEAD_DIM} x 2 tensors, bf16) "
                     "exchanged both ways with batch_isend_irecv, median of 5",
        single_gpu_fwd_tflops=round(flops / (single["ms"] * 1e-3) / 1e12, 1),
        efficiency="t(world 1) / (world x t(world)); ms is the slower rank's median; world 1 rows "
                   "(placement 'single') are one GPU over the whole sequence",
        position_offsets_in_core="position_offsets" in cuflash.OPTION_NAMES,
        seconds=round(time.perf_counter() - started, 1),
    )
    if dist.get_rank() == 0:
        folder = os.path.join(HERE, "results")
        os.makedirs(folder, exist_ok=True)
        name = "context_parallel" + ("_quick" if args.quick else "")
        with open(os.path.join(folder, name + ".json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        lines = [f"# Context parallelism, {meta['gpu']} x {world} ({meta['git_commit'][:10]})", "",
                 f"causal bf16, batch {BATCH}, {HEADS} heads, head_dim {HEAD_DIM}; "
                 f"link {meta['link_gbps_per_direction']} "
                 f"GB/s per direction; one GPU forward {meta['single_gpu_fwd_tflops']} TFLOP/s at "
                 f"{seqlens[-1] // 1024}k", "",
                 "| world | tokens | placement | mode | ms | efficiency | peak GiB/GPU |",
                 "|---:|---:|---|---|---:|---:|---:|"]
        for r in rows:
            eff = "" if r["efficiency"] is None else f"{100 * r['efficiency']:.1f} %"
            lines.append(f"| {r['world']} | {r['seqlen_total'] // 1024}k | {r['placement']} | {r['mode']} | "
                         f"{r['ms']:.2f} | {eff} | {r['peak_gib']:.2f} |")
        with open(os.path.join(folder, name + ".md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
