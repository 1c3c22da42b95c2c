"""Context parallelism in JAX: one attention over a sequence sharded across a mesh axis.

    import cuflash.jax_distributed as cp
    mesh = jax.make_mesh((jax.device_count(),), ("seq",))
    q, k, v = cp.zigzag_shard(q), ...                         # for placement="zigzag"
    out = jax.jit(functools.partial(cp.ring_attention, mesh=mesh, axis_name="seq",
                                    placement="zigzag", causal=True))(q, k, v)
    out = cp.zigzag_unshard(out, mesh.shape["seq"])

`ring_attention` takes global arrays (batch, seqlen, heads, head_dim) and runs
`ring_attention_shard` under `jax.shard_map`, the sequence axis split over `axis_name`;
call `ring_attention_shard` directly inside your own shard_map (its q, k, v are then the
local chunks). Works under jit and grad (a custom_vjp over the whole ring).

Placements and shardings are those of cuflash.distributed (see its docstring): "ring"
(contiguous chunks), "zigzag" (chunks r and 2W-1-r: shard the global arrays with
`zigzag_shard` first, so that shard_map's contiguous split gives each device its zigzag
pair), "allgather" (either sharding), "auto". The geometry is cuflash/_cp_plan.py, shared
with PyTorch. K/V travel with `jax.lax.ppermute`; the backward sends the dK/dV
accumulators (fp32) around with them and home to their owner; `lax.all_gather` and
`lax.psum_scatter` serve the all-gather placement. Every device runs the same program, so
the calls of a step that differ between ranks (causal blocks: full, diagonal or skipped)
are the branches of a `lax.switch` on `lax.axis_index`; only one runs. XLA schedules
the collective-permutes against the kernels itself (async collectives on GPU).

Each step calls cuflash.jax.forward / backward, so on CPU it runs the jax.numpy
reference (tested with XLA_FLAGS=--xla_force_host_platform_device_count=4) and on GPUs
the kernels.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

import cuflash

from . import _cp_plan
from . import jax as cfj
from ._validate import check_options

__all__ = ["ring_attention", "ring_attention_shard", "zigzag_shard", "zigzag_unshard", "PLACEMENTS"]

PLACEMENTS = ("ring", "zigzag", "allgather", "auto")
_WHERE = "cuflash.jax_distributed.ring_attention"


# ---- sharding helpers (global arrays) -------------------------------------------------------


def _chunks(x, world: int, dim: int, where: str):
    if isinstance(world, bool) or not isinstance(world, (int, np.integer)):
        raise ValueError(f"{where}: world={world!r} must be an int >= 1")
    if world < 1:
        raise ValueError(f"{where}: world={world!r} must be >= 1")
    if x.shape[dim] % (2 * world):
        raise ValueError(f"{where}: the sequence length x.shape[{dim}]={x.shape[dim]} must be a multiple of "
                         f"2 * world={2 * world}")
    return jnp.split(x, 2 * world, axis=dim)


def zigzag_shard(x, world: int, dim: int = 1):
    """The global sequence reordered so that a contiguous split into `world` parts gives
    device r the chunks r and 2 world - 1 - r of 2 world."""
    chunks = _chunks(x, world, dim, "zigzag_shard")
    return jnp.concatenate([chunks[c] for r in range(world) for c in (r, 2 * world - 1 - r)], axis=dim)


def zigzag_unshard(x, world: int, dim: int = 1):
    """The inverse of zigzag_shard."""
    chunks = _chunks(x, world, dim, "zigzag_unshard")
    placed = {}
    for r in range(world):
        placed[r], placed[2 * world - 1 - r] = chunks[2 * r], chunks[2 * r + 1]
    return jnp.concatenate([placed[g] for g in range(2 * world)], axis=dim)


# ---- the per-device computation ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Setup:
    axis_name: Any
    world: int
    placement: str  # "ring" or "allgather"
    sharding: str
    options: tuple  # cuflash.jax keyword options, as sorted (name, value) pairs
    ring: _cp_plan.RingPlan | None
    gathered_calls: tuple | None

    def kernel_options(self, call: _cp_plan.Call) -> dict:
        return call.kernel_options(dict(self.options))


def _wide(dtype) -> Any:
    return jnp.float64 if np.dtype(dtype) == np.float64 else jnp.float32


def _merge(out_acc, lse_acc, out_part, lse_part):
    """The running (out, lse) with a partial attention over other keys folded in:
    max-shifted log-sum-exp; rows with no key on either side stay 0 / -inf."""
    top = jnp.maximum(lse_acc, lse_part)
    shift = jnp.where(jnp.isfinite(top), top, 0.0)
    lse = shift + jnp.log(jnp.exp(lse_acc - shift) + jnp.exp(lse_part - shift))
    live = jnp.isfinite(lse)
    safe = jnp.where(live, lse, 0.0)
    w_acc = jnp.where(live, jnp.exp(lse_acc - safe), 0.0)
    w_part = jnp.where(live, jnp.exp(lse_part - safe), 0.0)
    per_row = lambda w: jnp.transpose(w, (0, 2, 1))[..., None].astype(out_acc.dtype)  # noqa: E731
    return out_acc * per_row(w_acc) + out_part.astype(out_acc.dtype) * per_row(w_part), lse.astype(lse_acc.dtype)


def _forward_calls(setup: _Setup, calls, carry, q, k_held, v_held, alibi):
    out_acc, lse_acc = carry
    for call in calls:
        out_p, lse_p = cfj.forward(q[:, call.q_lo:call.q_hi], k_held[:, call.k_lo:call.k_hi],
                                   v_held[:, call.k_lo:call.k_hi], alibi_slopes=alibi, **setup.kernel_options(call))
        rows = slice(call.q_lo, call.q_hi)
        # Merging into the initial (0, -inf) is exact (weights 0 and 1), so rows without an
        # earlier result need no separate path; XLA fuses the merge's elementwise work.
        out_new, lse_new = _merge(out_acc[:, rows], lse_acc[:, :, rows], out_p, lse_p)
        out_acc = out_acc.at[:, rows].set(out_new)
        lse_acc = lse_acc.at[:, :, rows].set(lse_new)
    return out_acc, lse_acc


def _backward_calls(setup: _Setup, calls, carry, dout, q, k_held, v_held, out, lse, alibi):
    dq_acc, dk_acc, dv_acc = carry
    for call in calls:
        rows, keys = slice(call.q_lo, call.q_hi), slice(call.k_lo, call.k_hi)
        dq, dk, dv = cfj.backward(dout[:, rows], q[:, rows], k_held[:, keys], v_held[:, keys], out[:, rows],
                                  lse[:, :, rows], alibi_slopes=alibi, **setup.kernel_options(call))
        dq_acc = dq_acc.at[:, rows].add(dq.astype(dq_acc.dtype))
        dk_acc = dk_acc.at[:, keys].add(dk.astype(dk_acc.dtype))
        dv_acc = dv_acc.at[:, keys].add(dv.astype(dv_acc.dtype))
    return dq_acc, dk_acc, dv_acc


def _per_rank(setup: _Setup, calls_of_rank: Sequence, run, carry, *operands):
    """run(calls, carry, *operands) with this device's calls: one branch per distinct call
    list, picked by the device's index on the axis."""
    distinct = sorted(set(calls_of_rank), key=list(calls_of_rank).index)
    if len(distinct) == 1:
        return run(distinct[0], carry, *operands)
    branch_of_rank = jnp.asarray([distinct.index(c) for c in calls_of_rank], dtype=jnp.int32)
    branches = [functools.partial(run, calls) for calls in distinct]
    return lax.switch(branch_of_rank[lax.axis_index(setup.axis_name)], branches, carry, *operands)


