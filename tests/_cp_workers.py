"""Worker processes for the context-parallel tests: each rank runs every case against the
whole-sequence attention computed in one process, and writes its verdicts as JSON.

Used by tests/test_distributed.py (gloo on CPU, spawned here) and runnable under torchrun
on GPUs (tests/test_distributed_gpu.py):

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        torchrun --nproc-per-node 2 tests/_cp_workers.py cuda RESULT_PREFIX
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import time
import traceback
import zlib

import numpy as np
import torch
import torch.distributed as dist

# NVLink multicast stays off in every launch (NCCL, PyTorch symmetric memory, NVSHMEM):
# our multi-GPU machine runs with it disabled, and so does every process started here.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NO_MULTICAST)

import cuflash  # noqa: E402
import cuflash.distributed as cp  # noqa: E402
from cuflash import _cp_plan  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
    placement: str
    causal: bool = False
    heads: int = 4
    heads_kv: int = 4
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: bool = False
    dropout_p: float = 0.0
    local_len: int = 8
    sharding: str | None = None

    @property
    def name(self) -> str:
        parts = [self.placement, "causal" if self.causal else "full", f"h{self.heads}kv{self.heads_kv}"]
        if self.sharding:
            parts.append(self.sharding)
        if self.window != (-1, -1):
            parts.append(f"win{self.window[0]}_{self.window[1]}")
        if self.softcap:
            parts.append("softcap")
        if self.alibi:
            parts.append("alibi")
        if self.dropout_p:
            parts.append("dropout")
        return "-".join(parts)

    @property
    def resolved_sharding(self) -> str:
        return self.sharding or ("zigzag" if self.placement == "zigzag" else "contiguous")

    def needs_offsets(self, world: int) -> bool:
        """Whether this case needs the core's position_offsets (the plan says so)."""
        placement = self.placement if self.placement != "auto" else "ring"
        feats = _cp_plan.Features(self.causal, tuple(self.window), self.alibi, self.dropout_p > 0, False)
        try:
            if placement == "allgather":
                _cp_plan.allgather_plan(self.resolved_sharding, world, self.local_len, feats, "test")
            else:
                _cp_plan.ring_plan(self.resolved_sharding, world, self.local_len, feats, "test")
                if self.placement == "auto":
                    _cp_plan.allgather_plan(self.resolved_sharding, world, self.local_len, feats, "test")
        except _cp_plan.OffsetsUnavailable:
            return True
        return False


CASES = [
    Case(placement, causal, heads, heads_kv)
    for placement in ("ring", "zigzag", "allgather")
    for causal in (False, True)
    for heads, heads_kv in ((4, 4), (4, 2))
] + [
    Case("auto", True, 4, 1),  # MQA: the gathered K/V are small, auto picks allgather
    Case("auto", True, 4, 4),  # auto picks the ring
    Case("allgather", True, 4, 2, sharding="zigzag"),
    Case("ring", True, softcap=5.0),
    Case("ring", True, window=(3, -1)),
    Case("zigzag", True, window=(5, -1)),
    Case("allgather", True, window=(3, -1)),
    Case("ring", False, window=(2, 3)),
    Case("ring", True, alibi=True),
    Case("zigzag", True, alibi=True),
    Case("allgather", True, alibi=True),
    Case("ring", False, dropout_p=0.25, local_len=32),
    Case("zigzag", True, dropout_p=0.25, local_len=32),
    Case("allgather", True, dropout_p=0.25, local_len=32),
]

# JAX on four devices: the core placements (every option is covered on two); compiling
# each case under jit and vjp is what costs time on CPU.
JAX_W4_CASES = CASES[:12]


def _options(case: Case) -> dict:
    return dict(causal=case.causal, window_size=case.window, softcap=case.softcap,
                dropout_p=case.dropout_p, seed=1234 if case.dropout_p else None)


