"""cuflash for JAX: exact FlashAttention as a first-class JAX operation.

    import cuflash.jax as fa
    out = fa.attention(q, k, v, causal=True)             # jit, grad, vmap all work
    out, lse = fa.forward(q, k, v)
    out = fa.dot_product_attention(q, k, v, is_causal=True)   # jax.nn's signature

The options are those of `cuflash.attention` (README.md). Every option that is not an
array is static (a new value retraces); bias is differentiable; mask, alibi_slopes and
cu_seqlens are not (alibi_slopes gets no gradient: it passes through stop_gradient).
lse is returned through stop_gradient, as jax.nn.dot_product_attention's residual is.

How it runs
-----------
Each call is `lax.platform_dependent`: lowered for CUDA it runs the cuflash kernels,
lowered for any other platform (CPU) it runs cuflash/_reference_jnp.py, the reference
semantics in jax.numpy, so the same jitted, differentiated and vmapped code runs and is
tested on machines without a GPU. On CUDA, float64 inputs and empty problems also take
the jax.numpy reference (the kernels are fp16, bf16 and fp32).

On CUDA the kernels are launched from a `jax.experimental.buffer_callback`: XLA calls
our Python function during execution with its compute stream (`ctx.stream`) and the
device buffers of the operands and results. The callback wraps each buffer as a CuPy
array through DLPack (zero-copy; bfloat16 arrives as ml_dtypes.bfloat16), wraps the
stream with `cupy.cuda.Stream.from_external`, rebuilds `Dims` from the buffers' shapes
and `Options` from the static options, and calls `_launch.run_forward` or
`_launch.run_backward`, which enqueue the kernels on XLA's stream and return without
synchronising. Nothing is copied to the host, and no input buffer is ever written:
out and lse (forward), dq, dk, dv and the backward's fp32 workspaces (from
`_launch.workspace_shapes`: dsum, lse_log2, dq_accum, dbias_full) are all results of the
callback, allocated by XLA; dbias_full is zero-filled on the stream inside the callback
before the backward runs, and reduced to the bias's shape afterwards by XLA.

Why buffer_callback rather than an XLA FFI handler: the callback is plain Python that
jaxlib registers and calls, so it needs no C, no ctypes view of the XLA FFI API struct
(whose layout is versioned) and no registration step, and it goes through the same
`_launch` functions as the CuPy/PyTorch path. The price is Python on every call: about
0.1 ms per launch (measured on an H200 under jit: 137 us for a 16-token forward where
XLA takes 34 us), nothing next to attention at training sizes, and the kernels stay out
of CUDA graphs (command buffers; XLA runs the call outside them). An FFI handler is the
upgrade path if that overhead ever matters. `jax.pure_callback` is not an option: it
copies every operand to the host and back.

vmap
----
A `jax.custom_batching.custom_vmap` rule folds each mapped axis into the batch: arrays
(V, B, ...) become (V*B, ...), an unmapped operand is broadcast along V, bias and mask
keep size-1 (broadcast) batch axes without copying, and packed varlen arrays are
concatenated with their cu_seqlens shifted. One kernel launch then serves the whole
mapped batch, and the CPU path folds the same way so both compute the same thing.
(Dropout draws its mask from the global batch index, so under vmap example v of a mapped
batch of B sees batch indices v*B ... v*B + B - 1.) A mapped `dropout_key` (one key per
example) cannot share one launch, whose kernels read one [seed, offset]: the examples then
run one after another (lax.map), each with its own key and batch indices 0 ... B - 1.

Under jit
---------
Shapes, dtypes and every static option are validated when the function is traced, with
cuflash's usual one-error-lists-all message. Values of traced arrays cannot be checked:
under jit a varlen call needs static `max_seqlen_q` and `max_seqlen_k`, and the caller
promises what `cuflash.attention` would check: cu_seqlens start at 0, never decrease, end
at the packed row count (cu_seqlens_q[-1] == total_q; the vmap rule relies on it too),
and no sequence is longer than max_seqlen. cu_seqlens given as concrete arrays (eagerly,
or closed over under jit) are checked in full.

Dropout randomness
------------------
Dropout takes its randomness either from a static int `seed` (a trace-time constant: a
new seed retraces and recompiles) or from `dropout_key`, a `jax.random` key that may be
traced, so one compiled training step draws a fresh mask from each step's key. A key is
a typed key array of shape () (`jax.random.key`) or a raw uint32 key (`jax.random.PRNGKey`,
shape (2,) under the default threefry implementation). Inside the computation the key
becomes three uint32 words by `jax.random.bits(key, (3,), uint32)`, laid out as

    rng_state = uint32[seed_lo, seed_hi, offset, 0]      (`rng_state_from_key(key)`)

that is, the 64-bit Philox seed seed_lo + seed_hi * 2**32 and the 32-bit offset (Philox's
fourth counter word): no 64-bit JAX type is needed, and in memory the four words are the
two little-endian u64 [seed, offset] that the kernels read from Params.rng_state, so on
CUDA the buffer goes to them as it is, an operand of the callback read when the kernel
runs. On CPU the jax.numpy reference runs the same Philox4x32-10 on the traced words
(cuflash/_philox_jnp.py). Either way the keep mask is
`cuflash.reference.dropout_keep_mask(seed, dropout_p, shape, offset=offset, ...)` bit for
bit, keyed by global coordinates only; the backward (custom_vjp residuals, or `backward`
given the same key) regenerates it from the same words.

Limits
------
Forward-mode differentiation (jax.jvp, jax.jacfwd) is not defined (a custom_vjp op).
Exporting for several platforms at once fails in buffer_callback's lowering. The
callback has no sharding rule: under automatic (GSPMD) sharding put it inside shard_map
so each device runs its own shard (not tested here).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_batching import custom_vmap

from . import _options, _reference_jnp, _validate
from . import block_sparse as _block_sparse
from ._interop import BFLOAT16, CPU, ArrayRef, Device, _StreamHandle
from ._options import Options, make_options
from ._validate import Dims, ValidationError

__all__ = ["attention", "forward", "backward", "dot_product_attention", "rng_state_from_key"]

# Option values that are arrays; every other option is static.
_ARRAY_OPTIONS = ("bias", "mask", "alibi_slopes", "cu_seqlens_q", "cu_seqlens_k")
# The option arrays as the kernels' Views name them.
_VIEW_NAMES = {"bias": "bias", "mask": "mask", "alibi_slopes": "alibi",
               "cu_seqlens_q": "cu_seqlens_q", "cu_seqlens_k": "cu_seqlens_k", "rng_state": "rng_state"}
_KERNEL_DTYPES = (np.dtype(np.float16), BFLOAT16, np.dtype(np.float32))
# A block mask travels as its compact lists (int32 operands under these names); the
# block size is static (in the spec's options).
_BLOCK_LISTS = ("kv_count", "kv_index", "q_count", "q_index")

# Compact block masks cross jit boundaries as pytrees: the lists are the leaves, the block
# size static.
jax.tree_util.register_pytree_node(
    _block_sparse.BlockSparse,
    lambda bs: (tuple(bs.arrays().values()), (bs.block_size, bs.verified)),
    lambda aux, leaves: _block_sparse.BlockSparse(aux[0], *leaves, verified=aux[1]),
)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """The static part of a call: options with the array fields empty (the arrays travel
    as operands) and, for varlen, max_seqlen_q/k resolved to ints."""

    options: Options
    varlen: bool

    def with_arrays(self, arrays: dict[str, Any]) -> Options:
        arrays = dict(arrays)
        lists = {name: arrays.pop(f"block_{name}") for name in _BLOCK_LISTS if f"block_{name}" in arrays}
        if lists:
            arrays["block_mask"] = _block_sparse.BlockSparse(self.options.block_size, verified=True, **lists)
        return self.options.replace(**arrays)


def _dims(spec: _Spec, q_shape, k_shape, num_seqs: int) -> Dims:
    """The problem's dimensions from shapes alone (the same at trace time and in the
    callback, where the shapes are the buffers')."""
    if spec.varlen:
        (total_q, heads, head_dim), (total_k, heads_kv, _) = q_shape, k_shape
        return Dims(batch=num_seqs, seqlen_q=int(spec.options.max_seqlen_q), seqlen_k=int(spec.options.max_seqlen_k),
                    num_heads=heads, num_heads_kv=heads_kv, head_dim=head_dim, varlen=True,
                    total_q=total_q, total_k=total_k)
    if spec.options.layout == "bhsd":
        (batch, heads, seqlen_q, head_dim), (_, heads_kv, seqlen_k, _) = q_shape, k_shape
    else:
        (batch, seqlen_q, heads, head_dim), (_, seqlen_k, heads_kv, _) = q_shape, k_shape
    return Dims(batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k, num_heads=heads,
                num_heads_kv=heads_kv, head_dim=head_dim)