def _shift(setup: _Setup, x, by: int):
    """x from the device `by` places before this one on the axis."""
    if by % setup.world == 0:
        return x
    return lax.ppermute(x, setup.axis_name, [(i, (i + by) % setup.world) for i in range(setup.world)])


def _gather_global(setup: _Setup, x):
    """(batch, n, ...) on every device -> (batch, world * n, ...) in sequence order."""
    gathered = lax.all_gather(x, setup.axis_name, axis=0)  # (world, batch, n, ...)
    parts = 1 if setup.sharding == "contiguous" else 2
    chunks = jnp.reshape(gathered, gathered.shape[:2] + (parts, x.shape[1] // parts) + x.shape[2:])
    order = _cp_plan.global_chunk_order(setup.sharding, setup.world)
    return jnp.concatenate([chunks[r, :, i] for r, i in order], axis=1)


def _scatter_home(setup: _Setup, whole):
    """The inverse of _gather_global for gradients: (batch, N, ...) summed over devices,
    each receiving its own chunk(s)."""
    parts = 1 if setup.sharding == "contiguous" else 2
    chunk = whole.shape[1] // (parts * setup.world)
    pieces = {}
    for g, (r, i) in enumerate(_cp_plan.global_chunk_order(setup.sharding, setup.world)):
        pieces[r, i] = whole[:, g * chunk:(g + 1) * chunk]
    per_rank = jnp.stack([jnp.concatenate([pieces[r, i] for i in range(parts)], axis=1) for r in range(setup.world)])
    return lax.psum_scatter(per_rank, setup.axis_name, scatter_dimension=0)


def _forward(setup: _Setup, q, k, v, alibi):
    batch, n, heads, _ = q.shape
    wide = _wide(q.dtype)
    carry = (jnp.zeros((batch, n, heads, v.shape[3]), wide), jnp.full((batch, heads, n), -jnp.inf, wide))
    if setup.placement == "allgather":
        k_all, v_all = _gather_global(setup, k), _gather_global(setup, v)
        carry = _per_rank(setup, setup.gathered_calls, functools.partial(_forward_calls, setup), carry,
                          q, k_all, v_all, alibi)
        return carry
    plan = setup.ring
    k_held, v_held = k, v
    for step in range(plan.steps):
        calls = [plan.rank_calls(r, step) for r in range(setup.world)]
        carry = _per_rank(setup, calls, functools.partial(_forward_calls, setup), carry, q, k_held, v_held, alibi)
        if step + 1 < plan.steps:
            k_held, v_held = _shift(setup, k_held, 1), _shift(setup, v_held, 1)
    return carry


def _backward(setup: _Setup, dout, q, k, v, out, lse, alibi):
    wide = _wide(q.dtype)
    zeros = lambda x: jnp.zeros(x.shape, wide)  # noqa: E731
    run = functools.partial(_backward_calls, setup)
    if setup.placement == "allgather":
        k_all, v_all = _gather_global(setup, k), _gather_global(setup, v)
        dq, dk_all, dv_all = _per_rank(setup, setup.gathered_calls, run, (zeros(q), zeros(k_all), zeros(v_all)),
                                       dout, q, k_all, v_all, out, lse, alibi)
        return dq, _scatter_home(setup, dk_all), _scatter_home(setup, dv_all)
    plan = setup.ring
    k_held, v_held = k, v
    dq, dk_acc, dv_acc = zeros(q), zeros(k), zeros(v)
    for step in range(plan.steps):
        calls = [plan.rank_calls(r, step) for r in range(setup.world)]
        dq, dk_acc, dv_acc = _per_rank(setup, calls, run, (dq, dk_acc, dv_acc), dout, q, k_held, v_held, out, lse,
                                       alibi)
        if step + 1 < plan.steps:
            # The accumulators travel with their K/V chunk.
            k_held, v_held = _shift(setup, k_held, 1), _shift(setup, v_held, 1)
            dk_acc, dv_acc = _shift(setup, dk_acc, 1), _shift(setup, dv_acc, 1)
    # After the last step device r holds the sums for the chunk of device r - steps + 1:
    # send them home.
    home = -(plan.steps - 1)
    return dq, _shift(setup, dk_acc, home), _shift(setup, dv_acc, home)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _context_parallel(setup: _Setup, q, k, v, alibi):
    out, lse = _forward(setup, q, k, v, alibi)
    return out.astype(q.dtype), lse


def _context_parallel_fwd(setup: _Setup, q, k, v, alibi):
    out, lse = _forward(setup, q, k, v, alibi)
    out = out.astype(q.dtype)  # the backward's D = rowsum(dO * O) uses this rounded output
    return (out, lse), (q, k, v, alibi, out, lse)


def _context_parallel_bwd(setup: _Setup, residuals, cotangents):
    q, k, v, alibi, out, lse = residuals
    dout, _ = cotangents  # lse leaves through stop_gradient
    dq, dk, dv = _backward(setup, dout.astype(q.dtype), q, k, v, out, lse, alibi)
    d_alibi = None if alibi is None else jnp.zeros_like(alibi)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_alibi


_context_parallel.defvjp(_context_parallel_fwd, _context_parallel_bwd)


# ---- entry points -----------------------------------------------------------------------------


def _setup(where, q, k, v, axis_name, world, placement, sharding, alibi_slopes, options) -> _Setup:
    reasons = []
    if placement not in PLACEMENTS:
        reasons.append(f"placement={placement!r} must be one of {PLACEMENTS}")
    if sharding is None:
        sharding = "zigzag" if placement == "zigzag" else "contiguous"
    if sharding not in _cp_plan.SHARDINGS:
        reasons.append(f"sharding={sharding!r} must be one of {_cp_plan.SHARDINGS} (or None)")
    elif placement == "zigzag" and sharding != "zigzag":
        reasons.append(f"placement='zigzag' needs sharding='zigzag' (got sharding={sharding!r})")
    if any(np.ndim(x) != 4 for x in (q, k, v)):
        reasons.append(f"q, k, v must be 4-D (batch, seqlen_local, heads, head_dim); got shapes "
                       f"{np.shape(q)}, {np.shape(k)}, {np.shape(v)}")
    elif not (q.shape[:2] == k.shape[:2] == v.shape[:2]):
        reasons.append(f"q {q.shape}, k {k.shape} and v {v.shape} must have the same batch and local length")
    elif sharding == "zigzag" and q.shape[1] % 2:
        reasons.append(f"zigzag sharding holds two equal chunks: seqlen_local=q.shape[1]={q.shape[1]} must be even")
    if options["dropout_p"] and options["dropout_p"] > 0 and options["seed"] is None:
        reasons.append(f"seed=None with dropout_p={options['dropout_p']}: give a static int seed")
    if reasons:
        raise ValueError(f"{where}: invalid input:\n  - " + "\n  - ".join(reasons))
    if placement == "auto":
        gathered = world * (k.size * k.dtype.itemsize + v.size * v.dtype.itemsize)
        placement = "allgather" if gathered <= q.size * q.dtype.itemsize else "ring"
    elif placement == "zigzag":
        placement = "ring"
    feats = _cp_plan.Features(bool(options["causal"]), tuple(options["window_size"]), alibi_slopes is not None,
                              bool(options["dropout_p"] and options["dropout_p"] > 0),
                              "position_offsets" in cuflash.OPTION_NAMES)
    n = q.shape[1]
    ring = _cp_plan.ring_plan(sharding, world, n, feats, where) if placement == "ring" else None
    gathered_calls = _cp_plan.allgather_plan(sharding, world, n, feats, where) if placement == "allgather" else None
    return _Setup(axis_name, world, placement, sharding, tuple(sorted(options.items())), ring, gathered_calls)


def _options(softmax_scale, causal, window_size, softcap, dropout_p, seed, deterministic,
             causal_alignment="bottom_right") -> dict:
    # Judged by the core's rules before any conversion (float("a"), bool("no") and
    # int(-1.9) would otherwise raise an unrelated error or run another option).
    check_options(_WHERE, softmax_scale=softmax_scale, causal=causal, causal_alignment=causal_alignment,
                  window_size=window_size, softcap=softcap, dropout_p=dropout_p, seed=seed,
                  deterministic=deterministic)
    return dict(softmax_scale=None if softmax_scale is None else float(softmax_scale), causal=bool(causal),
                window_size=tuple(int(w) for w in (window_size if window_size is not None else (-1, -1))),
                softcap=float(softcap or 0.0), dropout_p=float(dropout_p or 0.0),
                seed=None if seed is None else int(seed), deterministic=bool(deterministic))


def ring_attention_shard(
    q, k, v, *, axis_name: Any, placement: str = "ring", sharding: str | None = None,
    softmax_scale: float | None = None, causal: bool = False, causal_alignment: str = "bottom_right",
    window_size: Sequence[int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Any = None,
    dropout_p: float = 0.0, seed: int | None = None, deterministic: bool = False, return_lse: bool = False,
):
    """Context-parallel attention of this device's chunk, inside shard_map over axis_name.

    q (batch, seqlen_local, heads, head_dim), k and v (batch, seqlen_local, heads_kv,
    head_dim): this device's chunk in the placement's sharding. Returns the local output
    chunk, or (out, lse) with return_lse=True (lse without gradient). The options mean
    what they mean for cuflash.jax.attention over the whole sequence; causal_alignment
    makes no difference (query and key sequences are the same)."""
    world = lax.axis_size(axis_name)
    options = _options(softmax_scale, causal, window_size, softcap, dropout_p, seed, deterministic, causal_alignment)
    setup = _setup(_WHERE, q, k, v, axis_name, world, placement, sharding, alibi_slopes, options)
    alibi = None if alibi_slopes is None else lax.stop_gradient(jnp.asarray(alibi_slopes, jnp.float32))
    out, lse = _context_parallel(setup, q, k, v, alibi)
    lse = lax.stop_gradient(lse)
    return (out, lse) if return_lse else out


def _place(x, mesh, spec):
    sharding = jax.sharding.NamedSharding(mesh, spec)
    explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
    if hasattr(jax, "reshard") and explicit is not None and all(
            t == explicit for t in getattr(mesh, "axis_types", ())):
        return jax.reshard(x, sharding)
    return lax.with_sharding_constraint(x, sharding)


def ring_attention(
    q, k, v, *, mesh, axis_name: Any, placement: str = "ring", sharding: str | None = None,
    softmax_scale: float | None = None, causal: bool = False, causal_alignment: str = "bottom_right",
    window_size: Sequence[int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Any = None,
    dropout_p: float = 0.0, seed: int | None = None, deterministic: bool = False, return_lse: bool = False,
):
    """Context-parallel attention over global arrays (batch, seqlen, heads, head_dim), the
    sequence split over mesh axis `axis_name` (other mesh axes replicate). For
    placement="zigzag" (or sharding="zigzag") the arrays must be in zigzag_shard order,
    and so is the result. Returns out (q's shape, same sharding), or (out, lse)."""
    if axis_name not in mesh.shape:
        raise ValueError(f"{_WHERE}: axis_name={axis_name!r} must be one of the mesh's axes {tuple(mesh.shape)}")
    _options(softmax_scale, causal, window_size, softcap, dropout_p, seed, deterministic, causal_alignment)
    if any(np.ndim(x) != 4 for x in (q, k, v)):
        raise ValueError(f"{_WHERE}: q, k, v must be 4-D (batch, seqlen, heads, head_dim); got shapes "
                         f"{np.shape(q)}, {np.shape(k)}, {np.shape(v)}")
    world = mesh.shape[axis_name]
    if np.shape(q)[1] % world:
        raise ValueError(f"{_WHERE}: the sequence length q.shape[1]={np.shape(q)[1]} must be a multiple of the "
                         f"mesh axis {axis_name!r} size {world}")
    seq = P(None, axis_name, None, None)
    kwargs = dict(axis_name=axis_name, placement=placement, sharding=sharding, softmax_scale=softmax_scale,
                  causal=causal, causal_alignment=causal_alignment, window_size=window_size, softcap=softcap,
                  dropout_p=dropout_p, seed=seed, deterministic=deterministic, return_lse=True)

    def local(q_, k_, v_, slopes):
        return ring_attention_shard(q_, k_, v_, alibi_slopes=slopes, **kwargs)

    slopes_spec = None if alibi_slopes is None else P()
    # Put the arrays where shard_map wants them (meshes with explicit axes insist).
    q, k, v = (_place(x, mesh, seq) for x in (q, k, v))
    run = jax.shard_map(local, mesh=mesh, in_specs=(seq, seq, seq, slopes_spec),
                        out_specs=(seq, P(None, None, axis_name)), check_vma=False)
    out, lse = run(q, k, v, alibi_slopes)
    return (out, lse) if return_lse else out
