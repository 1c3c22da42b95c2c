"""Validation before anything runs: every reason collected, one error raised.

`check` reads only metadata (shapes, strides, dtypes, devices) and, for variable-length
batches, the small cu_seqlens arrays. It returns the problem's dimensions (`Dims`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

import numpy as np

from ._interop import BFLOAT16, ArrayRef, dtype_name
from ._options import FP8_OPTION_NAMES, Options, make_options, option_errors
from .fp8 import descale_errors, forward_only_reason, is_e4m3

MAX_HEAD_DIM = 256
MAX_SEQLEN = 2**30  # the kernels index rows with 32-bit ints (offsets are 64-bit)

_KERNEL_DTYPES = tuple(
    d for d in (np.dtype(np.float16), BFLOAT16, np.dtype(np.float32)) if d is not None
)
_HOST_DTYPES = _KERNEL_DTYPES + (np.dtype(np.float64),)


class ValidationError(ValueError):
    """Invalid arguments. `reasons` lists every problem found; the message lists them
    together with the shapes, strides, dtypes and devices of the arrays involved."""

    def __init__(self, where: str, reasons: list[str], arrays: list[ArrayRef]):
        self.reasons = list(reasons)
        lines = [f"{where}: {len(reasons)} problem(s) with the arguments:"]
        lines += [f"  - {r}" for r in reasons]
        if arrays:
            lines.append("arrays:")
            lines += [f"  {a.describe()}" for a in arrays]
        super().__init__("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class Dims:
    """The problem's dimensions. For a variable-length batch, seqlen_q/seqlen_k are the
    largest sequence lengths and total_q/total_k the packed row counts."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    num_heads: int
    num_heads_kv: int
    head_dim: int
    varlen: bool = False
    total_q: int = 0
    total_k: int = 0

    @property
    def lse_shape(self) -> tuple[int, ...]:
        if self.varlen:
            return (self.num_heads, self.total_q)
        return (self.batch, self.num_heads, self.seqlen_q)


def supported_dtypes(on_host: bool) -> tuple[np.dtype, ...]:
    return _HOST_DTYPES if on_host else _KERNEL_DTYPES


def _names(dtypes) -> str:
    return ", ".join(dtype_name(d) for d in dtypes)