def _num_seqs(spec: _Spec, q, arrays: dict[str, Any]) -> int:
    return arrays["cu_seqlens_q"].shape[0] - 1 if spec.varlen else q.shape[0]


def _uses_kernels(spec: _Spec, q, k, arrays) -> bool:
    """Whether the CUDA path runs the kernels (else the jax.numpy reference)."""
    if np.dtype(q.dtype) not in _KERNEL_DTYPES:
        return False
    d = _dims(spec, q.shape, k.shape, _num_seqs(spec, q, arrays))
    rows = d.total_q if d.varlen else d.batch * d.seqlen_q
    keys = d.total_k if d.varlen else d.batch * d.seqlen_k
    return min(rows, keys, d.num_heads, d.num_heads_kv, d.head_dim, d.seqlen_q, d.seqlen_k, d.batch) > 0


def _kernel_operands(arrays: dict[str, Any]) -> dict[str, Any]:
    """Option arrays in the dtypes the kernels read, keyed by their Views names."""
    out = {}
    for name, value in arrays.items():
        if name.startswith("block_"):
            out[name] = value
            continue
        if name == "alibi_slopes" or (name == "bias" and np.dtype(value.dtype) not in _KERNEL_DTYPES):
            value = value.astype(jnp.float32)
        elif name.startswith("cu_seqlens"):
            value = value.astype(jnp.int32)
        out[_VIEW_NAMES[name]] = value
    return out


# ---- the callbacks (run by XLA on the GPU's compute stream) ------------------------------

_streams: dict[tuple[int, int], Any] = {}
_streams_lock = threading.Lock()


def _external_stream(ptr: int, device_index: int):
    """XLA's stream as a CuPy stream (cached: XLA's streams live as long as the client)."""
    import cupy

    key = (device_index, int(ptr))
    with _streams_lock:
        stream = _streams.get(key)
        if stream is None:
            stream = cupy.cuda.Stream.from_external(_StreamHandle(ptr))
            _streams[key] = stream
        return stream


