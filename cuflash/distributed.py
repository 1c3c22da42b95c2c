"""Context parallelism on torch.distributed: one attention over a sequence split across ranks.

    # torchrun --nproc-per-node 2 train.py   (NCCL_NVLS_ENABLE=0 in the environment)
    import torch.distributed as dist
    import cuflash.distributed as cp

    dist.init_process_group("nccl")
    torch.cuda.set_device(local_rank)
    q_local = cp.zigzag_shard(q, rank, world)          # (batch, seqlen_local, heads, head_dim)
    out_local = cp.ring_attention(q_local, k_local, v_local, placement="zigzag", causal=True)
    out_local.sum().backward()                          # dq, dk, dv of the local chunks

Layout: q, k and v are each rank's chunk of one sequence, (batch, seqlen_local, heads,
head_dim) (k and v may have fewer heads: GQA/MQA); every rank holds the same number of
positions, and the result is the attention of the local queries to the WHOLE sequence's
keys, exactly as one GPU computing the whole sequence would give it (up to floating-point
rounding), in the local chunk's layout. How the sequence is spread over the ranks (the
sharding) must match the placement:

    placement   sharding     rank r holds                           communication
    "ring"      contiguous   positions [r n, (r + 1) n)              K/V around a ring
    "zigzag"    zigzag       chunks r and 2W-1-r of 2W (zigzag_shard) K/V around a ring
    "allgather" either       (sharding= says which; contiguous)      all-gather K/V once
    "auto"      either       allgather when the gathered K/V are no larger than the
                             local q (GQA/MQA), else ring (zigzag with sharding="zigzag")

Ring: at each step a rank attends its queries to the K/V chunk it holds while the next
chunk moves one rank on (`batch_isend_irecv`: on NCCL the transfers run on the process
group's own NCCL stream, which waits for the compute stream's K/V and which the compute
stream waits for only when the next step needs the chunk, so transfer and compute
overlap). Partial outputs merge exactly through their log-sum-exp. The backward moves K/V
the same way, and the dK/dV accumulators (fp32) travel with them one step behind, so
that their transfer too overlaps the next step's kernels; dQ accumulates locally. Each
backward step calls cuflash.backward with the FINAL output and lse, which makes each
step's gradient exact: P = exp(S - lse) is the global softmax, and D = rowsum(dO * O)
uses the final output.

Causal attention: blocks above the diagonal are skipped, and with zigzag sharding every
rank does the same work at every step (the plain ring leaves rank r idle at steps past r).
Sliding windows skip the blocks no query reaches, and the ring stops after the last step
in which any rank still has work. ALiBi, dropout, and window edges inside off-diagonal
blocks need the core option `position_offsets`; without it they raise
NotImplementedError (before any work).

Bad input (mismatched chunk shapes or options across ranks, odd zigzag chunks, a group
that is not NCCL for CUDA tensors or not gloo for CPU tensors, tensors off the current
CUDA device, anything cuflash itself rejects) raises on EVERY rank: each rank checks its
own input, then one small all-gather of every rank's shapes and verdict decides, before
any K/V moves. CPU tensors take cuflash's float64 reference path over gloo, which is
how the ring logic is tested without GPUs.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

import cuflash

from . import _cp_plan
from ._api import _Call
from ._options import make_options
from ._validate import ValidationError

__all__ = [
    "ring_attention",
    "zigzag_shard",
    "zigzag_unshard",
    "shard_sequence",
    "unshard_sequence",
    "gather_sequence",
    "PLACEMENTS",
]

PLACEMENTS = ("ring", "zigzag", "allgather", "auto")
_WHERE = "cuflash.distributed.ring_attention"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KV_TAG, _DKV_TAG = 17, 18  # gloo matches messages by tag; NCCL ignores tags


# ---- sharding helpers ---------------------------------------------------------------------


def _check_split(where: str, x: Tensor, dim: int, world: int, parts: int, rank: int | None = None) -> int:
    for name, value in (("world", world), ("rank", rank), ("dim", dim)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{where}: {name}={value!r} must be an int")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{where}: dim={dim} is out of range for x of shape {tuple(x.shape)}")
    if world < 1:
        raise ValueError(f"{where}: world={world!r} must be >= 1")
    if rank is not None and not 0 <= rank < world:
        raise ValueError(f"{where}: rank={rank!r} must be in [0, world={world})")
    length = x.shape[dim]
    if length % (parts * world):
        raise ValueError(f"{where}: the sequence length x.shape[{dim}]={length} must be a multiple of "
                         f"{'2 * ' if parts == 2 else ''}world={parts * world}")
    return length // (parts * world)


def zigzag_shard(x: Tensor, rank: int, world: int, dim: int = 1) -> Tensor:
    """Rank `rank`'s zigzag chunk of the whole sequence x: chunks rank and 2 world - 1 - rank
    of 2 world equal chunks along `dim`, concatenated (a new tensor)."""
    c = _check_split("zigzag_shard", x, dim, world, 2, rank)
    return torch.cat([x.narrow(dim, rank * c, c), x.narrow(dim, (2 * world - 1 - rank) * c, c)], dim)


def zigzag_unshard(shards: Sequence[Tensor], dim: int = 1) -> Tensor:
    """The whole sequence from every rank's zigzag chunk (in rank order)."""
    return unshard_sequence(shards, "zigzag", dim)


