"""Kernel launches on the caller's stream.

`run_forward` and `run_backward` work on CuPy views of memory someone else allocated (the
caller's library, or JAX inside a jitted computation) and never synchronise the device.
`forward` and `backward` are the API's CUDA path: they allocate outputs in the caller's
library and return them in the caller's array type.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

import numpy as np

from . import _build, _fast, _interop, _params, _tiles, _tma
from ._interop import BFLOAT16
from ._options import Options
from ._params import Views
from ._validate import Dims

_MAX_GRID = 2**31 - 1
_log = logging.getLogger("cuflash")
_smem_limits: dict[int, int] = {}
_limits_lock = threading.Lock()


def smem_limit(device_index: int) -> int:
    with _limits_lock:
        if device_index not in _smem_limits:
            import cupy

            attrs = cupy.cuda.Device(device_index).attributes
            limit = int(attrs["MaxSharedMemoryPerBlockOptin"])
            arch = _build.arch_of(device_index)
            if arch.startswith("compute_"):  # an older family on a newer GPU: its own budget
                limit = min(limit, _tiles.limit_for(arch))
            _smem_limits[device_index] = limit
        return _smem_limits[device_index]


_sm_counts: dict[int, int] = {}


def sm_count(device_index: int) -> int:
    with _limits_lock:
        if device_index not in _sm_counts:
            import cupy

            _sm_counts[device_index] = int(cupy.cuda.Device(device_index).attributes["MultiProcessorCount"])
        return _sm_counts[device_index]


_functions: dict[tuple[int, str], Any] = {}


def _launch(mod: Any, name: str, blocks: int, threads: int, smem: int, params: np.ndarray, stream: Any,
            extra: tuple = ()) -> None:
    """Launch kernel `name` of `mod`; `params` is the Params record as `_params.as_argument`
    makes it, passed by value, followed by the `extra` arguments (TMA descriptors)."""
    if blocks == 0:
        return
    if blocks > _MAX_GRID:
        raise ValueError(f"{name}: {blocks} thread blocks exceed the grid limit {_MAX_GRID}")
    key = (id(mod), name)
    kernel = _functions.get(key)
    if kernel is None:
        kernel = mod.get_function(name)
        if smem > 48 * 1024:
            kernel.max_dynamic_shared_size_bytes = smem
        _functions[key] = kernel
    kernel((blocks,), (threads,), (params, *extra), shared_mem=smem, stream=stream)


@dataclasses.dataclass(frozen=True)
class Launch:
    mod: Any
    name: str
    blocks: int
    threads: int
    smem: int
    tensor_maps: _tma.ForwardMaps | None = None  # TMA descriptors, rebuilt per pointers


@dataclasses.dataclass(frozen=True)
class Plan:
    """The kernel launches of one call, in order, and the Params record they all read."""

    launches: tuple[Launch, ...]
    record: np.ndarray

    def run(self, stream: Any, argument: np.ndarray | None = None) -> bool:
        """Launch on `stream`, with `argument` (a record as `_params.as_argument` gives it,
        e.g. from `_params.Repointer`) in place of the plan's own record. Returns False,
        launching nothing, when a kernel reading through TMA gets pointers TMA cannot read
        (the call must be planned afresh)."""
        if argument is None:
            argument = _params.as_argument(self.record)
        extras = []
        for k in self.launches:
            extra = () if k.tensor_maps is None else k.tensor_maps.arguments(argument)
            if extra is None:
                return False
            extras.append(extra)
        for k, extra in zip(self.launches, extras):
            _launch(k.mod, k.name, k.blocks, k.threads, k.smem, argument, stream, extra)
        return True


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- on views -----------------------------------------------------------------------------


def _block_size(views: Views) -> tuple[int, int] | None:
    """Block-sparse calls compile the list-walking kernels, with tiles dividing the blocks."""
    return None if views.block_sparse is None else tuple(views.block_sparse.block_size)


def _forward_kernel(views: Views, opts: Options, dims: Dims, device_index: int,
                    record: Any) -> tuple[_build.Variant, _tiles.Tiles, int, _tma.ForwardMaps | None]:
    """(variant, tiles, shared memory, TMA maps or None) of the forward: the warp-specialised
    kernel (with or without score modifiers) where the planner picks it and TMA can read q,
    k and v, else what the planner picks without TMA (the wgmma kernel, or with modifiers
    the portable one)."""
    dtype = np.dtype(views.q.dtype)
    general, arch, limit = _params.is_general(opts), _build.arch_of(device_index), smem_limit(device_index)
    block_size = _block_size(views)
    variant, tiles, smem = _tiles.forward_variant(dtype, dims.head_dim, general, limit, arch, tma=True,
                                                  block_size=block_size)
    if variant.kernel_file != _tiles.WS_FWD_FILE:
        return variant, tiles, smem, None
    maps = _tma.forward_maps(views, opts.layout, dims.varlen, tiles.block_m, tiles.block_n,
                             _params.params_dtype(), lambda a: _params.qkv_strides(a, opts, dims.varlen))
    if maps is not None:
        try:
            maps.arguments(_params.as_argument(record.pack()))  # encoded now, cached for the launch
            return variant, tiles, smem, maps
        except RuntimeError as exc:  # a layout the driver refuses: a kernel without TMA serves it
            _log.warning("cuflash: TMA descriptors refused (%s); using a forward without TMA", exc)
    return (*_tiles.forward_variant(dtype, dims.head_dim, general, limit, arch, block_size=block_size), None)


def run_forward(views: Views, opts: Options, dims: Dims, stream: Any, device_index: int) -> Plan | None:
    """Fill views.out and views.lse; return what was launched (None when nothing was:
    zero-size problems launch nothing, and a problem without keys is filled in place)."""
    rows = dims.batch * dims.num_heads
    if rows == 0 or dims.seqlen_q == 0:
        return None
    if dims.seqlen_k == 0:
        # No keys: every row is fully masked (output 0, LSE -inf).
        views.out.fill(0)
        views.lse.fill(-np.inf)
        return None
    p = _params.fill(views, opts, dims)
    variant, tiles, smem, maps = _forward_kernel(views, opts, dims, device_index, p)
    mod = _build.module(variant, device_index)
    p["num_m_blocks"] = _cdiv(dims.seqlen_q, tiles.block_m)
    blocks = p["num_m_blocks"] * rows
    if maps is not None and _tiles.WS_PERSISTENT and blocks <= _MAX_GRID:
        blocks = min(blocks, sm_count(device_index))  # the kernel loops over the query tiles
    plan = Plan((Launch(mod, "cuflash_fwd", blocks, tiles.threads, smem, maps),), p.pack())
    plan.run(stream)
    return plan


def run_probabilities(views: Views, opts: Options, dims: Dims, stream: Any, device_index: int) -> None:
    """Fill views.dbias_full (fp32 (batch, heads, seqlen_q, seqlen_k)) with the
    probabilities, from views.lse as the forward left it."""
    total = dims.batch * dims.num_heads * dims.seqlen_q * dims.seqlen_k
    if total == 0:
        return
    dtype = np.dtype(views.q.dtype)
    variant, _, _ = _tiles.forward_variant(dtype, dims.head_dim, _params.is_general(opts), smem_limit(device_index),
                                           block_size=_block_size(views))
    mod = _build.module(variant, device_index)
    p = _params.fill(views, opts, dims)
    Plan((Launch(mod, "cuflash_probs", _cdiv(total, 128), 128, 0),), p.pack()).run(stream)


def workspace_shapes(dims: Dims, opts: Options, want_dbias: bool) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Temporary fp32 buffers the backward needs (the caller allocates them)."""
    rows = (dims.num_heads, dims.total_q) if dims.varlen else (dims.batch, dims.num_heads, dims.seqlen_q)
    f32 = np.dtype(np.float32)
    shapes = {"dsum": (rows, f32), "lse_log2": (rows, f32)}
    if not opts.deterministic:
        shapes["dq_accum"] = (rows + (_tiles.head_dim_bucket(max(dims.head_dim, 1)),), f32)
    if want_dbias:
        shapes["dbias_full"] = ((dims.batch, dims.num_heads, dims.seqlen_q, dims.seqlen_k), f32)
    return shapes