def check(
    where: str,
    arrays: dict[str, ArrayRef],
    opts: Options,
    option_arrays: dict[str, ArrayRef],
    fp8_forward: bool = False,
) -> Dims:
    """Validate `arrays` (q, k, v and for the backward dout, out, lse) and the options.
    float8_e4m3fn q, k, v (with the FP8 options) are valid only where `fp8_forward` says
    the entry point takes them (cuflash.forward and cuflash.attention on the host).

    Raises ValidationError listing every problem; returns the dimensions otherwise."""
    reasons = option_errors(opts)
    if isinstance(opts.dropout_p, (int, float)) and opts.dropout_p > 0 and opts.seed is None and opts.rng_state is None:
        reasons.append(
            f"seed=None with dropout_p={opts.dropout_p}: give a seed (or an rng_state) so that the backward regenerates the same dropout mask"
        )
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    everything = list(arrays.values()) + list(option_arrays.values())

    # Devices: one device for everything.
    devices = {a.device for a in everything}
    if len(devices) > 1:
        listing = ", ".join(f"{a.name} on {a.device}" for a in everything)
        reasons.append(f"all arrays must be on one device; got {listing}")
    on_host = q.device.kind == "cpu"

    # Byte order first: a big-endian float32 is float32 stored the other way round, so it
    # is reported as such, and the dtype checks below compare native dtypes.
    for a in everything:
        if not a.dtype.isnative:
            native = a.dtype.newbyteorder("=")
            reasons.append(
                f"{a.name}.dtype={a.dtype.str!r} is {dtype_name(native)} in non-native (big-endian) byte order; "
                f"cuflash reads the machine's byte order: pass {a.name}.astype({dtype_name(native)!r})"
            )

    # dtypes: one supported floating dtype for q, k, v, dout, out.
    allowed = supported_dtypes(on_host)
    float_inputs = [a for n, a in arrays.items() if n != "lse"]
    fp8 = any(is_e4m3(a.view) for a in (q, k, v))
    for a in float_inputs:
        if fp8 and is_e4m3(a.view):
            if not fp8_forward:
                reasons.append(forward_only_reason(a.name, dtype_name(a.dtype), where))
        elif _native(a.dtype) not in allowed:
            where_ = "on the host" if on_host else "on the GPU"
            reasons.append(
                f"{a.name}.dtype={dtype_name(a.dtype)} is not supported {where_} (supported: {_names(allowed)})"
            )
    dts = {_native(a.dtype) for a in float_inputs}
    if len(dts) > 1:
        listing = ", ".join(f"{a.name}={dtype_name(a.dtype)}" for a in float_inputs)
        reasons.append(f"q, k, v (and dout, out) must share one dtype; got {listing}")

    # Unit stride along the head dimension, so rows load as contiguous vectors.
    for a in arrays.values():
        empty = 0 in a.shape  # (CuPy reports all-zero strides for empty arrays)
        if a.view.ndim >= 1 and not empty and a.shape[-1] > 1 and a.strides[-1] != 1:
            reasons.append(
                f"{a.name} must have a unit stride in its last dimension; got strides={a.strides}"
            )

    varlen = opts.cu_seqlens_q is not None or opts.cu_seqlens_k is not None
    ndim = 3 if varlen else 4
    for a in (q, k, v):
        if a.view.ndim != ndim:
            want = "(total, heads, head_dim) with cu_seqlens" if varlen else (
                "(batch, seqlen, heads, head_dim)" if opts.layout == "bshd" else "(batch, heads, seqlen, head_dim)"
            )
            reasons.append(f"{a.name} must be {ndim}-D {want}; got {a.view.ndim}-D shape {a.shape}")
    if any(a.view.ndim != ndim for a in (q, k, v)):
        raise ValidationError(where, reasons, everything)

    if varlen:
        total_q, num_heads, head_dim = q.shape
        total_k, num_heads_kv, head_dim_k = k.shape
        total_v, num_heads_v, head_dim_v = v.shape
        batch = seqlen_q = seqlen_k = 0
    else:
        if opts.layout == "bhsd":
            batch, num_heads, seqlen_q, head_dim = q.shape
            batch_k, num_heads_kv, seqlen_k, head_dim_k = k.shape
            batch_v, num_heads_v, seqlen_v, head_dim_v = v.shape
        else:
            batch, seqlen_q, num_heads, head_dim = q.shape
            batch_k, seqlen_k, num_heads_kv, head_dim_k = k.shape
            batch_v, seqlen_v, num_heads_v, head_dim_v = v.shape
        if not (batch == batch_k == batch_v):
            reasons.append(f"batch sizes differ: q {batch}, k {batch_k}, v {batch_v}")
        if seqlen_k != seqlen_v:
            reasons.append(f"k and v sequence lengths differ: k {seqlen_k}, v {seqlen_v}")
        total_q = total_k = total_v = 0
    if varlen and total_k != total_v:
        reasons.append(f"k and v row counts differ: k {total_k}, v {total_v}")
    if not (head_dim == head_dim_k == head_dim_v):
        reasons.append(f"head dims differ: q {head_dim}, k {head_dim_k}, v {head_dim_v}")
    if head_dim == 0:
        reasons.append("head_dim=0: the head dimension must be at least 1")
    elif head_dim > MAX_HEAD_DIM:
        reasons.append(f"head_dim={head_dim} exceeds the supported maximum {MAX_HEAD_DIM}")
    if num_heads_kv != num_heads_v:
        reasons.append(f"k and v head counts differ: k {num_heads_kv}, v {num_heads_v}")
    if num_heads_kv == 0 and num_heads != 0:
        reasons.append(f"num_heads_kv=0 with num_heads={num_heads}")
    elif num_heads_kv and num_heads % num_heads_kv:
        reasons.append(
            f"num_heads={num_heads} must be a multiple of num_heads_kv={num_heads_kv} (GQA/MQA)"
        )

    if varlen:
        batch, seqlen_q, seqlen_k = _check_varlen(opts, option_arrays, total_q, total_k, reasons)
    for name, n in (("seqlen_q", seqlen_q), ("seqlen_k", seqlen_k)):
        if n > MAX_SEQLEN:
            reasons.append(f"{name}={n} exceeds the supported maximum {MAX_SEQLEN}")

    dims = Dims(
        batch=batch,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        num_heads=num_heads,
        num_heads_kv=num_heads_kv,
        head_dim=head_dim,
        varlen=varlen,
        total_q=total_q,
        total_k=total_k,
    )
    _check_option_arrays(dims, opts, option_arrays, reasons)
    _check_rng_state(option_arrays, reasons)
    _check_fp8(dims, opts, option_arrays, q, fp8 and fp8_forward, reasons)
    if "dout" in arrays:
        _check_backward(dims, arrays, reasons, on_host)
    if reasons:
        raise ValidationError(where, reasons, everything)
    return dims