def shard_sequence(x: Tensor, rank: int, world: int, sharding: str = "contiguous", dim: int = 1) -> Tensor:
    """Rank `rank`'s chunk of the whole sequence x ("contiguous": a view; "zigzag": see
    zigzag_shard)."""
    if sharding == "zigzag":
        return zigzag_shard(x, rank, world, dim)
    if sharding != "contiguous":
        raise ValueError(f"shard_sequence: sharding={sharding!r} must be one of {_cp_plan.SHARDINGS}")
    n = _check_split("shard_sequence", x, dim, world, 1, rank)
    return x.narrow(dim, rank * n, n)


def _check_shards(where: str, shards: Sequence[Tensor], dim: int) -> None:
    """Tensors of one rank and one shape except along `dim` (torch.cat's own error names
    neither the argument nor the shards)."""
    for i, shard in enumerate(shards):
        if not isinstance(shard, Tensor):
            raise ValueError(f"{where}: shards[{i}] must be a torch.Tensor; got {type(shard).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise ValueError(f"{where}: dim={dim!r} must be an int")
    first = shards[0]
    if not -first.dim() <= dim < first.dim():
        raise ValueError(f"{where}: dim={dim} is out of range for shards of shape {tuple(first.shape)}")
    axis = dim % first.dim()

    def others(t: Tensor) -> tuple[int, ...]:
        return tuple(t.shape[:axis]) + tuple(t.shape[axis + 1:])

    if any(s.dim() != first.dim() or others(s) != others(first) for s in shards):
        raise ValueError(f"{where}: every shard must have the same shape except along dim {dim}; got shapes "
                         f"{[tuple(s.shape) for s in shards]}")


def unshard_sequence(shards: Sequence[Tensor], sharding: str = "contiguous", dim: int = 1) -> Tensor:
    """The whole sequence from every rank's chunk (in rank order)."""
    world = len(shards)
    if sharding not in _cp_plan.SHARDINGS:
        raise ValueError(f"unshard_sequence: sharding={sharding!r} must be one of {_cp_plan.SHARDINGS}")
    if world == 0:
        raise ValueError("unshard_sequence: shards is empty")
    _check_shards("unshard_sequence" if sharding == "contiguous" else "zigzag_unshard", shards, dim)
    if sharding == "contiguous":
        return torch.cat(list(shards), dim)
    lengths = {s.shape[dim] for s in shards}
    if len(lengths) != 1 or lengths.pop() % 2:
        raise ValueError(f"zigzag_unshard: every shard must have the same even length along dim {dim}; got "
                         f"{[s.shape[dim] for s in shards]}")
    chunks = []
    for rank, index in _cp_plan.global_chunk_order("zigzag", world):
        shard = shards[rank]
        half = shard.shape[dim] // 2
        chunks.append(shard.narrow(dim, index * half, half))
    return torch.cat(chunks, dim)


def gather_sequence(x: Tensor, *, group: Any = None, sharding: str = "contiguous", dim: int = 1) -> Tensor:
    """Every rank's chunk gathered into the whole sequence, on every rank (a collective)."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return unshard_sequence(parts, sharding, dim)


# ---- checks before any collective -------------------------------------------------------------


def _backends(group) -> dict[str, str]:
    """The group's backend per device type ("nccl" -> {"cuda": "nccl"})."""
    name = str(dist.get_backend(group)).lower()
    if ":" in name:  # "cpu:gloo,cuda:nccl"
        return dict(part.split(":", 1) for part in name.split(","))
    if name == "nccl":
        return {"cuda": "nccl"}
    return {"cpu": name, "cuda": name}


def _exchange_device(group) -> torch.device:
    """Where the check's all-gather runs: a property of the group alone, never of a rank's
    (possibly wrong) input, so that every rank joins the same collective."""
    if _backends(group).get("cpu") is not None:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _local_reasons(q, k, v, alibi_slopes, placement, sharding, group, options) -> list[str]:
    reasons = []
    if alibi_slopes is not None and not isinstance(alibi_slopes, Tensor):
        reasons.append(f"alibi_slopes must be a torch.Tensor or None; got {type(alibi_slopes).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            reasons.append(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if reasons:
        return reasons
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            reasons.append(f"{name} has shape {tuple(t.shape)}; expected (batch, seqlen_local, heads, head_dim)")
    if reasons:
        return reasons
    if not (q.shape[0] == k.shape[0] == v.shape[0] and q.shape[1] == k.shape[1] == v.shape[1]):
        reasons.append(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must have the same batch "
                       "and local sequence length (every rank holds the same positions of q, k and v)")
    if placement not in PLACEMENTS:
        reasons.append(f"placement={placement!r} must be one of {PLACEMENTS}")
    if sharding not in _cp_plan.SHARDINGS:
        reasons.append(f"sharding={sharding!r} must be one of {_cp_plan.SHARDINGS} (or None)")
    elif placement == "zigzag" and sharding != "zigzag":
        reasons.append(f"placement='zigzag' needs sharding='zigzag' (got sharding={sharding!r})")
    elif sharding == "zigzag" and q.shape[1] % 2:
        reasons.append(f"zigzag sharding holds two equal chunks: seqlen_local=q.shape[1]={q.shape[1]} must be even")
    devices = {t.device for t in (q, k, v)} | ({alibi_slopes.device} if isinstance(alibi_slopes, Tensor) else set())
    if len(devices) > 1:
        reasons.append(f"q, k, v (and alibi_slopes) must be on one device; got {sorted(map(str, devices))}")
        return reasons
    device = q.device
    backends = _backends(group)
    if device.type == "cuda":
        if backends.get("cuda") != "nccl":
            reasons.append(f"CUDA tensors need an NCCL process group; the group's backend is "
                           f"{dist.get_backend(group)!r}")
        if device.index != torch.cuda.current_device():
            reasons.append(f"tensors are on {device} but the current CUDA device is cuda:{torch.cuda.current_device()} "
                           "(call torch.cuda.set_device(local_rank); NCCL works on the current device)")
    elif device.type == "cpu":
        if backends.get("cpu") != "gloo":
            reasons.append(f"CPU tensors need a gloo process group; the group's backend is {dist.get_backend(group)!r}")
    else:
        reasons.append(f"tensors on {device} are not supported (CUDA with NCCL, or CPU with gloo)")
    if not reasons:
        try:  # everything cuflash checks on one call (dtypes, head dims, option values)
            _Call(_WHERE, dict(q=q.detach(), k=k.detach(), v=v.detach()),
                  make_options(alibi_slopes=None if alibi_slopes is None else alibi_slopes.detach(), **options))
        except (ValidationError, TypeError, ValueError) as exc:
            reasons.append(str(exc))
    return reasons


def _options_fingerprint(placement, sharding, options: dict[str, Any], alibi_slopes) -> int:
    described = sorted((name, repr(value)) for name, value in options.items() if name != "seed")
    described += [("seed", repr(options.get("seed"))), ("placement", placement), ("sharding", sharding),
                  ("alibi", None if alibi_slopes is None else tuple(alibi_slopes.shape))]
    return zlib.crc32(repr(described).encode()) & 0x7FFFFFFF


def _exchange(q, k, v, alibi_slopes, placement, sharding, group, options, reasons):
    """Every rank's shapes, dtype, options and verdict, on every rank (one all-gather);
    raises on every rank when any rank's input is bad or the ranks disagree. Returns the
    dropout seed the ranks share (rank 0's draw when none was given)."""
    world = dist.get_world_size(group)
    shape = (tuple(q.shape) + tuple(k.shape[2:]) + (v.shape[3],)) if not reasons else (0,) * 7
    dtype_code = _DTYPES.index(q.dtype) if not reasons and q.dtype in _DTYPES else -1
    seed = options.get("seed")
    drawn = int(torch.randint(0, 2**62, ())) if seed is None else 0
    fingerprint = _options_fingerprint(placement, sharding, options, alibi_slopes)
    row = [0 if not reasons else 1, *shape, dtype_code, fingerprint, drawn]
    device = _exchange_device(group)
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    rows = torch.empty(world * len(row), dtype=torch.int64, device=device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(rows, mine, group=group)
    table = rows.view(world, len(row)).cpu().tolist()
    problems = []
    if any(r[0] for r in table):
        messages = [None] * world
        dist.all_gather_object(messages, "; ".join(reasons), group=group)
        problems = [f"rank {rank}: {msg}" for rank, msg in enumerate(messages) if msg]
    else:
        fields = ("batch", "seqlen_local", "heads", "head_dim", "heads_kv", "head_dim_k", "head_dim_v")
        for index, field in enumerate(fields, start=1):
            values = [r[index] for r in table]
            if len(set(values)) > 1:
                problems.append(f"{field} differs across ranks: {values} (every rank must hold an equal chunk)")
        if len({r[8] for r in table}) > 1:
            problems.append(f"dtype differs across ranks: {[str(_DTYPES[r[8]]) for r in table]}")
        if len({r[9] for r in table}) > 1:
            problems.append("the options (placement, sharding, causal, window_size, softmax_scale, softcap, "
                            "dropout_p, seed, deterministic, alibi_slopes shape) differ across ranks")
    if problems:
        raise ValueError(f"{_WHERE}: invalid input (raised on every rank):\n  - " + "\n  - ".join(problems))
    return seed if seed is not None else table[0][-1]


# ---- the collective pieces ------------------------------------------------------------------


def _peer(group, group_rank: int) -> int:
    return group_rank if group is None or group is dist.group.WORLD else dist.get_global_rank(group, group_rank)


def _start_transfers(group, sends: list[Tensor], recvs: list[Tensor], to: int, source: int, tag: int):
    """Send `sends` to group rank `to` and receive `recvs` from `source`; returns the works."""
    ops = [dist.P2POp(dist.isend, t, _peer(group, to), group, tag) for t in sends]
    ops += [dist.P2POp(dist.irecv, t, _peer(group, source), group, tag) for t in recvs]
    return dist.batch_isend_irecv(ops)


def _wait(works) -> None:
    for work in works or ():
        work.wait()


def _all_gather_dim0(x: Tensor, group, world: int) -> Tensor:
    out = torch.empty((world,) + tuple(x.shape), dtype=x.dtype, device=x.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out.view(world * x.shape[0], *x.shape[1:]), x.contiguous(), group=group)
    return out


def _reduce_scatter_dim0(x: Tensor, group, world: int) -> Tensor:
    """x (world, ...) summed over ranks, rank r receiving x[r]."""
    out = torch.empty(tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, x.reshape((-1,) + tuple(x.shape[2:])).contiguous(), group=group)
    return out


def _to_global_order(gathered: Tensor, sharding: str, world: int) -> Tensor:
    """(world, batch, n, ...) in rank order -> (batch, world * n, ...) in sequence order."""
    parts = 1 if sharding == "contiguous" else 2
    chunks = gathered.unflatten(2, (parts, gathered.shape[2] // parts))
    order = _cp_plan.global_chunk_order(sharding, world)
    return torch.cat([chunks[rank, :, index] for rank, index in order], 1)


def _to_rank_order(whole: Tensor, sharding: str, world: int) -> Tensor:
    """The inverse of _to_global_order: (batch, N, ...) -> (world, batch, n, ...)."""
    parts = 1 if sharding == "contiguous" else 2
    chunk = whole.shape[1] // (parts * world)
    pieces = {}
    for g, (rank, index) in enumerate(_cp_plan.global_chunk_order(sharding, world)):
        pieces[rank, index] = whole.narrow(1, g * chunk, chunk)
    return torch.stack([torch.cat([pieces[r, i] for i in range(parts)], 1) for r in range(world)])


# ---- the LSE merge --------------------------------------------------------------------------


def _merge(out_acc: Tensor, lse_acc: Tensor, out_part: Tensor, lse_part: Tensor) -> None:
    """Fold a partial attention (out_part, lse_part) over other keys into the running one,
    in place: lse = log(e^lse_acc + e^lse_part) and out = out_acc e^(lse_acc - lse) +
    out_part e^(lse_part - lse). Max-shifted, so no exponent overflows; a row with no key
    on either side (both -inf) stays lse -inf and output 0, never NaN."""
    top = torch.maximum(lse_acc, lse_part)
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    lse = shift + torch.log(torch.exp(lse_acc - shift) + torch.exp(lse_part - shift))
    live = torch.isfinite(lse)
    safe = torch.where(live, lse, torch.zeros_like(lse))
    w_acc = torch.where(live, torch.exp(lse_acc - safe), torch.zeros_like(lse))
    w_part = torch.where(live, torch.exp(lse_part - safe), torch.zeros_like(lse))
    out_acc.mul_(w_acc.transpose(1, 2).unsqueeze(-1).to(out_acc.dtype))
    out_acc.add_(out_part.to(out_acc.dtype) * w_part.transpose(1, 2).unsqueeze(-1).to(out_acc.dtype))
    lse_acc.copy_(lse)


class _Rows:
    """Which local query rows have a partial result yet: the first result for a range is
    copied, later ones merged."""

    def __init__(self):
        self.done: list[tuple[int, int]] = []

    def fresh(self, lo: int, hi: int) -> bool:
        return all(hi <= a or lo >= b for a, b in self.done)

    def add(self, lo: int, hi: int) -> None:
        self.done.append((lo, hi))


def _accumulate_part(out_acc, lse_acc, rows: _Rows, call: _cp_plan.Call, out_part, lse_part) -> None:
    out_v = out_acc[:, call.q_lo:call.q_hi]
    lse_v = lse_acc[:, :, call.q_lo:call.q_hi]
    if rows.fresh(call.q_lo, call.q_hi):
        out_v.copy_(out_part)
        lse_v.copy_(lse_part)
    else:
        _merge(out_v, lse_v, out_part, lse_part)
    rows.add(call.q_lo, call.q_hi)


# ---- forward and backward -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Setup:
    group: Any
    rank: int
    world: int
    placement: str  # "ring" or "allgather" (zigzag is the ring over zigzag sharding)
    sharding: str
    options: dict
    ring: _cp_plan.RingPlan | None
    gathered_calls: tuple | None

    @property
    def next_rank(self) -> int:
        return (self.rank + 1) % self.world

    @property
    def prev_rank(self) -> int:
        return (self.rank - 1) % self.world


def _accumulator_dtypes(q: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(output/gradient accumulators, lse): fp32, or float64 for float64 inputs."""
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    return wide, wide


def _forward_calls(setup: _Setup, q, k_held, v_held, calls, out_acc, lse_acc, rows, alibi) -> None:
    for call in calls:
        out_part, lse_part = cuflash.forward(
            q[:, call.q_lo:call.q_hi], k_held[:, call.k_lo:call.k_hi], v_held[:, call.k_lo:call.k_hi],
            alibi_slopes=alibi, **call.kernel_options(setup.options))
        _accumulate_part(out_acc, lse_acc, rows, call, out_part, lse_part)


def _ring_forward(setup: _Setup, q, k, v, alibi):
    wide, lse_dtype = _accumulator_dtypes(q)
    batch, n, heads, _ = q.shape
    out_acc = torch.zeros((batch, n, heads, v.shape[3]), dtype=wide, device=q.device)
    lse_acc = torch.full((batch, heads, n), -math.inf, dtype=lse_dtype, device=q.device)
    rows = _Rows()
    plan = setup.ring
    k_held, v_held = k, v
    for step in range(plan.steps):
        works = None
        if step + 1 < plan.steps:  # the next chunk moves while this one is used
            k_next, v_next = torch.empty_like(k), torch.empty_like(v)
            works = _start_transfers(setup.group, [k_held, v_held], [k_next, v_next],
                                     setup.next_rank, setup.prev_rank, _KV_TAG)
        _forward_calls(setup, q, k_held, v_held, plan.rank_calls(setup.rank, step), out_acc, lse_acc, rows, alibi)
        if works is not None:
            _wait(works)
            k_held, v_held = k_next, v_next
    return out_acc, lse_acc


def _ring_backward(setup: _Setup, dout, q, k, v, out, lse, alibi):
    wide, _ = _accumulator_dtypes(q)
    plan = setup.ring
    dq_acc = torch.zeros(q.shape, dtype=wide, device=q.device)
    k_held, v_held = k, v
    incoming = None  # (works, dk, dv, sent...): the accumulators arriving for the chunk held next
    for step in range(plan.steps):
        kv_works = None
        if step + 1 < plan.steps:
            k_next, v_next = torch.empty_like(k), torch.empty_like(v)
            kv_works = _start_transfers(setup.group, [k_held, v_held], [k_next, v_next],
                                        setup.next_rank, setup.prev_rank, _KV_TAG)
        parts = []
        for call in plan.rank_calls(setup.rank, step):
            rows = slice(call.q_lo, call.q_hi)
            dq, dk, dv = cuflash.backward(
                dout[:, rows], q[:, rows], k_held[:, call.k_lo:call.k_hi], v_held[:, call.k_lo:call.k_hi],
                out[:, rows], lse[:, :, rows].contiguous(), alibi_slopes=alibi, **call.kernel_options(setup.options))
            dq_acc[:, rows] += dq
            parts.append((call, dk, dv))
        if incoming is None:
            dk_acc = torch.zeros(k.shape, dtype=wide, device=k.device)
            dv_acc = torch.zeros(v.shape, dtype=wide, device=v.device)
        else:
            _wait(incoming[0])
            dk_acc, dv_acc = incoming[1], incoming[2]
        for call, dk, dv in parts:
            dk_acc[:, call.k_lo:call.k_hi] += dk
            dv_acc[:, call.k_lo:call.k_hi] += dv
        # The accumulators follow their K/V chunk one rank on; after the last step they go
        # straight home to the chunk's owner (rank - steps + 1), which receives its own.
        if step + 1 < plan.steps:
            to, source = setup.next_rank, setup.prev_rank
        else:
            to, source = (setup.rank - step) % setup.world, (setup.rank + step) % setup.world
        if plan.steps == 1:
            return dq_acc, dk_acc, dv_acc  # nothing left home
        dk_in, dv_in = torch.empty_like(dk_acc), torch.empty_like(dv_acc)
        works = _start_transfers(setup.group, [dk_acc, dv_acc], [dk_in, dv_in], to, source, _DKV_TAG)
        incoming = (works, dk_in, dv_in, dk_acc, dv_acc)  # the sent accumulators live until waited
        if kv_works is not None:
            _wait(kv_works)
            k_held, v_held = k_next, v_next
    _wait(incoming[0])
    return dq_acc, incoming[1], incoming[2]


def _gathered_forward(setup: _Setup, q, k, v, alibi):
    k_all = _to_global_order(_all_gather_dim0(k, setup.group, setup.world), setup.sharding, setup.world)
    v_all = _to_global_order(_all_gather_dim0(v, setup.group, setup.world), setup.sharding, setup.world)
    wide, lse_dtype = _accumulator_dtypes(q)
    batch, n, heads, _ = q.shape
    out_acc = torch.zeros((batch, n, heads, v.shape[3]), dtype=wide, device=q.device)
    lse_acc = torch.full((batch, heads, n), -math.inf, dtype=lse_dtype, device=q.device)
    _forward_calls(setup, q, k_all, v_all, setup.gathered_calls[setup.rank], out_acc, lse_acc, _Rows(), alibi)
    return out_acc, lse_acc, k_all, v_all


def _gathered_backward(setup: _Setup, dout, q, k_all, v_all, out, lse, alibi):
    wide, _ = _accumulator_dtypes(q)
    dq_acc = torch.zeros(q.shape, dtype=wide, device=q.device)
    dk_all = torch.zeros(k_all.shape, dtype=wide, device=q.device)
    dv_all = torch.zeros(v_all.shape, dtype=wide, device=q.device)
    for call in setup.gathered_calls[setup.rank]:
        rows, keys = slice(call.q_lo, call.q_hi), slice(call.k_lo, call.k_hi)
        dq, dk, dv = cuflash.backward(dout[:, rows], q[:, rows], k_all[:, keys], v_all[:, keys], out[:, rows],
                                      lse[:, :, rows].contiguous(), alibi_slopes=alibi,
                                      **call.kernel_options(setup.options))
        dq_acc[:, rows] += dq
        dk_all[:, keys] += dk
        dv_all[:, keys] += dv
    dk = _reduce_scatter_dim0(_to_rank_order(dk_all, setup.sharding, setup.world), setup.group, setup.world)
    dv = _reduce_scatter_dim0(_to_rank_order(dv_all, setup.sharding, setup.world), setup.group, setup.world)
    return dq_acc, dk, dv


class _ContextParallelAttention(torch.autograd.Function):
    """Forward and backward of context-parallel attention; each step calls cuflash.forward
    or cuflash.backward on local tensors."""

    @staticmethod
    def forward(ctx, q, k, v, alibi, setup: _Setup):
        q, k, v = (t.detach().contiguous() for t in (q, k, v))
        alibi = None if alibi is None else alibi.detach()
        if setup.placement == "allgather":
            out_acc, lse, k_saved, v_saved = _gathered_forward(setup, q, k, v, alibi)
        else:
            out_acc, lse = _ring_forward(setup, q, k, v, alibi)
            k_saved, v_saved = k, v
        out = out_acc.to(q.dtype)
        # The backward's D = rowsum(dO * O) must use this rounded output, as one GPU's does.
        ctx.save_for_backward(q, k_saved, v_saved, out, lse, alibi)
        ctx.setup = setup
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, alibi = ctx.saved_tensors
        setup = ctx.setup
        dout = dout.contiguous()
        if setup.placement == "allgather":
            dq, dk, dv = _gathered_backward(setup, dout, q, k, v, out, lse, alibi)
        else:
            dq, dk, dv = _ring_backward(setup, dout, q, k, v, out, lse, alibi)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


# ---- the entry point ----------------------------------------------------------------------


def _offsets_supported() -> bool:
    return "position_offsets" in cuflash.OPTION_NAMES


def _choose_placement(placement: str, sharding: str, q: Tensor, k: Tensor, v: Tensor, world: int) -> str:
    if placement != "auto":
        return "ring" if placement == "zigzag" else placement
    # All-gathering costs world x the local K/V in memory and moves the same bytes as the
    # ring, in one collective that nothing overlaps; it pays off when K/V are small (GQA,
    # MQA): one kernel call per query chunk instead of one per step, no merges.
    gathered = world * (k.numel() * k.element_size() + v.numel() * v.element_size())
    return "allgather" if gathered <= q.numel() * q.element_size() else "ring"


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: Any = None,
    placement: str = "ring",
    sharding: str | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    causal_alignment: str = "bottom_right",
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    deterministic: bool = False,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of this rank's queries to the whole sequence split across `group`.

    q (batch, seqlen_local, heads, head_dim), k and v (batch, seqlen_local, heads_kv,
    head_dim): this rank's chunk (see the module docstring for placements and shardings).
    Differentiable in q, k and v. Returns the local output chunk (q's shape and dtype), or
    (out, lse) with return_lse=True, lse (batch, heads, seqlen_local) fp32 (float64 for
    float64 inputs), the log-sum-exp over the whole sequence, -inf for a row with no key.

    The options mean what they mean for cuflash.attention over the whole sequence
    (positions are global). Query and key sequences are the same, so causal_alignment
    makes no difference. dropout_p > 0 with seed=None uses a seed drawn on rank 0.
    Collective: every rank of the group must call it with equal chunk shapes and options."""
    group = group if group is not None else dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    # A list becomes a tuple; anything else goes to the core's check as given (tuple(5)
    # would raise an unrelated TypeError).
    window = (-1, -1) if window_size is None else tuple(window_size) if isinstance(window_size, (list, tuple)) else window_size
    if sharding is None:
        sharding = "zigzag" if placement == "zigzag" else "contiguous"
    options = dict(softmax_scale=softmax_scale, causal=causal, causal_alignment=causal_alignment,
                   window_size=window, softcap=softcap, dropout_p=dropout_p, seed=seed, deterministic=deterministic)
    reasons = _local_reasons(q, k, v, alibi_slopes, placement, sharding, group, options)
    if not isinstance(return_lse, (bool, np.bool_)):
        reasons.append(f"return_lse={return_lse!r} must be a bool")
    seed = _exchange(q, k, v, alibi_slopes, placement, sharding, group, options, reasons)
    if dropout_p and dropout_p > 0:
        options["seed"] = int(seed)
    else:
        options["seed"] = None
    chosen = _choose_placement(placement, sharding, q, k, v, world)
    feats = _cp_plan.Features(causal=bool(causal), window_size=window, alibi=alibi_slopes is not None,
                              dropout=bool(dropout_p and dropout_p > 0), offsets_supported=_offsets_supported())
    n = q.shape[1]
    if chosen == "allgather":
        setup = _Setup(group, rank, world, "allgather", sharding, options, None,
                       _cp_plan.allgather_plan(sharding, world, n, feats, _WHERE))
    else:
        setup = _Setup(group, rank, world, "ring", sharding, options,
                       _cp_plan.ring_plan(sharding, world, n, feats, _WHERE), None)
    out, lse = _ContextParallelAttention.apply(q, k, v, alibi_slopes, setup)
    return (out, lse) if return_lse else out