def run_backward(views: Views, opts: Options, dims: Dims, stream: Any, device_index: int) -> Plan | None:
    """Fill views.dq, views.dk, views.dv (and views.dbias_full when given, which must
    arrive zero-filled); return what was launched (None for the zero-size problems, which
    are filled in place). Workspaces come from `workspace_shapes`."""
    dtype = np.dtype(views.q.dtype)
    if dims.batch * dims.num_heads == 0:
        return None
    if dims.seqlen_q == 0 or dims.seqlen_k == 0:
        # Nothing attends anything: every gradient is zero.
        for a in (views.dq, views.dk, views.dv):
            a.fill(0)
        return None
    plan = _tiles.backward_variant(
        dtype, dims.head_dim, _params.is_general(opts), smem_limit(device_index), _build.arch_of(device_index),
        _block_size(views),
    )
    mod = _build.module(plan.variant, device_index)
    dkdv_mod = _build.module(plan.dkdv_variant, device_index) if plan.dkdv_variant else mod
    atomic = not opts.deterministic
    p = _params.fill(views, opts, dims, dq_atomic=atomic, want_dbias=views.dbias_full is not None)
    p["num_m_blocks"] = _cdiv(dims.seqlen_q, plan.dq.block_m)
    p["num_n_blocks"] = _cdiv(dims.seqlen_k, plan.dkdv.block_n)
    bh = dims.batch * dims.num_heads
    launches = [
        Launch(mod, "cuflash_bwd_prep", _cdiv(dims.seqlen_q, 64) * bh, 128, 0),
        Launch(dkdv_mod, "cuflash_bwd_dkdv", p["num_n_blocks"] * dims.batch * dims.num_heads_kv,
               plan.dkdv.threads, plan.dkdv_smem),
    ]
    if atomic:
        launches.append(Launch(mod, "cuflash_bwd_dq_convert", _cdiv(dims.seqlen_q, 32) * bh, 128, 0))
    else:
        launches.append(Launch(mod, "cuflash_bwd_dq", p["num_m_blocks"] * bh, plan.dq.threads, plan.dq_smem))
    done = Plan(tuple(launches), p.pack())
    done.run(stream)
    return done