def _check_fp8(dims: Dims, opts: Options, option_arrays, q: ArrayRef, fp8: bool, reasons) -> None:
    """The FP8 options: descale shapes and dtypes for FP8 inputs (cuflash.fp8), and none
    of them for other inputs."""
    given = [name for name in FP8_OPTION_NAMES if getattr(opts, name) is not None]
    if not fp8:
        if given:
            reasons.append(f"{', '.join(given)} given with q.dtype={dtype_name(q.dtype)}: the FP8 options apply to "
                           "float8_e4m3fn inputs (in cuflash.forward and cuflash.attention)")
        return
    for name, heads, seqlen in (("q_descale", dims.num_heads, dims.seqlen_q),
                                ("k_descale", dims.num_heads_kv, dims.seqlen_k),
                                ("v_descale", dims.num_heads_kv, dims.seqlen_k)):
        ref = option_arrays.get(name)
        if ref is not None:
            reasons += descale_errors(name, ref.shape, dtype_name(ref.dtype), batch=dims.batch, heads=heads,
                                      heads_kv=dims.num_heads_kv, seqlen=seqlen, varlen=dims.varlen)


def _check_varlen(opts, option_arrays, total_q, total_k, reasons):
    """Checks cu_seqlens; returns (batch, max_seqlen_q, max_seqlen_k).

    Checking the values needs them on the host: a small device-to-host copy, which
    synchronises. Device arrays with both max_seqlen_q and max_seqlen_k given are trusted
    instead (no synchronisation: capturable in a CUDA graph)."""
    refs = {}
    for name in ("cu_seqlens_q", "cu_seqlens_k"):
        ref = option_arrays.get(name)
        if ref is None:
            reasons.append(f"{name} is missing: variable-length batches need both cu_seqlens_q and cu_seqlens_k")
        elif ref.view.ndim != 1 or ref.shape[0] < 1:
            reasons.append(f"{name} must be 1-D of length batch+1; got shape {ref.shape}")
        elif _native(ref.dtype) != np.int32:
            reasons.append(f"{name}.dtype={dtype_name(ref.dtype)} must be int32")
        else:
            refs[name] = ref
    if len(refs) < 2:
        return 0, 0, 0
    if refs["cu_seqlens_q"].shape != refs["cu_seqlens_k"].shape:
        reasons.append(
            f"cu_seqlens_q has {refs['cu_seqlens_q'].shape[0]} entries and cu_seqlens_k "
            f"{refs['cu_seqlens_k'].shape[0]}; they must match (batch+1)"
        )
        return 0, 0, 0
    batch = refs["cu_seqlens_q"].shape[0] - 1
    on_device = refs["cu_seqlens_q"].device.kind != "cpu"
    if on_device and opts.max_seqlen_q is not None and opts.max_seqlen_k is not None:
        return batch, int(opts.max_seqlen_q), int(opts.max_seqlen_k)
    longest = {}
    for name, total in (("cu_seqlens_q", total_q), ("cu_seqlens_k", total_k)):
        host = _to_host(refs[name].view).astype(np.int64)
        if host[0] != 0:
            reasons.append(f"{name}[0]={host[0]} must be 0")
        steps = np.diff(host)
        if np.any(steps < 0):
            at = int(np.argmax(steps < 0))
            reasons.append(f"{name} must be non-decreasing; {name}[{at}]={host[at]} > {name}[{at + 1}]={host[at + 1]}")
        if host[-1] != total:
            side = "q" if name.endswith("q") else "k"
            reasons.append(f"{name}[-1]={host[-1]} must equal the packed row count of {side} ({total})")
        longest[name] = int(steps.max(initial=0))
    seqlen_q = longest["cu_seqlens_q"] if opts.max_seqlen_q is None else int(opts.max_seqlen_q)
    seqlen_k = longest["cu_seqlens_k"] if opts.max_seqlen_k is None else int(opts.max_seqlen_k)
    if seqlen_q < longest["cu_seqlens_q"]:
        reasons.append(f"max_seqlen_q={seqlen_q} is below the longest query sequence ({longest['cu_seqlens_q']})")
    if seqlen_k < longest["cu_seqlens_k"]:
        reasons.append(f"max_seqlen_k={seqlen_k} is below the longest key sequence ({longest['cu_seqlens_k']})")
    return batch, seqlen_q, seqlen_k