def run_case(case: Case, rank: int, world: int, device: torch.device, dtype: torch.dtype,
             length_scale: int = 1) -> dict:
    """One case on this rank: the distributed result ("got"), the one-process result over
    the whole sequence ("one": the float64 reference path on CPU, the kernels on one GPU),
    and on GPUs the float64 reference on the same rounded inputs ("ref64"), all for this
    rank's chunk as float64 NumPy arrays."""
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    batch, dim, n = 2, 16, world * case.local_len * length_scale
    q = torch.randn(batch, n, case.heads, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, n, case.heads_kv, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, n, case.heads_kv, dim, generator=g, dtype=torch.float64)
    dout = torch.randn(batch, n, case.heads, dim, generator=g, dtype=torch.float64)
    slopes = torch.rand(case.heads, generator=g, dtype=torch.float64) * 0.5 if case.alibi else None
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    opts = _options(case)
    alibi = None if slopes is None else slopes.to(torch.float32)
    sharding = case.resolved_sharding

    def mine(t, dim_=1):
        return as_np(cp.shard_sequence(t.detach().cpu(), rank, world, sharding, dim_))

    def as_np(t):
        return t.detach().to("cpu", torch.float64).numpy()

    def whole_sequence(on: torch.device, cast=None):
        arrays = [(t if cast is None else t.to(cast)).to(on) for t in (q, k, v, dout)]
        slopes_on = None if alibi is None else alibi.to(on)
        out, lse = cuflash.forward(*arrays[:3], alibi_slopes=slopes_on, **opts)
        grads = cuflash.backward(arrays[3], *arrays[:3], out, lse, alibi_slopes=slopes_on, **opts)
        return dict(out=mine(out), lse=mine(lse, 2), dq=mine(grads[0]), dk=mine(grads[1]), dv=mine(grads[2]))

    result = dict(one=whole_sequence(device))
    if device.type == "cuda":
        result["ref64"] = whole_sequence(torch.device("cpu"), torch.float64)

    q_l, k_l, v_l = (cp.shard_sequence(t, rank, world, sharding).contiguous().to(device).requires_grad_()
                     for t in (q, k, v))
    out_l, lse_l = cp.ring_attention(q_l, k_l, v_l, placement=case.placement, sharding=case.sharding,
                                     alibi_slopes=None if alibi is None else alibi.to(device), return_lse=True,
                                     **opts)
    out_l.backward(cp.shard_sequence(dout, rank, world, sharding).contiguous().to(device))
    result["got"] = dict(out=as_np(out_l), lse=as_np(lse_l), dq=as_np(q_l.grad), dk=as_np(k_l.grad),
                         dv=as_np(v_l.grad))
    return result


def _compare_float64(result: dict) -> str | None:
    problems = []
    for name, one in result["one"].items():
        got = result["got"][name]
        both_inf = np.isinf(one) & (got == one)
        with np.errstate(invalid="ignore"):
            err = np.where(both_inf, 0.0, np.abs(got - one))
        scale = max(1.0, float(np.max(np.abs(one[np.isfinite(one)]), initial=0.0)))
        if not np.all(np.isfinite(err)) or err.max(initial=0.0) > 1e-10 * scale:
            problems.append(f"{name}: max error {np.nanmax(err):.3e} (scale {scale:.3g})")
    return "; ".join(problems) or None


BAD_INPUTS = ("mismatched_chunk_lengths", "zigzag_odd_chunk", "one_rank_on_meta_device", "mismatched_dtype",
              "mismatched_options", "unknown_placement", "return_lse_not_a_bool")


def run_bad_input(kind: str, rank: int, world: int, device: torch.device) -> str | None:
    """None when every rank raised ValueError naming the problem (no rank hangs: a hang
    runs into the caller's deadline)."""
    n = 8
    shape = dict(q=(1, n, 2, 8), kv=(1, n, 2, 8))
    placement, kwargs, dev, group = "ring", {}, device, None
    dtype = torch.float64 if device.type == "cpu" else torch.bfloat16
    if kind == "mismatched_chunk_lengths" and rank == 0:
        shape = dict(q=(1, n + 2, 2, 8), kv=(1, n + 2, 2, 8))
    if kind == "zigzag_odd_chunk":
        shape, placement = dict(q=(1, 7, 2, 8), kv=(1, 7, 2, 8)), "zigzag"
    if kind == "one_rank_on_meta_device" and rank == world - 1:
        dev = torch.device("meta")
    if kind == "mismatched_dtype" and rank == 0:
        dtype = torch.float32 if device.type == "cpu" else torch.float16
    if kind == "gloo_group_with_cuda_tensors":
        group = dist.new_group(backend="gloo")
    if kind == "mismatched_options" and rank == 0:
        kwargs = dict(causal=True)
    if kind == "unknown_placement":
        placement = "spiral"
    if kind == "return_lse_not_a_bool":
        kwargs = dict(return_lse="no")  # bool("no") is True: it must not be taken as a request for the lse
    expected = {"mismatched_chunk_lengths": "seqlen_local differs", "zigzag_odd_chunk": "must be even",
                "one_rank_on_meta_device": "not supported", "mismatched_dtype": "dtype differs",
                "mismatched_options": "options", "unknown_placement": "placement='spiral'",
                "gloo_group_with_cuda_tensors": "need an NCCL process group",
                "return_lse_not_a_bool": "return_lse='no' must be a bool"}[kind]
    q = torch.randn(shape["q"], dtype=dtype, device=dev)
    k = torch.randn(shape["kv"], dtype=dtype, device=dev)
    try:
        cp.ring_attention(q, k, k, placement=placement, group=group, **kwargs)
    except ValueError as exc:
        return None if expected in str(exc) else f"raised without {expected!r}: {exc}"
    return "no error raised"