# ---- the API's CUDA path ----------------------------------------------------------------


def _option_views(call: Any, dims: Dims) -> dict[str, Any]:
    """Bias, mask, ALiBi slopes, cu_seqlens and the dropout state as the kernels read them."""
    import cupy

    out = {}
    bias = call.option_view("bias")
    if bias is not None:
        if np.dtype(bias.dtype) not in (np.dtype(np.float16), np.dtype(np.float32), _interop.BFLOAT16):
            bias = bias.astype(np.float32)  # float64 bias: read as fp32
        out["bias"] = bias
    mask = call.option_view("mask")
    if mask is not None:
        out["mask"] = mask
    slopes = call.option_view("alibi_slopes")
    if slopes is not None:
        out["alibi"] = cupy.ascontiguousarray(slopes, dtype=cupy.float32)
    for name in ("cu_seqlens_q", "cu_seqlens_k"):
        cu = call.option_view(name)
        if cu is not None:
            out[name] = cupy.ascontiguousarray(cu)
    state = call.option_view("rng_state")
    if state is not None:  # read by the kernels when they run: never copied (validated contiguous)
        out["rng_state"] = state
    size = call.opts.block_sparse_size
    if size is not None:
        from . import block_sparse

        dense = call.option_view("block_mask")
        if dense is not None:
            # Compacted on the device, on the caller's stream, with no synchronisation.
            shape = (block_sparse.num_blocks(dims.seqlen_q, size[0]), block_sparse.num_blocks(dims.seqlen_k, size[1]))
            out["block_sparse"] = block_sparse.compact(dense, size, shape)
        else:
            parts = {name: call.option_view(f"block_mask.{name}") for name in ("kv_count", "kv_index", "q_count", "q_index")}
            out["block_sparse"] = block_sparse.BlockSparse(size, verified=True, **parts)
    return out


def _require_dtype_support(call: Any) -> None:
    """bf16 needs Ampere or newer: Volta's and Turing's tensor cores have no bf16."""
    arch = _build.arch_of(call.device.index)
    if np.dtype(call.q.dtype) == BFLOAT16 and not _tiles.bf16_supported(arch):
        from ._validate import ValidationError

        raise ValidationError(call.where, [
            f"q.dtype=bfloat16 needs a GPU of compute capability 8.0 or newer; cuda:{call.device.index} runs {arch} "
            "kernels: use float16 (tensor cores) or float32"], [call.q])


def forward(call: Any, fast_key: tuple | None = None) -> tuple[Any, Any]:
    """`fast_key`: the call's signature for the plan cache (`_fast`), None if it has none."""
    _require_dtype_support(call)
    q, dims = call.q, call.dims
    f32 = np.dtype(np.float32)
    with _interop.on_device(call.device, call.stream):
        out_obj, out = _interop.empty(q.shape, q.dtype, q, call.stream)
        lse_obj, lse = _interop.empty(dims.lse_shape, f32, q, call.stream)
        views = Views(q=q.view, k=call.refs["k"].view, v=call.refs["v"].view, out=out, lse=lse,
                      **_option_views(call, dims))
        plan = run_forward(views, call.opts, dims, call.stream, call.device.index)
    if fast_key is not None and plan is not None:
        _fast.remember(fast_key, plan, views, call.opts, dims, call.device.index, inputs=("q", "k", "v"),
                       outputs=(("out", q.shape, q.dtype), ("lse", dims.lse_shape, f32)), returned=2)
    return _result(out_obj, out, q), _result(lse_obj, lse, q)