def _device_view(buf):
    """A zero-copy CuPy view of an XLA buffer (DLPack; bfloat16 as ml_dtypes.bfloat16)."""
    import cupy

    try:
        return cupy.from_dlpack(buf)
    except (TypeError, NotImplementedError, BufferError) as exc:
        # A CuPy that cannot import the dtype through DLPack: wrap the raw pointer.
        try:
            ptr = int(buf.__cuda_array_interface__["data"][0])
        except Exception:  # noqa: BLE001 - report the DLPack failure, the real cause
            raise exc from None
        shape, dtype = tuple(buf.shape), np.dtype(buf.dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        memory = cupy.cuda.UnownedMemory(ptr, nbytes, buf, int(buf.__dlpack_device__()[1]))
        return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(memory, 0))


def _views(buffers: dict[str, Any], operands: dict[str, Any], block_size=None):
    from ._params import Views

    named = {name: _device_view(buf) for name, buf in {**buffers, **operands}.items()}
    lists = {name: named.pop(f"block_{name}") for name in _BLOCK_LISTS if f"block_{name}" in named}
    if lists:
        named["block_sparse"] = _block_sparse.BlockSparse(block_size, verified=True, **lists)
    views = Views(**named)
    if views.rng_state is not None:
        # uint32 [seed_lo, seed_hi, offset, 0] is, byte for byte, the two little-endian u64
        # [seed, offset] the kernels read: a view, never a copy. The kernels load u64 words,
        # so the buffer must be 8-byte aligned (XLA aligns its buffers to at least 16 B).
        if views.rng_state.data.ptr % 8:
            raise RuntimeError(f"dropout rng_state buffer at {views.rng_state.data.ptr:#x} is not 8-byte aligned")
        views.rng_state = views.rng_state.view(np.uint64)
    return views


def _launch_on_xla_stream(kind: str, spec: _Spec, ctx, buffers: dict[str, Any], operands: dict[str, Any]) -> None:
    """Enqueue the kernels on XLA's stream; XLA owns every buffer and its lifetime."""
    import cupy

    from . import _launch

    device_index = int(buffers["q"].__dlpack_device__()[1])
    with cupy.cuda.Device(device_index):
        stream = _external_stream(ctx.stream, device_index)
        with stream:  # CuPy's own work (the zero-fill below) goes on XLA's stream as well
            views = _views(buffers, operands, spec.options.block_size)
            opts = spec.with_arrays({option: getattr(views, view) for option, view in _VIEW_NAMES.items()
                                     if getattr(views, view) is not None})
            num_seqs = views.cu_seqlens_q.shape[0] - 1 if spec.varlen else views.q.shape[0]
            dims = _dims(spec, views.q.shape, views.k.shape, num_seqs)
            if kind == "forward":
                _launch.run_forward(views, opts, dims, stream, device_index)
                return
            if views.dbias_full is not None:
                views.dbias_full.fill(0)  # the kernels accumulate into it
            _launch.run_backward(views, opts, dims, stream, device_index)


def _forward_callback(spec: _Spec, ctx, results, q, k, v, operands) -> None:
    _launch_on_xla_stream("forward", spec, ctx, {"q": q, "k": k, "v": v, **results}, operands)


def _backward_callback(spec: _Spec, ctx, results, dout, q, k, v, out, lse, operands) -> None:
    buffers = {"dout": dout, "q": q, "k": k, "v": v, "out": out, "lse": lse, **results}
    _launch_on_xla_stream("backward", spec, ctx, buffers, operands)


@functools.lru_cache(maxsize=None)
def _callback(kind: str, spec: _Spec):
    """One callable per (kind, spec), so equal calls lower to equal computations."""
    return functools.partial(_forward_callback if kind == "forward" else _backward_callback, spec)


def _buffer_callback(callback, results):
    try:
        from jax.experimental.buffer_callback import buffer_callback
    except ImportError as exc:  # pragma: no cover - jax < 0.7
        raise ImportError("cuflash.jax needs jax.experimental.buffer_callback (jax >= 0.7)") from exc
    return buffer_callback(callback, results)


# ---- one forward and one backward, per platform ------------------------------------------


def _forward_reference(spec: _Spec, q, k, v, arrays):
    out, lse = _reference_jnp.forward(q, k, v, spec.with_arrays(arrays))
    return out, lse.astype(_reference_jnp.compute_dtype(q.dtype))


def _forward_cuda(spec: _Spec, q, k, v, arrays):
    if not _uses_kernels(spec, q, k, arrays):
        return _forward_reference(spec, q, k, v, arrays)
    dims = _dims(spec, q.shape, k.shape, _num_seqs(spec, q, arrays))
    results = {"out": jax.ShapeDtypeStruct(q.shape, q.dtype),
               "lse": jax.ShapeDtypeStruct(dims.lse_shape, jnp.float32)}
    got = _buffer_callback(_callback("forward", spec), results)(q, k, v, _kernel_operands(arrays))
    return got["out"], got["lse"]


def _backward_reference(spec: _Spec, dout, q, k, v, out, lse, arrays):
    return _reference_jnp.backward(dout, q, k, v, out, lse, spec.with_arrays(arrays))


def _backward_cuda(spec: _Spec, dout, q, k, v, out, lse, arrays):
    from . import _launch

    if not _uses_kernels(spec, q, k, arrays):
        return _backward_reference(spec, dout, q, k, v, out, lse, arrays)
    dims = _dims(spec, q.shape, k.shape, _num_seqs(spec, q, arrays))
    want_dbias = "bias" in arrays
    results = {"dq": jax.ShapeDtypeStruct(q.shape, q.dtype), "dk": jax.ShapeDtypeStruct(k.shape, k.dtype),
               "dv": jax.ShapeDtypeStruct(v.shape, v.dtype)}
    for name, (shape, dtype) in _launch.workspace_shapes(dims, spec.options, want_dbias).items():
        results[name] = jax.ShapeDtypeStruct(shape, dtype)
    got = _buffer_callback(_callback("backward", spec), results)(
        dout.astype(q.dtype), q, k, v, out.astype(q.dtype), lse.astype(jnp.float32), _kernel_operands(arrays))
    return got["dq"], got["dk"], got["dv"], got.get("dbias_full")