def worker(rank: int, world: int, init_method: str, result_prefix: str, device_kind: str) -> None:
    """Runs every case and bad input on this rank; writes {name: None | problem} to
    RESULT_PREFIX.RANK.json."""
    if device_kind == "cuda":
        torch.cuda.set_device(rank)
        device, backend, dtype = torch.device("cuda", rank), "nccl", torch.bfloat16
    else:
        device, backend, dtype = torch.device("cpu"), "gloo", torch.float64
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))
    verdicts: dict[str, str | None] = {}
    try:
        for case in CASES:
            start = time.perf_counter()
            try:
                result = run_case(case, rank, world, device, dtype, 1 if dtype == torch.float64 else 16)
                verdicts[case.name] = (_compare_float64(result) if dtype == torch.float64
                                       else _compare_tolerance(result, case, world, rank))
            except Exception as exc:  # noqa: BLE001 - recorded and reported by the test
                verdicts[case.name] = f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, NotImplementedError):
                    verdicts[case.name] += "\n" + traceback.format_exc()
            verdicts[case.name + ":seconds"] = f"{time.perf_counter() - start:.2f}"
        for kind in BAD_INPUTS + (("gloo_group_with_cuda_tensors",) if device_kind == "cuda" else ()):
            try:
                verdicts["bad:" + kind] = run_bad_input(kind, rank, world, device)
            except Exception as exc:  # noqa: BLE001 - recorded and reported by the test
                verdicts["bad:" + kind] = f"{type(exc).__name__}: {exc}"
    finally:
        with open(f"{result_prefix}.{rank}.json", "w") as f:
            json.dump(verdicts, f)
        dist.destroy_process_group()


def _compare_tolerance(result: dict, case: Case, world: int, rank: int) -> str | None:
    """On GPUs (bf16), the tolerance method with the one-GPU kernel as the baseline: the
    distributed result's error against the float64 reference (same rounded inputs, whole
    sequence) must stay within 2x the one-GPU kernel's error (3x for gradients, which sum
    one more rounded term per step) plus 4 bf16 ulps at the result's scale."""
    problems = []
    for name, ref in result["ref64"].items():
        got, one = result["got"][name], result["one"][name]
        finite = np.isfinite(ref)
        if not np.array_equal(np.isfinite(got), finite):
            problems.append(f"{name}: non-finite values where the reference is finite (or the reverse)")
            continue
        scale = float(np.max(np.abs(ref[finite]), initial=1e-3))
        err = float(np.max(np.abs(got[finite] - ref[finite]), initial=0.0))
        one_err = float(np.max(np.abs(one[finite] - ref[finite]), initial=0.0))
        bound = (2 if name in ("out", "lse") else 3) * one_err + 4 * 2.0**-8 * scale
        if not err <= bound:
            problems.append(f"{name}: max|distributed - ref64| = {err:.3e} > bound {bound:.3e} "
                            f"(one GPU: {one_err:.3e})")
    return "; ".join(problems) or None


def main() -> None:
    """torchrun entry: `torchrun --nproc-per-node W tests/_cp_workers.py cuda|cpu PREFIX`."""
    device_kind, prefix = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    worker(rank, world, "env://", prefix, device_kind)


if __name__ == "__main__":
    main()