def probabilities(call: Any) -> Any:
    _require_dtype_support(call)
    q, dims = call.q, call.dims
    with _interop.on_device(call.device, call.stream):
        _, out = _interop.empty(q.shape, q.dtype, q, call.stream)
        _, lse = _interop.empty(dims.lse_shape, np.dtype(np.float32), q, call.stream)
        shape = (dims.batch, dims.num_heads, dims.seqlen_q, dims.seqlen_k)
        probs_obj, probs = _interop.empty(shape, np.dtype(np.float32), q, call.stream)
        views = Views(q=q.view, k=call.refs["k"].view, v=call.refs["v"].view, out=out, lse=lse, dbias_full=probs,
                      **_option_views(call, dims))
        run_forward(views, call.opts, dims, call.stream, call.device.index)
        run_probabilities(views, call.opts, dims, call.stream, call.device.index)
    return _result(probs_obj, probs, q)


def backward(call: Any, compute_dbias: bool = True, fast_key: tuple | None = None) -> tuple[Any, ...]:
    """`fast_key`: the call's signature for the plan cache (`_fast`), None if it has none."""
    _require_dtype_support(call)
    r, dims, opts = call.refs, call.dims, call.opts
    q, k, v = r["q"], r["k"], r["v"]
    bias_ref = call.option_refs.get("bias")
    want_dbias = bias_ref is not None and compute_dbias
    grads = (("dq", q), ("dk", k), ("dv", v))
    shapes = workspace_shapes(dims, opts, want_dbias)
    with _interop.on_device(call.device, call.stream):
        outs = {name: _interop.empty(like.shape, like.dtype, like, call.stream) for name, like in grads}
        work = {name: _interop.empty(shape, dt, q, call.stream)[1] for name, (shape, dt) in shapes.items()}
        if want_dbias:
            work["dbias_full"].fill(0)  # the kernels write only the tiles that attend
        views = Views(q=q.view, k=k.view, v=v.view, out=r["out"].view, lse=r["lse"].view, dout=r["dout"].view,
                      dq=outs["dq"][1], dk=outs["dk"][1], dv=outs["dv"][1], **work, **_option_views(call, dims))
        plan = run_backward(views, opts, dims, call.stream, call.device.index)
        results = [_result(*outs[name], ref) for name, ref in grads]
        if want_dbias:
            results.append(_reduce_dbias(work["dbias_full"], bias_ref, dims))
    if fast_key is not None and plan is not None and not want_dbias:
        outputs = tuple((name, like.shape, like.dtype) for name, like in grads)
        outputs += tuple((name, shape, dt) for name, (shape, dt) in shapes.items())
        _fast.remember(fast_key, plan, views, opts, dims, call.device.index,
                       inputs=("dout", "q", "k", "v", "out", "lse"), outputs=outputs, returned=3)
    return tuple(results)


def _reduce_dbias(full: Any, bias_ref: Any, dims: Dims) -> Any:
    """Sum the dense score gradient over the dimensions the bias was broadcast along, in
    the caller's library where it has one (PyTorch: its allocator, graph-capture safe)."""
    shape = bias_ref.shape
    padded = (1,) * (4 - len(shape)) + tuple(shape)
    axes = tuple(i for i, (s, t) in enumerate(zip(padded, full.shape)) if s == 1 and t != 1)
    if bias_ref.library == "torch":
        import torch

        full_t = torch.from_dlpack(full)
        reduced = full_t.sum(dim=axes, keepdim=True) if axes else full_t
        return reduced.reshape(shape).to(_interop._torch_dtype(bias_ref.dtype))
    reduced = full.sum(axis=axes, keepdims=True) if axes else full
    obj, view = _interop.empty(shape, bias_ref.dtype, bias_ref, None)
    view[...] = reduced.reshape(shape)
    return _result(obj, view, bias_ref)


def _result(obj: Any, view: Any, like: Any) -> Any:
    """The caller-typed result: the caller's own allocation when there is one."""
    if obj is not None:
        return obj
    return _interop.to_caller(view, like)