# ---- vmap: fold mapped axes into the batch -------------------------------------------------


def _with_axis(x, batched: bool, axis_size: int):
    return x if batched else jnp.broadcast_to(x, (axis_size,) + x.shape)


def _fold_rows(x, batched: bool, axis_size: int):
    """(V, N, ...) -> (V*N, ...): batch (dense) or packed rows (varlen) first."""
    x = _with_axis(x, batched, axis_size)
    return jnp.reshape(x, (axis_size * x.shape[1],) + x.shape[2:])


def _unfold_rows(x, axis_size: int):
    return jnp.reshape(x, (axis_size, x.shape[0] // axis_size) + x.shape[1:])


def _fold_batch_indexed(x, batched: bool, axis_size: int, num_seqs: int, ndim: int, size_one_broadcasts: bool):
    """An array indexed [batch, ...] (bias, mask: (B, H, Nq, Nk)-broadcastable; ALiBi
    slopes: (H,) or (B, H)) for the folded batch of axis_size * num_seqs."""
    shape = tuple(x.shape[1:] if batched else x.shape)
    if not batched and (len(shape) < ndim or (size_one_broadcasts and shape[0] == 1)):
        return x  # the same for every batch already
    padded = (1,) * (ndim - len(shape)) + shape
    x = _with_axis(jnp.reshape(x, ((axis_size,) if batched else ()) + padded), batched, axis_size)
    if padded[0] != num_seqs:
        x = jnp.broadcast_to(x, (axis_size, num_seqs) + padded[1:])
    return jnp.reshape(x, (axis_size * num_seqs,) + padded[1:])


def _fold_cu_seqlens(cu, batched: bool, axis_size: int, total: int):
    """Sequences of mapped example v move to rows v*total...; relies on cu[-1] == total."""
    cu = _with_axis(cu, batched, axis_size)
    starts = cu[:, :-1] + (jnp.arange(axis_size, dtype=cu.dtype) * total)[:, None]
    return jnp.concatenate([jnp.reshape(starts, (-1,)), jnp.full((1,), axis_size * total, cu.dtype)])


def _fold(spec: _Spec, axis_size: int, tensors: dict[str, Any], tensors_batched: dict[str, bool],
          options: dict[str, Any], options_batched: dict[str, bool]):
    """Every operand of one call with the mapped axis folded into the batch: the tensors
    (q, k, v and for the backward dout, out, lse) and the option arrays."""

    def per_example(name):
        if name in tensors:
            return tensors[name].shape[1:] if tensors_batched[name] else tensors[name].shape
        return options[name].shape[1:] if options_batched[name] else options[name].shape

    num_seqs = per_example("cu_seqlens_q")[0] - 1 if spec.varlen else per_example("q")[0]
    folded = {}
    for name, x in tensors.items():
        if name == "lse" and spec.varlen:  # (V, H, total_q) -> (H, V*total_q)
            x = jnp.moveaxis(_with_axis(x, tensors_batched[name], axis_size), 0, 1)
            folded[name] = jnp.reshape(x, (x.shape[0], -1))
        else:
            folded[name] = _fold_rows(x, tensors_batched[name], axis_size)
    folded_options = {}
    for name, x in options.items():
        batched = options_batched[name]
        if name in ("bias", "mask"):
            folded_options[name] = _fold_batch_indexed(x, batched, axis_size, num_seqs, 4, True)
        elif name.startswith("block_"):  # (B|1, H|1, blocks[, blocks]) lists
            folded_options[name] = _fold_batch_indexed(x, batched, axis_size, num_seqs, x.ndim - batched, True)
        elif name == "alibi_slopes":
            folded_options[name] = _fold_batch_indexed(x, batched, axis_size, num_seqs, 2, False)
        elif name == "rng_state":  # one key for the whole mapped batch (a mapped key never folds)
            folded_options[name] = x
        else:
            total = per_example("q" if name == "cu_seqlens_q" else "k")[0]
            folded_options[name] = _fold_cu_seqlens(x, batched, axis_size, total)
    return folded, folded_options


def _map_examples(op, axis_size: int, args: tuple, batched: tuple):
    """vmap with a mapped dropout key: one call per example (lax.map), unmapped operands
    broadcast along the mapped axis; each example's mask comes from its own key."""
    args = jax.tree.map(lambda x, b: _with_axis(x, b, axis_size), tuple(args), tuple(batched))
    return lax.map(lambda example: op(*example), args)


def _unfold_lse(spec: _Spec, lse, axis_size: int):
    if spec.varlen:  # (H, V*total_q) -> (V, H, total_q)
        return jnp.moveaxis(jnp.reshape(lse, (lse.shape[0], axis_size, -1)), 1, 0)
    return _unfold_rows(lse, axis_size)


@functools.lru_cache(maxsize=None)
def _forward_op(spec: _Spec):
    """(q, k, v, option arrays) -> (out, lse) for this spec, on any platform, vmappable."""

    @custom_vmap
    def op(q, k, v, arrays):
        return lax.platform_dependent(q, k, v, arrays, cuda=functools.partial(_forward_cuda, spec),
                                      default=functools.partial(_forward_reference, spec))

    @op.def_vmap
    def _rule(axis_size, in_batched, q, k, v, arrays):
        q_b, k_b, v_b, arrays_b = in_batched
        if arrays_b.get("rng_state", False):
            return _map_examples(op, axis_size, (q, k, v, arrays), in_batched), (True, True)
        folded, options = _fold(spec, axis_size, dict(q=q, k=k, v=v), dict(q=q_b, k=k_b, v=v_b), arrays, arrays_b)
        out, lse = op(folded["q"], folded["k"], folded["v"], options)
        return (_unfold_rows(out, axis_size), _unfold_lse(spec, lse, axis_size)), (True, True)

    return op


@functools.lru_cache(maxsize=None)
def _backward_op(spec: _Spec):
    """(dout, q, k, v, out, lse, option arrays) -> (dq, dk, dv, dscores) where dscores is
    the dense (B, H, seqlen_q, seqlen_k) score gradient (None without a bias)."""

    @custom_vmap
    def op(dout, q, k, v, out, lse, arrays):
        return lax.platform_dependent(dout, q, k, v, out, lse, arrays, cuda=functools.partial(_backward_cuda, spec),
                                      default=functools.partial(_backward_reference, spec))

    @op.def_vmap
    def _rule(axis_size, in_batched, dout, q, k, v, out, lse, arrays):
        names = ("dout", "q", "k", "v", "out", "lse")
        if in_batched[6].get("rng_state", False):
            grads = _map_examples(op, axis_size, (dout, q, k, v, out, lse, arrays), in_batched)
            return grads, (True, True, True, None if grads[3] is None else True)
        batched = dict(zip(names, in_batched[:6]))
        folded, options = _fold(spec, axis_size, dict(zip(names, (dout, q, k, v, out, lse))), batched,
                                arrays, in_batched[6])
        dq, dk, dv, dscores = op(*(folded[n] for n in names), options)
        grads = tuple(_unfold_rows(g, axis_size) for g in (dq, dk, dv))
        if dscores is None:
            return grads + (None,), (True, True, True, None)
        return grads + (_unfold_rows(dscores, axis_size),), (True, True, True, True)

    return op


# ---- gradients ------------------------------------------------------------------------------


def _sum_to_shape(full, shape: tuple[int, ...]):
    """Undo broadcasting: sum `full` over the axes along which `shape` was broadcast."""
    full = jnp.sum(full, axis=tuple(range(full.ndim - len(shape))))
    axes = tuple(a for a, n in enumerate(shape) if n == 1 and full.shape[a] != 1)
    return jnp.reshape(jnp.sum(full, axis=axes, keepdims=True), shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(spec: _Spec, q, k, v, arrays):
    return _forward_op(spec)(q, k, v, arrays)


def _attention_fwd(spec: _Spec, q, k, v, arrays):
    out, lse = _forward_op(spec)(q, k, v, arrays)
    return (out, lse), (q, k, v, arrays, out, lse)


def _attention_bwd(spec: _Spec, residuals, cotangents):
    q, k, v, arrays, out, lse = residuals
    dout, _ = cotangents  # lse leaves the public functions through stop_gradient
    dq, dk, dv, dscores = _backward_op(spec)(dout, q, k, v, out, lse, arrays)
    d_arrays = {name: None for name in arrays}  # mask, slopes, cu_seqlens, block lists: not differentiable
    if "bias" in arrays:
        bias = arrays["bias"]
        d_arrays["bias"] = _sum_to_shape(dscores, bias.shape).astype(bias.dtype)
    return dq, dk, dv, d_arrays


_attention.defvjp(_attention_fwd, _attention_bwd)

# jit makes eager calls compile once per shape and spec; under an outer jit it inlines.
_run_attention = jax.jit(_attention, static_argnums=(0,))


@functools.partial(jax.jit, static_argnums=(0,))
def _run_backward(spec: _Spec, dout, q, k, v, out, lse, arrays):
    dq, dk, dv, dscores = _backward_op(spec)(dout, q, k, v, out, lse, arrays)
    if "bias" not in arrays:
        return dq, dk, dv
    return dq, dk, dv, _sum_to_shape(dscores, arrays["bias"].shape).astype(arrays["bias"].dtype)


# ---- validation at trace time ----------------------------------------------------------------


class _Meta:
    """Shape and dtype of an array whose values may be unknown (a tracer), laid out as XLA
    hands it to the kernels: row-major, so the validator's stride checks hold."""

    def __init__(self, shape, dtype):
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        strides, step = [], self.dtype.itemsize
        for n in reversed(self.shape):
            strides.append(step)
            step *= max(n, 1)
        self.strides = tuple(reversed(strides))


def _concrete(x) -> np.ndarray | None:
    """x's values on the host, or None while x is traced."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _validation_device(q) -> Device:
    """Validate as the platform that will compute: kernels on a GPU backend (fp16, bf16,
    fp32), the reference elsewhere and for float64 (which also runs it on a GPU)."""
    if np.dtype(q.dtype) == np.float64 or jax.default_backend() != "gpu":
        return CPU
    return Device("cuda", 0)


def _prepare(where: str, q, k, v, options: dict[str, Any], grads: dict[str, Any] | None = None):
    """Validate one call (metadata; values only where concrete) and split it into the
    static spec and the operands."""
    q, k, v = (jnp.asarray(a) for a in (q, k, v))
    options = dict(options)
    dropout_key = options.pop("dropout_key", None)
    opts = make_options(**options)
    arrays: dict[str, Any] = {}
    reasons: list[str] = []
    if dropout_key is not None:
        if opts.seed is not None:
            reasons.append(f"seed={opts.seed!r} and a dropout_key are both given: give one (a static seed, or a "
                           "key that may be traced)")
        else:
            words = _rng_words(dropout_key, reasons)  # checked even while dropout_p is 0
            if words is None:  # reported; not also as a missing seed
                opts = opts.replace(rng_state=dropout_key)
            elif _options.is_real(opts.dropout_p) and opts.dropout_p > 0:
                arrays["rng_state"] = words
    for name in _ARRAY_OPTIONS:
        value = getattr(opts, name)
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = _validate.sequence_option(name, value, reasons)
            if value is None:
                opts = opts.replace(**{name: None})  # reported; the other checks still run
                continue
        arrays[name] = jnp.asarray(value)
    if "alibi_slopes" in arrays:
        arrays["alibi_slopes"] = lax.stop_gradient(arrays["alibi_slopes"])
    opts = opts.replace(**arrays)
    if _options.is_real(opts.dropout_p) and opts.dropout_p > 0 and opts.seed is None and dropout_key is None:
        reasons.append(f"seed=None with dropout_p={opts.dropout_p}: under JAX give a dropout_key (a jax.random key, "
                       "may be traced) or a static int seed (the backward regenerates the dropout mask from it)")
    device = _validation_device(q)
    named = dict(q=q, k=k, v=v, **(grads or {}))
    refs = {name: ArrayRef(name, a, "jax", _Meta(a.shape, a.dtype), device) for name, a in named.items()}
    # rng_state is built here from the key, in its own layout (uint32 words, not the core's
    # int64 pair): nothing of it is the caller's to validate.
    option_refs = {name: ArrayRef(name, a, "jax", _option_view(name, a, q, k, opts, reasons), device)
                   for name, a in arrays.items() if name != "rng_state"}
    option_refs.update(_block_mask_refs(opts, device, reasons))
    try:
        dims = _validate.check(where, refs, opts, option_refs)
    except ValidationError as exc:
        raise ValidationError(where, reasons + exc.reasons, list(refs.values()) + list(option_refs.values())) from None
    if reasons:
        raise ValidationError(where, reasons, list(refs.values()) + list(option_refs.values()))
    block_size = opts.block_sparse_size
    if block_size is not None:
        arrays.update(_block_operands(opts, dims, block_size))
    varlen = opts.is_varlen
    static = opts.replace(
        **{name: None for name in _ARRAY_OPTIONS}, rng_state=None,
        softmax_scale=None if opts.softmax_scale is None else float(opts.softmax_scale),
        softcap=float(opts.softcap), dropout_p=float(opts.dropout_p),
        seed=None if opts.seed is None else int(opts.seed),
        max_seqlen_q=dims.seqlen_q if varlen else None, max_seqlen_k=dims.seqlen_k if varlen else None,
        block_mask=None, block_size=block_size,
    )
    return _Spec(options=static, varlen=varlen), q, k, v, arrays


def rng_state_from_key(key) -> jax.Array:
    """The dropout words a `dropout_key` stands for: uint32 (4,) [seed_lo, seed_hi, offset, 0],
    i.e. `cuflash.reference.dropout_keep_mask(seed_lo + seed_hi * 2**32, p, shape,
    offset=offset)` is the mask that attention(..., dropout_key=key) draws. `key` is a
    typed jax.random key of shape () or a raw uint32 key; it may be traced."""
    reasons: list[str] = []
    words = _rng_words(key, reasons)
    if words is None:
        raise ValueError("; ".join(reasons))
    return words


def _rng_words(key, reasons: list[str]):
    """uint32 [seed_lo, seed_hi, offset, 0] from a jax.random key, or None (reported)."""
    typed = isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    if not typed:
        try:
            raw = jnp.asarray(key)
        except TypeError:
            reasons.append(f"dropout_key={key!r} must be a jax.random key (jax.random.key or jax.random.PRNGKey)")
            return None
        if raw.dtype != jnp.uint32 or raw.ndim != 1:
            reasons.append(f"dropout_key of shape {raw.shape} and dtype {raw.dtype} must be a jax.random key: a typed "
                           "key of shape () (jax.random.key) or one raw uint32 key (jax.random.PRNGKey)")
            return None
        try:
            key = jax.random.wrap_key_data(raw)
        except (TypeError, ValueError):
            raw_shape = jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape
            reasons.append(f"dropout_key of shape {raw.shape} is not a raw key of the default PRNG implementation, "
                           f"whose raw keys have shape {raw_shape}")
            return None
    if key.shape != ():
        reasons.append(f"dropout_key has shape {key.shape}: give one key of shape () (split keys with vmap)")
        return None
    # The seed's two words and the offset; the fourth word is the offset's (unused) high half.
    bits = jax.random.bits(key, (3,), jnp.uint32)
    return jnp.concatenate([bits, jnp.zeros((1,), jnp.uint32)])


def _block_operands(opts: Options, dims: Dims, block_size) -> dict[str, Any]:
    """The block mask as its compact lists (jnp int32 operands): a boolean block mask is
    compacted here, traceably (under jit, inside the computation)."""
    mask = opts.block_mask
    if not isinstance(mask, _block_sparse.BlockSparse):
        shape = (_block_sparse.num_blocks(dims.seqlen_q, block_size[0]), _block_sparse.num_blocks(dims.seqlen_k, block_size[1]))
        mask = _block_sparse.compact(jnp.asarray(mask), block_size, shape)
    return {f"block_{name}": jnp.asarray(a) for name, a in mask.arrays().items()}


def _block_mask_refs(opts: Options, device: Device, reasons: list[str]) -> dict[str, ArrayRef]:
    """The block mask as the validator reads it: metadata only. Hand-built lists are
    checked here while their values are concrete (under jit they must come from compact)."""
    mask = opts.block_mask
    if mask is None:
        return {}
    if not isinstance(mask, _block_sparse.BlockSparse):
        return {"block_mask": ArrayRef("block_mask", mask, "jax", _Meta(mask.shape, mask.dtype), device)}
    if not mask.verified:
        if any(_concrete(a) is None for a in mask.arrays().values()):
            reasons.append("block_mask: hand-built compact lists are traced here; build them with "
                           "cuflash.block_sparse.compact or pass concrete arrays")
        else:
            reasons += [f"block_mask: {r}" for r in mask.value_errors()]
            if not any(r.startswith("block_mask: ") for r in reasons):
                object.__setattr__(mask, "verified", True)
    return {f"block_mask.{name}": ArrayRef(f"block_mask.{name}", a, "jax", _Meta(a.shape, a.dtype), device)
            for name, a in mask.arrays().items()}


def _option_view(name: str, value, q, k, opts: Options, reasons: list[str]):
    """What the validator reads for an option array: its values when concrete; for traced
    cu_seqlens, a placeholder that is valid by construction (the values are the caller's
    promise under jit), so that every other check still runs."""
    meta = _Meta(value.shape, value.dtype)
    if not name.startswith("cu_seqlens"):
        return meta
    host = _concrete(value)
    if host is not None:
        return host
    if meta.ndim != 1 or meta.shape[0] < 1 or meta.dtype != np.int32:
        return meta  # the validator reports the shape or dtype before reading values
    side = name[-1]
    max_name = f"max_seqlen_{side}"
    longest = getattr(opts, max_name)
    rows = (q if side == "q" else k).shape
    total = rows[0] if rows else 0
    num_seqs = meta.shape[0] - 1
    if longest is None:
        reasons.append(f"{max_name}=None with a traced {name}: under jit give {max_name} as an int "
                       "(the longest sequence may not be read from a traced array)")
    elif isinstance(longest, (int, np.integer)) and num_seqs * int(longest) < total:
        reasons.append(f"{max_name}={longest} with {num_seqs} sequences cannot cover the {total} packed rows of "
                       f"{side} ({name}[-1] must equal {total})")
    if num_seqs == 0:
        return np.zeros(1, np.int32)
    return ((np.arange(num_seqs + 1) * total) // num_seqs).astype(np.int32)


# ---- the public functions ----------------------------------------------------------------------


@_validate.lists_valid_keywords("cuflash.jax.forward")
def forward(
    q: Any,
    k: Any,
    v: Any,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    causal_alignment: str = "bottom_right",
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    bias: Any = None,
    mask: Any = None,
    block_mask: Any = None,
    block_size: Sequence[int] | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    dropout_key: Any = None,
    position_offsets: Sequence[int] = (0, 0),
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    deterministic: bool = False,
    layout: str = "bshd",
) -> tuple[jax.Array, jax.Array]:
    """Exact attention forward: (out, lse). Differentiable in q, k, v and bias.

    out has q's shape and dtype; lse is float32 (float64 for float64 inputs), shaped
    (batch, num_heads, seqlen_q) or (num_heads, total_q) for varlen, -inf on rows that
    attend to no key, and carries no gradient (it passes through stop_gradient)."""
    spec, q, k, v, arrays = _prepare("cuflash.jax.forward", q, k, v,
                                     {n: v_ for n, v_ in locals().items() if n not in ("q", "k", "v")})
    out, lse = _run_attention(spec, q, k, v, arrays)
    return out, lax.stop_gradient(lse)


@_validate.lists_valid_keywords("cuflash.jax.attention")
def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    causal_alignment: str = "bottom_right",
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    bias: Any = None,
    mask: Any = None,
    block_mask: Any = None,
    block_size: Sequence[int] | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    dropout_key: Any = None,
    position_offsets: Sequence[int] = (0, 0),
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    deterministic: bool = False,
    layout: str = "bshd",
) -> jax.Array:
    """Exact attention, softmax(q kᵀ · scale + modifiers) v, with q's shape and dtype.
    Differentiable in q, k, v and bias; works under jit, grad and vmap."""
    spec, q, k, v, arrays = _prepare("cuflash.jax.attention", q, k, v,
                                     {n: v_ for n, v_ in locals().items() if n not in ("q", "k", "v")})
    out, _ = _run_attention(spec, q, k, v, arrays)
    return out


@_validate.lists_valid_keywords("cuflash.jax.backward")
def backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    causal_alignment: str = "bottom_right",
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    bias: Any = None,
    mask: Any = None,
    block_mask: Any = None,
    block_size: Sequence[int] | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    dropout_key: Any = None,
    position_offsets: Sequence[int] = (0, 0),
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    deterministic: bool = False,
    layout: str = "bshd",
) -> tuple[jax.Array, ...]:
    """Gradients (dq, dk, dv), plus dbias (bias's shape and dtype) when a bias is given,
    from forward()'s out and lse; the options must be the forward's. Works under jit and
    vmap (it is not itself differentiable). With dropout give the forward's seed or the
    same dropout_key."""
    options = {n: v_ for n, v_ in locals().items() if n not in ("dout", "q", "k", "v", "out", "lse")}
    grads = dict(dout=jnp.asarray(dout), out=jnp.asarray(out), lse=jnp.asarray(lse))
    spec, q, k, v, arrays = _prepare("cuflash.jax.backward", q, k, v, options, grads)
    return _run_backward(spec, grads["dout"], q, k, v, grads["out"], grads["lse"], arrays)


@_validate.lists_valid_keywords("cuflash.jax.dot_product_attention")
def dot_product_attention(
    query: Any,
    key: Any,
    value: Any,
    bias: Any | None = None,
    mask: Any | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: Any | None = None,
    key_value_seq_lengths: Any | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: Literal["xla", "cudnn"] | None = None,
    return_residual: bool = False,
):
    """`jax.nn.dot_product_attention` computed by cuflash: same signature, layout
    ((B, T, N, H) or unbatched (T, N, H); GQA when key has fewer heads) and semantics
    (mask True = attend, is_causal aligned top-left, local_window_size=(left, right) or a
    symmetric int, sequence lengths masking padded queries and keys).

    Differences: a query that may attend to no key (all masked, or past its sequence
    length) gets output 0, and with return_residual its logsumexp is -inf, where jax.nn
    averages over all keys (and zeroes padded queries only); local_window_size must be
    non-negative. implementation must be None (NotImplementedError otherwise: for XLA or
    cuDNN call jax.nn.dot_product_attention). The residual is (B, T, N) in the value's
    dtype and carries no gradient, as jax.nn's."""
    if implementation is not None:
        raise NotImplementedError(
            f"implementation={implementation!r} is not supported by cuflash.jax.dot_product_attention, which "
            "always runs cuflash; pass implementation=None, or call jax.nn.dot_product_attention for XLA or cuDNN")
    query, key, value = (jnp.asarray(a) for a in (query, key, value))
    output_shape = query.shape

    def ensure_4d(t):
        t = jnp.asarray(t)
        return jnp.reshape(t, (1,) * (4 - t.ndim) + t.shape) if t.ndim < 4 else t

    q, k, v = ensure_4d(query), ensure_4d(key), ensure_4d(value)
    bias = None if bias is None else ensure_4d(bias)
    mask = None if mask is None else ensure_4d(mask)
    batch, seqlen_k, heads_kv, head_dim = k.shape
    problems = []
    if v.shape != k.shape or v.dtype != k.dtype:
        problems.append(f"value {v.shape} {v.dtype} must match key {k.shape} {k.dtype}")
    if q.ndim != 4 or q.shape[0] != batch or q.shape[3] != head_dim or q.dtype != k.dtype:
        problems.append(f"query {q.shape} {q.dtype} must be (B={batch}, T, N, H={head_dim}) in key's dtype {k.dtype}")
    if mask is not None and (mask.ndim != 4 or mask.dtype != np.bool_):
        problems.append(f"mask {mask.shape} {mask.dtype} must be a 4-D bool array")
    if bias is not None and bias.ndim != 4:
        problems.append(f"bias {bias.shape} must be 4-D")
    lengths = {}
    for name, given in (("query_seq_lengths", query_seq_lengths), ("key_value_seq_lengths", key_value_seq_lengths)):
        if given is None:
            continue
        given = jnp.asarray(given)
        if given.shape != (batch,) or given.dtype != np.int32:
            problems.append(f"{name} {given.shape} {given.dtype} must be int32 of shape ({batch},)")
        lengths[name] = given
    if q.ndim == 4 and heads_kv and q.shape[2] % heads_kv:
        problems.append(f"the number of query heads ({q.shape[2]}) must be a multiple of key/value heads ({heads_kv})")
    if problems:
        raise ValueError("cuflash.jax.dot_product_attention: " + "; ".join(problems))
    # Nothing is converted before the core's rules judge the values (a window of floats or
    # of three values is rejected, naming it); negative ints are ours to refuse first.
    window = (-1, -1)
    if isinstance(local_window_size, (int, np.integer)) and not isinstance(local_window_size, bool):
        window = (local_window_size, local_window_size)
    elif local_window_size is not None:
        window = local_window_size
    ints = isinstance(window, (tuple, list)) and all(isinstance(w, (int, np.integer)) for w in window)
    if local_window_size is not None and ints and any(w < 0 for w in window):
        raise NotImplementedError(
            f"local_window_size={local_window_size!r}: negative window sizes are not supported by "
            "cuflash.jax.dot_product_attention (cuflash reads -1 as unbounded)")
    _validate.check_options("cuflash.jax.dot_product_attention",
                            {"causal": "is_causal", "softmax_scale": "scale", "window_size": "local_window_size"},
                            causal=is_causal, softmax_scale=scale, window_size=window)
    if lengths:
        seqlen_q = q.shape[1]
        padding = jnp.ones((batch, 1, seqlen_q, seqlen_k), dtype=bool)
        if "query_seq_lengths" in lengths:
            padding &= (jnp.arange(seqlen_q)[None, :] < lengths["query_seq_lengths"][:, None])[:, None, :, None]
        if "key_value_seq_lengths" in lengths:
            padding &= (jnp.arange(seqlen_k)[None, :] < lengths["key_value_seq_lengths"][:, None])[:, None, None, :]
        mask = padding if mask is None else mask & padding
    out, lse = forward(q, k, v, softmax_scale=scale, causal=is_causal, causal_alignment="top_left",
                       window_size=window, bias=bias, mask=mask)
    out = jnp.reshape(out, output_shape)
    if not return_residual:
        return out
    residual = jnp.transpose(lse, (0, 2, 1)).astype(value.dtype)  # (B, N, T) -> (B, T, N)
    return out, jnp.reshape(residual, output_shape[:-1])