def _native(dtype: np.dtype) -> np.dtype:
    """dtype in the machine's byte order (non-native orders are reported on their own)."""
    return dtype if dtype.isnative else dtype.newbyteorder("=")


def _to_host(view) -> np.ndarray:
    if isinstance(view, np.ndarray):
        return view
    return view.get()


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


def _check_option_arrays(dims: Dims, opts: Options, option_arrays, reasons) -> None:
    target = (dims.batch, dims.num_heads, dims.seqlen_q, dims.seqlen_k)
    bias = option_arrays.get("bias")
    if bias is not None:
        if bias.dtype.kind != "f" and bias.dtype != BFLOAT16:
            reasons.append(f"bias.dtype={dtype_name(bias.dtype)} must be a floating dtype")
        if not _broadcasts(bias.shape, target):
            reasons.append(f"bias shape {bias.shape} does not broadcast to (batch, heads, seqlen_q, seqlen_k)={target}")
    mask = option_arrays.get("mask")
    if mask is not None:
        if _native(mask.dtype) != np.bool_:
            reasons.append(f"mask.dtype={dtype_name(mask.dtype)} must be bool (True = may attend)")
        if not _broadcasts(mask.shape, target):
            reasons.append(f"mask shape {mask.shape} does not broadcast to (batch, heads, seqlen_q, seqlen_k)={target}")
    _check_block_mask(dims, opts, option_arrays, reasons)
    slopes = option_arrays.get("alibi_slopes")
    if slopes is not None:
        if slopes.dtype.kind != "f":
            reasons.append(f"alibi_slopes.dtype={dtype_name(slopes.dtype)} must be float32 or float64")
        if slopes.shape not in ((dims.num_heads,), (dims.batch, dims.num_heads)):
            reasons.append(
                f"alibi_slopes shape {slopes.shape} must be (num_heads,)=({dims.num_heads},) or (batch, num_heads)=({dims.batch}, {dims.num_heads})"
            )


def _check_block_mask(dims: Dims, opts: Options, option_arrays, reasons) -> None:
    """A boolean block mask broadcastable to (batch, heads, query blocks, key blocks), or
    a compact BlockSparse whose int32 lists have exactly those block counts."""
    from .block_sparse import block_size_errors

    if opts.block_mask is not None and not hasattr(opts.block_mask, "kv_index") and block_size_errors(opts.block_size):
        return  # not a pair (block_size=128): option_errors names it; block_sparse_size cannot read it
    size = opts.block_sparse_size
    if opts.block_mask is None or block_size_errors(size):
        return  # option_errors has named the block size problem
    q_blocks, k_blocks = -(-dims.seqlen_q // size[0]), -(-dims.seqlen_k // size[1])
    target = (dims.batch, dims.num_heads, q_blocks, k_blocks)
    dense = option_arrays.get("block_mask")
    if dense is not None:
        if dense.dtype != np.bool_:
            reasons.append(f"block_mask.dtype={dtype_name(dense.dtype)} must be bool (True = compute the block)")
        if not _broadcasts(dense.shape, target):
            reasons.append(
                f"block_mask shape {dense.shape} does not broadcast to (batch, heads, ceil(seqlen_q/{size[0]}), "
                f"ceil(seqlen_k/{size[1]}))={target}"
            )
        return
    parts = {name.split(".")[1]: ref for name, ref in option_arrays.items() if name.startswith("block_mask.")}
    if len(parts) != 4:
        return
    before = len(reasons)
    for name, ref in parts.items():
        if ref.dtype != np.int32:
            reasons.append(f"block_mask.{name}.dtype={dtype_name(ref.dtype)} must be int32")
        flags = getattr(ref.view, "flags", None)  # absent on traced (metadata-only) views: row-major
        if flags is not None and not flags.c_contiguous:
            reasons.append(f"block_mask.{name} must be C-contiguous; got strides={ref.strides}")
    index = parts["kv_index"].shape
    if len(index) != 4:
        reasons.append(f"block_mask.kv_index shape {index} must be 4-D (batch or 1, heads or 1, query blocks, key blocks)")
        return
    lead = index[:2]
    if lead[0] not in (1, dims.batch) or lead[1] not in (1, dims.num_heads):
        reasons.append(f"block_mask batch and head dimensions {lead} must each be 1 or ({dims.batch}, {dims.num_heads})")
    if index[2:] != (q_blocks, k_blocks):
        reasons.append(
            f"block_mask has {index[2]} query blocks x {index[3]} key blocks; block_size={size} with seqlen_q="
            f"{dims.seqlen_q}, seqlen_k={dims.seqlen_k} needs {q_blocks} x {k_blocks}"
        )
    expected = {"kv_count": lead + (index[2],), "q_count": lead + (index[3],), "q_index": lead + (index[3], index[2])}
    for name, shape in expected.items():
        if parts[name].shape != shape:
            reasons.append(f"block_mask.{name} shape {parts[name].shape} must be {shape} (kv_index is {index})")
    readable = all(hasattr(ref.view, "flags") for ref in parts.values())
    if len(reasons) == before and readable and not getattr(opts.block_mask, "verified", True):
        found = opts.block_mask.value_errors()
        reasons += [f"block_mask: {r}" for r in found]
        if not found:
            object.__setattr__(opts.block_mask, "verified", True)  # checked once per object


def _check_rng_state(option_arrays, reasons) -> None:
    """rng_state: a device (or host) [seed, offset] pair read when the kernel runs."""
    state = option_arrays.get("rng_state")
    if state is None:
        return
    if state.dtype not in (np.dtype(np.int64), np.dtype(np.uint64)):
        reasons.append(f"rng_state.dtype={dtype_name(state.dtype)} must be int64 or uint64 ([seed, offset])")
    if state.shape != (2,):
        reasons.append(f"rng_state shape {state.shape} must be (2,): [seed, offset]")
    elif state.strides[0] != 1:
        reasons.append(f"rng_state must be contiguous; got strides={state.strides}")


def _check_backward(dims: Dims, arrays, reasons, on_host: bool) -> None:
    q = arrays["q"]
    for name in ("dout", "out"):
        a = arrays[name]
        if a.shape != q.shape:
            reasons.append(f"{name} shape {a.shape} must equal q's shape {q.shape}")
    lse = arrays["lse"]
    if lse.shape != dims.lse_shape:
        reasons.append(f"lse shape {lse.shape} must be {dims.lse_shape}")
    lse_ok = (np.dtype(np.float32), np.dtype(np.float64)) if on_host else (np.dtype(np.float32),)
    if _native(lse.dtype) not in lse_ok:
        reasons.append(f"lse.dtype={dtype_name(lse.dtype)} must be {_names(lse_ok)}")


# What each option array holds, for those given as (nested) lists or tuples.
_SEQUENCE_KINDS = {
    "mask": ("b", np.dtype(np.bool_), "bools (True = may attend)"),
    "cu_seqlens_q": ("iu", np.dtype(np.int32), "ints"),
    "cu_seqlens_k": ("iu", np.dtype(np.int32), "ints"),
    "bias": ("iuf", np.dtype(np.float32), "numbers"),
    "alibi_slopes": ("iuf", np.dtype(np.float32), "numbers"),
    "rng_state": ("iu", np.dtype(np.int64), "ints ([seed, offset])"),
    "block_mask": ("b", np.dtype(np.bool_), "bools (True = the block is computed)"),
    "q_descale": ("iuf", np.dtype(np.float32), "numbers"),
    "k_descale": ("iuf", np.dtype(np.float32), "numbers"),
    "v_descale": ("iuf", np.dtype(np.float32), "numbers"),
}


def sequence_option(name: str, value: Any, reasons: list[str]) -> np.ndarray | None:
    """An option array given as a list or tuple, as a host array of the dtype the option
    takes. When the elements are of the wrong kind, the reason names what was given (the
    conversion is ours, so "mask.dtype=float32" would blame the caller for it); None then."""
    kinds, dtype, holds = _SEQUENCE_KINDS[name]
    given_as = f"{name} given as a {type(value).__name__}"
    try:
        given = np.asarray(value)
    except ValueError:  # ragged nesting
        reasons.append(f"{given_as} is ragged; it must be rectangular, of {holds}")
        return None
    if given.size and given.dtype.kind not in kinds:
        element = type(given.flat[0]).__name__ if given.dtype.kind == "O" else given.dtype.name
        reasons.append(f"{given_as} holds {element} values; it must hold {holds}")
        return None
    if dtype == np.int32 and given.size and (given.min() < -(2**31) or given.max() >= 2**31):
        reasons.append(f"{given_as} holds values outside int32: {given.min()}..{given.max()}")
        return None
    return given.astype(dtype)


def lists_valid_keywords(where: str) -> Callable[[Callable], Callable]:
    """Decorator for public entry points: an unknown keyword argument is a TypeError that
    lists every keyword the function takes (Python's own names only the unknown one)."""

    def decorate(fn: Callable) -> Callable:
        params = inspect.signature(fn).parameters
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        keywords = tuple(n for n, p in params.items() if p.kind in kinds)
        known = frozenset(keywords)

        @functools.wraps(fn)
        def checked(*args: Any, **kwargs: Any) -> Any:
            for name in kwargs:
                if name not in known:
                    unknown = sorted(n for n in kwargs if n not in known)
                    raise TypeError(
                        f"{where}() got unknown keyword argument(s) {unknown}; it takes {list(keywords)}"
                    )
            return fn(*args, **kwargs)

        return checked

    return decorate


def check_options(where: str, renamed: dict[str, str] | None = None, **scalars: Any) -> Options:
    """The non-array options judged by the core's rules before an adapter converts any of
    them, so that every entry point accepts and rejects the same values with the same
    message. `renamed` maps an option to the name the caller used for it (a drop-in's
    is_causal for causal): each reason starts with the option's name and value."""
    opts = make_options(**scalars)
    reasons = option_errors(opts)
    if reasons:
        for option, given in (renamed or {}).items():
            reasons = [given + r[len(option):] if r.startswith(option + "=") else r for r in reasons]
        raise ValidationError(where, reasons, [])
    return opts
