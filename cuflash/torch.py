"""PyTorch adapter: cuflash as a first-class PyTorch operator.

Two custom operators wrap the framework-agnostic API:

    torch.ops.cuflash.attention_fwd(q, k, v, ...)            -> (out, lse)
    torch.ops.cuflash.attention_bwd(dout, q, k, v, out, lse, ...) -> (dq, dk, dv, dbias)

Each has a fake (meta) implementation, and the forward an autograd formula that calls the
backward, so they work under autograd, `torch.compile(fullgraph=True)` (no graph breaks),
CUDA-graph capture and `torch.library.opcheck`. Eager calls on plain tensors run the same
operator bodies through an autograd Function (`_EagerAttention`), which skips the
operators' per-call dispatch cost. CUDA tensors run the kernels on PyTorch's
current stream with outputs from PyTorch's allocator; CPU tensors take the float64
reference. On top of the operators sit drop-in replacements:

    scaled_dot_product_attention   torch.nn.functional's, layout (B, H, S, D)
    flash_attn_func                FlashAttention-2's, layout (B, S, H, D)
    flash_attn_varlen_func         FlashAttention-2's, packed (total, H, D)
    attention                      every cuflash option, differentiable

This module only moves tensors, streams and gradients: the attention math is in cuda_src/
and cuflash.reference.

Dropout without an explicit seed on CUDA tensors draws its [seed, offset] pair with
torch.randint on the tensors' device: from torch's CUDA generator (seeded by
torch.manual_seed, so eager runs are reproducible), and graph-safe: a captured CUDA graph
(torch.cuda.graph, torch.compile(mode="reduce-overhead")) replays the draw too, so each
replay gets a fresh dropout mask. The kernels read the pair from device memory when they
run (the core's rng_state option); no host synchronisation. The pair is an operator input
saved for the backward, which regenerates the same mask from it. An explicit int seed is
passed as an int64 CPU scalar and read on the host (the same mask on every call and every
replay). CPU tensors draw a seed from torch's CPU generator.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

import cuflash
from cuflash import _api, block_sparse, fp8
from cuflash._validate import ValidationError, check_options, lists_valid_keywords

__all__ = [
    "attention",
    "scaled_dot_product_attention",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "attention_fwd",
    "attention_bwd",
]

# The non-tensor options, in the operators' argument order (after the tensors). Window
# sizes are two ints: custom-op schemas take no tuple defaults.
_SCALAR_OPTIONS = (
    "softmax_scale",
    "causal",
    "causal_alignment",
    "window_left",
    "window_right",
    "softcap",
    "dropout_p",
    "max_seqlen_q",
    "max_seqlen_k",
    "deterministic",
    "layout",
)
# The optional tensor inputs, in the operators' argument order.
_OPTION_TENSORS = ("bias", "mask", "alibi_slopes", "cu_seqlens_q", "cu_seqlens_k", "seed")


def _exportable(t: Optional[Tensor]) -> Optional[Tensor]:
    """A tensor the core API can import through DLPack: detached (torch refuses to export
    tensors that require grad; autograd supplies the gradient, not the export). Strides are
    left as they are: the core accepts or rejects them (q, k, v need a unit stride in their
    last dimension), as it does for every caller."""
    return None if t is None else t.detach()


def _unit_last_stride(t: Tensor) -> Tensor:
    """The output gradient autograd hands the backward may be any view (an expanded ones
    tensor from .sum(), a transposed gradient): the kernels load its rows as vectors, so it
    is copied when its last dimension is not contiguous. It is autograd's tensor, never the
    caller's input."""
    if t.dim() > 0 and t.size(-1) > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


def _core_options(
    bias, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed,
    softmax_scale, causal, causal_alignment, window_left, window_right, softcap, dropout_p,
    max_seqlen_q, max_seqlen_k, deterministic, layout,
    block_kv_count=None, block_kv_index=None, block_q_count=None, block_q_index=None, block_q=0, block_k=0,
) -> dict[str, Any]:
    """The operator's arguments as cuflash.forward/backward keyword options."""
    block_mask = None
    if block_kv_index is not None:  # block-sparse: the compact lists travel as four tensors
        block_mask = block_sparse.BlockSparse(
            (block_q, block_k), block_kv_count.detach(), block_kv_index.detach(), block_q_count.detach(),
            block_q_index.detach(), verified=True,
        )
    return dict(
        block_mask=block_mask,
        bias=_exportable(bias),
        mask=_exportable(mask),
        alibi_slopes=_exportable(alibi_slopes),
        cu_seqlens_q=_exportable(cu_seqlens_q),
        cu_seqlens_k=_exportable(cu_seqlens_k),
        **_seed_options(seed),
        softmax_scale=softmax_scale,
        causal=causal,
        causal_alignment=causal_alignment,
        window_size=(window_left, window_right),
        softcap=softcap,
        dropout_p=dropout_p,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        deterministic=deterministic,
        layout=layout,
    )


# ---- the forward operator -----------------------------------------------------------------


@torch.library.custom_op("cuflash::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    seed: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    causal_alignment: str = "bottom_right",
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    deterministic: bool = False,
    layout: str = "bshd",
    block_kv_count: Optional[Tensor] = None,
    block_kv_index: Optional[Tensor] = None,
    block_q_count: Optional[Tensor] = None,
    block_q_index: Optional[Tensor] = None,
    block_q: int = 0,
    block_k: int = 0,
) -> tuple[Tensor, Tensor]:
    """cuflash.forward as a PyTorch operator: returns (out, lse).

    Options are cuflash's (README.md), with window_size split into window_left and
    window_right, the dropout seed given as an int64 tensor (read on the host), and a
    block mask as its compact lists (cuflash.block_sparse.BlockSparse's four int32
    tensors) with block_q, block_k."""
    return _forward_impl(
        q, k, v, bias, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, softmax_scale, causal,
        causal_alignment, window_left, window_right, softcap, dropout_p, max_seqlen_q,
        max_seqlen_k, deterministic, layout, block_kv_count, block_kv_index, block_q_count, block_q_index,
        block_q, block_k,
    )


def _seed_options(seed: Optional[Tensor]) -> dict[str, Any]:
    """The operators' seed input as core options: a CPU int64 scalar is an explicit seed
    (its 64 bits held as a signed number; the core wants [0, 2**64)), a device int64 pair
    is an rng_state [seed, offset] the kernels read when they run."""
    if seed is None:
        return {"seed": None}
    if seed.device.type != "cpu":
        return {"rng_state": seed.detach()}
    return {"seed": int(seed.item()) % 2**64}


def _memory_layout(q: Tensor, layout: str, varlen: bool) -> str:
    """The layout q's memory is in, which the operators run in and give their outputs and
    gradients: "bshd" when the sequence stride exceeds the head stride, "bhsd" when the
    head stride does, `layout` itself when they tie (a single head or position) or for a
    packed (varlen) batch.

    The common case is a model's q, k, v: head-transposed views of one (B, T, H, D)
    projection, passed as layout "bhsd". Run as "bshd" on the transposes, out comes back as
    (B, T, H, D) memory viewed (B, H, T, D), exactly as SDPA returns it, so the model's
    `out.transpose(1, 2).reshape(B, T, C)` is free; dq, dk, dv likewise, so the gradient
    of the projection needs no layout copy. The fakes apply the same rule to the same
    strides, so torch.compile plans for exactly the strides the kernels return."""
    if varlen or q.dim() != 4 or (q.size(-1) > 1 and q.stride(-1) != 1):
        return layout  # (a non-unit last stride is rejected by the core, naming the caller's own strides)
    seq_dim, head_dim = (2, 1) if layout == "bhsd" else (1, 2)
    if q.size(seq_dim) <= 1 or q.size(head_dim) <= 1 or q.stride(seq_dim) == q.stride(head_dim):
        return layout
    return "bshd" if q.stride(seq_dim) > q.stride(head_dim) else "bhsd"


def _planned(kind: str, arrays: tuple, scalars: tuple, layout: str) -> Optional[tuple]:
    """A repeat call through the core's plan cache (cuflash._api.planned), skipping the
    keyword-option round trip: None when the call has no plan yet, or has options the
    cache does not take (dropout, varlen), and so must take the full path."""
    softmax_scale, causal, causal_alignment, window_left, window_right, softcap, dropout_p, max_seqlen_q, \
        max_seqlen_k, deterministic, _ = scalars
    if dropout_p or max_seqlen_q is not None or max_seqlen_k is not None:
        return None
    return _api.planned(kind, arrays, softmax_scale, causal, causal_alignment, (window_left, window_right), softcap,
                        None, None, deterministic, layout)


def _swap(t: Optional[Tensor]) -> Optional[Tensor]:
    """(B, S, H, D) <-> (B, H, S, D), a view."""
    return None if t is None else t.transpose(1, 2)


# The operators' non-tensor options before the block-sparse arguments (softmax_scale ...
# layout); the block lists and block size follow them (attention_fwd's schema).
_NUM_SCALARS = 11


def _forward_impl(q, k, v, bias, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, *arguments):
    """The forward operator's body (its arguments in its order)."""
    scalars, block = arguments[:_NUM_SCALARS], arguments[_NUM_SCALARS:]
    layout = scalars[-1]
    run = _memory_layout(q, layout, cu_seqlens_q is not None or cu_seqlens_k is not None)
    if run != layout:
        q, k, v = _swap(q), _swap(k), _swap(v)
    done = None
    if (bias is None and mask is None and alibi_slopes is None and cu_seqlens_q is None and cu_seqlens_k is None
            and seed is None and (not block or block[1] is None)):
        done = _planned("forward", (q, k, v), scalars, run)
    if done is not None:
        out, lse = done
    else:
        opts = _core_options(bias, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, *scalars[:-1], run, *block)
        out, lse = cuflash.forward(_exportable(q), _exportable(k), _exportable(v), **opts)
    # Contiguous in the layout run (the host reference may hand back transposed views),
    # then viewed in the caller's: the strides the fake promises.
    out = out.contiguous()
    return (_swap(out) if run != layout else out), lse.contiguous()


def _lse_shape(q: Tensor, varlen: bool, layout: str) -> tuple:
    if varlen:  # q is (total_q, heads, head_dim)
        return (q.shape[1], q.shape[0])
    if layout == "bhsd":
        return (q.shape[0], q.shape[1], q.shape[2])
    return (q.shape[0], q.shape[2], q.shape[1])


@attention_fwd.register_fake
def _attention_fwd_fake(
    q, k, v, bias=None, mask=None, alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_k=None,
    seed=None, softmax_scale=None, causal=False, causal_alignment="bottom_right",
    window_left=-1, window_right=-1, softcap=0.0, dropout_p=0.0, max_seqlen_q=None,
    max_seqlen_k=None, deterministic=False, layout="bshd", block_kv_count=None, block_kv_index=None,
    block_q_count=None, block_q_index=None, block_q=0, block_k=0,
):
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    # lse is float32, except for float64 inputs on the host (the reference keeps float64).
    lse_dtype = torch.float64 if q.dtype == torch.float64 and q.device.type != "cuda" else torch.float32
    lse = q.new_empty(_lse_shape(q, varlen, layout), dtype=lse_dtype)
    if _memory_layout(q, layout, varlen) != layout:
        return _swap(q.new_empty(_swap(q).shape)), lse
    return q.new_empty(q.shape), lse


# ---- the backward operator ----------------------------------------------------------------


@torch.library.custom_op("cuflash::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    bias: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    seed: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    causal_alignment: str = "bottom_right",
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    deterministic: bool = False,
    layout: str = "bshd",
    compute_dbias: bool = True,
    block_kv_count: Optional[Tensor] = None,
    block_kv_index: Optional[Tensor] = None,
    block_q_count: Optional[Tensor] = None,
    block_q_index: Optional[Tensor] = None,
    block_q: int = 0,
    block_k: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """cuflash.backward as a PyTorch operator: returns (dq, dk, dv, dbias). dbias has
    bias's shape and dtype, and is an empty (0,) tensor when no bias is given or
    compute_dbias is false (an operator cannot return None; skipping it saves the dense
    fp32 score-gradient workspace). The options must be the forward's."""
    return _backward_impl(
        dout, q, k, v, out, lse, bias, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed,
        softmax_scale, causal, causal_alignment, window_left, window_right, softcap, dropout_p,
        max_seqlen_q, max_seqlen_k, deterministic, layout, compute_dbias=compute_dbias,
        block_kv_count=block_kv_count, block_kv_index=block_kv_index, block_q_count=block_q_count,
        block_q_index=block_q_index, block_q=block_q, block_k=block_k,
    )


def _backward_impl(dout, q, k, v, out, lse, bias, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, *scalars,
                   compute_dbias: bool, **block):
    """The backward operator's body (its arguments in its order; `block`: the block-sparse
    lists and block size, by name). The gradients come in the layout the forward ran in
    (`_memory_layout` of q), viewed in the caller's."""
    layout = scalars[-1]
    run = _memory_layout(q, layout, cu_seqlens_q is not None or cu_seqlens_k is not None)
    if run != layout:
        dout, q, k, v, out = _swap(dout), _swap(q), _swap(k), _swap(v), _swap(out)
    with_dbias = bias is not None and compute_dbias
    grads = None
    if (bias is None and mask is None and alibi_slopes is None and cu_seqlens_q is None and cu_seqlens_k is None
            and seed is None and block.get("block_kv_index") is None):
        if dout.size(-1) > 1 and dout.stride(-1) != 1:  # as _exportable gives it the full path
            dout = dout.contiguous()
        grads = _planned("backward", (dout, q, k, v, out, lse), scalars, run)
    if grads is None:
        opts = _core_options(bias, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, *scalars[:-1], run, **block)
        grads = cuflash.backward(
            _exportable(dout), _exportable(q), _exportable(k), _exportable(v), _exportable(out),
            _exportable(lse), compute_dbias=with_dbias, **opts,
        )
    dq, dk, dv = (g.contiguous() for g in grads[:3])
    if run != layout:
        dq, dk, dv = _swap(dq), _swap(dk), _swap(dv)
    dbias = grads[3].contiguous() if with_dbias else q.new_empty((0,))
    return dq, dk, dv, dbias


@attention_bwd.register_fake
def _attention_bwd_fake(
    dout, q, k, v, out, lse, bias=None, mask=None, alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_k=None,
    seed=None, softmax_scale=None, causal=False, causal_alignment="bottom_right", window_left=-1, window_right=-1,
    softcap=0.0, dropout_p=0.0, max_seqlen_q=None, max_seqlen_k=None, deterministic=False, layout="bshd",
    compute_dbias=True, *block, **block_by_name,
):
    dbias = bias.new_empty(bias.shape) if bias is not None and compute_dbias else q.new_empty((0,))
    if _memory_layout(q, layout, cu_seqlens_q is not None or cu_seqlens_k is not None) != layout:
        return (*(_swap(t.new_empty(_swap(t).shape)) for t in (q, k, v)), dbias)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


# ---- autograd -----------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, *scalars = inputs
    scalars, block = scalars[:_NUM_SCALARS], scalars[_NUM_SCALARS:]
    block = tuple(block) + (None,) * 4 + (0, 0) if not block else tuple(block)
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, *block[:4])
    ctx.block_size = block[4:6]
    ctx.scalars = scalars
    ctx.num_inputs = len(inputs)
    # The backward has no formula for a gradient flowing into lse: say so to autograd
    # rather than dropping one silently.
    ctx.mark_non_differentiable(lse)


def _gradients(ctx, grad_out, backward_fn):
    """The gradients autograd wants from the saved context, computed by `backward_fn`
    (the backward operator, or its body on the eager path)."""
    q, k, v, out, lse, bias, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, *lists = ctx.saved_tensors
    want_dbias = bias is not None and ctx.needs_input_grad[3]
    block = dict(zip(("block_kv_count", "block_kv_index", "block_q_count", "block_q_index"), lists))
    block.update(block_q=ctx.block_size[0], block_k=ctx.block_size[1])
    dq, dk, dv, dbias = backward_fn(
        _unit_last_stride(grad_out), q, k, v, out, lse, bias, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
        seed, *ctx.scalars, compute_dbias=want_dbias, **block,
    )
    # A gradient for q, k, v and (when it requires one) the bias; none for the mask,
    # slopes, cu_seqlens, seed and the non-tensor options.
    grads = [dq, dk, dv, dbias if want_dbias else None]
    return tuple(grads + [None] * (ctx.num_inputs - len(grads)))


def _backward(ctx, grad_out, grad_lse):
    return _gradients(ctx, grad_out, torch.ops.cuflash.attention_bwd)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _register_device_kernels() -> Any:
    """The operators' bodies registered straight at the CPU and CUDA dispatch keys, which
    the dispatcher prefers to custom_op's own (CompositeExplicitAutograd) registration.
    custom_op's wraps each call in an output-aliasing check and a guard that keeps Dynamo
    from tracing into the body, 10-25 us of Python per call, paid by every call torch.compile's
    generated code makes; neither applies here (the outputs are always new tensors, and
    Dynamo traces the operators through their fakes, never their bodies). The same bodies
    run, so results are the same. Returns the registering Library (it must stay alive), or
    None where custom_op keeps the original function elsewhere (the operators then keep
    custom_op's registration)."""
    bodies = {name: getattr(op, "_init_fn", None) for name, op in (("attention_fwd", attention_fwd),
                                                                    ("attention_bwd", attention_bwd))}
    if any(body is None for body in bodies.values()):
        return None
    library = torch.library.Library("cuflash", "IMPL")
    for name, body in bodies.items():
        for key in ("CPU", "CUDA"):
            library.impl(name, body, key)
    return library


_DEVICE_KERNELS = _register_device_kernels()


class _EagerAttention(torch.autograd.Function):
    """The operators' forward and backward bodies as an autograd Function, for eager calls
    on plain tensors. The result is the same; the cost is not: an autograd-registered
    custom operator re-fills its 20 default arguments from the schema on every call
    (torch.library), about 0.2-0.5 ms of Python, more than the kernels of many problems
    take. torch.compile, export, opcheck, FakeTensor and tensor subclasses see the
    operators (`_use_operators`)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, rest):
        inputs = (q, k, v, bias, *rest)
        out, lse = _forward_impl(*inputs)
        _setup_context(ctx, inputs, (out, lse))
        ctx.num_inputs = 5  # apply's arguments: q, k, v, bias and the rest as one tuple
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return _gradients(ctx, grad_out, _backward_impl)


def _use_operators(*tensors: Optional[Tensor]) -> bool:
    """Whether a call goes through the custom operators rather than `_EagerAttention`:
    while torch.compile or export traces, under torch.func transforms, and for anything
    but plain tensors (FakeTensor, subclasses). Meta tensors take them too: the operators'
    meta implementations give the outputs' shapes, as torch's own operators do."""
    if torch.compiler.is_compiling():
        return True
    functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)
    if functorch_active is not None and functorch_active():
        return True
    return any(t is not None and (type(t) is not Tensor or t.is_meta) for t in tensors)


# ---- differentiable entry points ----------------------------------------------------------


def _seed_tensor(dropout_p: float, seed: Optional[int], q: Tensor) -> Optional[Tensor]:
    """The seed as the operators take it (None without dropout): an explicit seed as an
    int64 CPU scalar; otherwise, for CUDA tensors, a [seed, offset] pair drawn on the device
    from torch's CUDA generator (graph-safe, see the module doc), and for CPU tensors a
    scalar from torch's CPU generator."""
    if not dropout_p > 0:
        return None
    if seed is None:
        if q.device.type == "cuda":
            info = torch.iinfo(torch.int64)
            return torch.randint(info.min, info.max, (2,), dtype=torch.int64, device=q.device)
        return torch.randint(0, 2**62, (), dtype=torch.int64)
    seed = int(seed)
    return torch.tensor(seed - 2**64 if seed >= 2**63 else seed, dtype=torch.int64)


# Options already judged valid, keyed by their values and the values' types (True == 1
# and (-1.0, -1) == (-1, -1), but only the first of each is valid): the check costs ~10 us
# of Python, the lookup ~2 us. Bounded: a workload uses a handful of option sets.
_valid_options: dict[tuple, Any] = {}
_MAX_VALID_OPTIONS = 256


def _options_key(scalars: dict[str, Any]) -> tuple | None:
    key = []
    for value in scalars.values():
        if type(value) in (list, tuple):
            value = (tuple(value), tuple(map(type, value)))
        key.append((value, type(value)))
    key = tuple(key)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _checked_options(where: str, renamed: dict[str, str] | None, **scalars: Any):
    """The non-tensor options judged by the core's rules (cuflash._validate.check_options),
    before any of them is converted to the operators' argument types."""
    key = None if torch.compiler.is_compiling() else _options_key(scalars)
    if key is not None:
        found = _valid_options.get(key)
        if found is not None:
            return found
    opts = check_options(where, renamed, **scalars)
    if key is not None and len(_valid_options) < _MAX_VALID_OPTIONS:
        _valid_options[key] = opts
    return opts


_FP8 = getattr(torch, "float8_e4m3fn", None)


def _call(
    where: str, q: Tensor, k: Tensor, v: Tensor, *, bias=None, mask=None, alibi_slopes=None,
    cu_seqlens_q=None, cu_seqlens_k=None, dropout_p=0.0, seed=None, softmax_scale=None,
    causal=False, causal_alignment="bottom_right", window_size=(-1, -1), softcap=0.0,
    max_seqlen_q=None, max_seqlen_k=None, deterministic=False, layout="bshd", renamed=None,
    block_mask=None, block_size=None,
) -> tuple[Tensor, Tensor]:
    if q.dtype is _FP8 or k.dtype is _FP8 or v.dtype is _FP8:
        # Differentiable operators have no FP8 form: refused before the operators see it.
        raise ValidationError(where, [fp8.forward_only_reason(n, str(t.dtype), where)
                                      for n, t in (("q", q), ("k", k), ("v", v)) if t.dtype is _FP8], [])
    o = _checked_options(
        where, renamed, dropout_p=dropout_p, seed=seed, softmax_scale=softmax_scale, causal=causal,
        causal_alignment=causal_alignment, window_size=window_size, softcap=softcap,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, deterministic=deterministic, layout=layout,
    )
    window_left, window_right = o.window_size
    lists = _block_lists(block_mask, block_size, q, k, o.layout, cu_seqlens_q is not None, o.max_seqlen_q, o.max_seqlen_k)
    args = (
        q, k, v, bias, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
        _seed_tensor(o.dropout_p, o.seed, q),
        None if o.softmax_scale is None else float(o.softmax_scale),
        o.causal, o.causal_alignment, window_left, window_right,
        float(o.softcap), float(o.dropout_p),
        None if o.max_seqlen_q is None else int(o.max_seqlen_q),
        None if o.max_seqlen_k is None else int(o.max_seqlen_k),
        o.deterministic, o.layout, *lists,
    )
    if _use_operators(*args[:8], *lists[:4]):
        return torch.ops.cuflash.attention_fwd(*args)
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                         or (bias is not None and bias.requires_grad))):
        return _forward_impl(*args)
    # Function.apply inspects every argument (~1 us each): the 16 that take no gradient go
    # as one tuple.
    return _EagerAttention.apply(q, k, v, bias, args[4:])


@lists_valid_keywords("cuflash.torch.attention")
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    causal_alignment: str = "bottom_right",
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    deterministic: bool = False,
    layout: str = "bshd",
    return_lse: bool = False,
    block_mask: Any = None,
    block_size: Sequence[int] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """cuflash.attention for torch tensors, differentiable in q, k, v and a float bias.

    Takes every cuflash option (same names and meanings as cuflash.forward). With
    dropout_p > 0 and seed=None the dropout state is drawn from torch's generator (CUDA
    tensors: on the device, graph-safe; see the module doc). Returns out,
    or (out, lse) with return_lse=True (lse carries no gradient). block_mask: a bool tensor
    of blocks with block_size, or a cuflash.block_sparse.BlockSparse of torch tensors
    (compact once, reuse across calls and layers)."""
    out, lse = _call(
        "cuflash.torch.attention", q, k, v, bias=bias, mask=mask, alibi_slopes=alibi_slopes, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, dropout_p=dropout_p, seed=seed, softmax_scale=softmax_scale,
        causal=causal, causal_alignment=causal_alignment, window_size=window_size,
        softcap=softcap, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        deterministic=deterministic, layout=layout, block_mask=block_mask, block_size=block_size,
    )
    return (out, lse) if return_lse else out


def _block_lists(block_mask, block_size, q: Tensor, k: Tensor, layout: str, varlen: bool, max_seqlen_q, max_seqlen_k):
    """The operators' block-sparse inputs: (kv_count, kv_index, q_count, q_index, block_q,
    block_k), compacting a bool block mask on its device; () without a block mask."""
    if block_mask is None:
        if block_size is not None:
            raise ValueError(f"cuflash.torch.attention: block_size={tuple(block_size)!r} is given without a block_mask")
        return ()
    if not isinstance(block_mask, block_sparse.BlockSparse):
        if block_size is None:
            raise ValueError("cuflash.torch.attention: block_size=None with a boolean block_mask: give "
                             "block_size=(block_q, block_k)")
        if varlen:
            nq, nk = max_seqlen_q, max_seqlen_k
        else:
            nq, nk = (q.shape[2], k.shape[2]) if layout == "bhsd" else (q.shape[1], k.shape[1])
        shape = None
        if nq is not None and nk is not None:
            shape = (block_sparse.num_blocks(nq, block_size[0]), block_sparse.num_blocks(nk, block_size[1]))
        block_mask = block_sparse.compact(block_mask, tuple(block_size), shape)
    elif block_size is not None and tuple(block_size) != tuple(block_mask.block_size):
        raise ValueError(f"cuflash.torch.attention: block_size={tuple(block_size)!r} differs from the compact block "
                         f"mask's block_size={tuple(block_mask.block_size)!r}")
    bq, bk = block_mask.block_size
    return (block_mask.kv_count, block_mask.kv_index, block_mask.q_count, block_mask.q_index, int(bq), int(bk))


# ---- drop-in: torch.nn.functional.scaled_dot_product_attention ------------------------------


def _as_bhsd(t: Tensor) -> Tensor:
    """SDPA's (N..., H, S, E) as (batch, H, S, E): missing leading dims become 1, several
    leading dims are flattened into one batch."""
    if t.dim() == 4:
        return t
    if t.dim() < 4:
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    return t.reshape((-1,) + tuple(t.shape[-3:]))


def _scores_operand_as_bhsd(m: Tensor, query: Tensor) -> Tensor:
    """An attn_mask that broadcasts to (N..., H, L, S), as one that broadcasts to the
    flattened (batch, H, L, S). Up to 4-D nothing changes (the core broadcasts NumPy-style,
    which left-pads with 1s exactly as _as_bhsd does)."""
    if query.dim() <= 4:
        return m
    lead = tuple(query.shape[:-3])
    m = m.reshape((1,) * (query.dim() - m.dim()) + tuple(m.shape))
    return m.expand(lead + tuple(m.shape[-3:])).reshape((-1,) + tuple(m.shape[-3:]))


@lists_valid_keywords("cuflash.torch.scaled_dot_product_attention")
def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Drop-in for torch.nn.functional.scaled_dot_product_attention (same signature: scale
    and enable_gqa are keyword-only, as in aten's schema).

    query (N..., Hq, L, E), key and value (N..., Hkv, S, E). A bool attn_mask is cuflash's
    mask (True = attend); a float one is an additive bias, which receives a gradient when it
    requires grad. is_causal is top-left aligned (PyTorch's convention) and, as in PyTorch's
    documentation and math backend, excludes an attn_mask (RuntimeError; cuflash.torch.attention
    takes both). Hq != Hkv needs enable_gqa=True. Like PyTorch,
    dropout applies whenever dropout_p > 0 (the caller passes 0.0 in eval). Differences:
    value's head dim must equal query's (NotImplementedError otherwise), and a row that
    attends no key gives 0 (as PyTorch's math backend does; no NaN)."""
    if query.dim() >= 3 and not enable_gqa and query.size(-3) != key.size(-3):
        raise RuntimeError(
            f"scaled_dot_product_attention: query has {query.size(-3)} heads but key has "
            f"{key.size(-3)} (dim -3); pass enable_gqa=True for grouped-query attention "
            f"(query {tuple(query.shape)}, key {tuple(key.shape)})"
        )
    if is_causal and attn_mask is not None:
        raise RuntimeError(
            "scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True "
            "(as in PyTorch; cuflash.torch.attention(..., causal=True, causal_alignment='top_left', "
            "mask=..., bias=...) combines them)"
        )
    if value.size(-1) != query.size(-1):
        raise NotImplementedError(
            f"scaled_dot_product_attention: value head dim {value.size(-1)} != query head dim "
            f"{query.size(-1)} is not supported by cuflash (value {tuple(value.shape)}, "
            f"query {tuple(query.shape)})"
        )
    bias = mask = None
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            # Checked here so that the message names the argument the caller gave: the
            # core sees it as a bias (float) or a mask (bool).
            raise cuflash.ValidationError(
                "cuflash.torch.scaled_dot_product_attention",
                [f"attn_mask.dtype={attn_mask.dtype} must be bool (True = may attend) or floating "
                 "(added to the scores)"], [])
        if attn_mask.dtype == torch.bool:
            mask = _scores_operand_as_bhsd(attn_mask, query)
        else:
            bias = _scores_operand_as_bhsd(attn_mask, query)
    out, _ = _call(
        "cuflash.torch.scaled_dot_product_attention", _as_bhsd(query), _as_bhsd(key), _as_bhsd(value), bias=bias, mask=mask,
        dropout_p=dropout_p, softmax_scale=scale, causal=is_causal,
        causal_alignment="top_left", layout="bhsd", renamed={"causal": "is_causal", "softmax_scale": "scale"},
    )
    return out.reshape(query.shape)


# ---- drop-ins: FlashAttention-2's flash_attn_func and flash_attn_varlen_func --------------


def _fa2_return(out: Tensor, lse: Tensor, q: Tensor, return_attn_probs: bool):
    if not return_attn_probs:
        return out
    # FlashAttention-2 returns (out, softmax_lse, S_dmask), S_dmask an empty (0,) tensor
    # unless dropout_p > 0 (which the callers reject before computing anything).
    return out, lse, q.new_empty((0,))


def _fa2_unsupported(where: str, dropout_p: float, return_attn_probs: bool, **extra: Any) -> None:
    # (A dropout_p that is not a number is left to the option check, which names it.)
    if return_attn_probs and isinstance(dropout_p, (int, float)) and dropout_p > 0:
        raise NotImplementedError(
            f"{where}: return_attn_probs=True with dropout_p={dropout_p} > 0 asks for S_dmask, "
            "the probability matrix with the dropout pattern encoded in its signs; cuflash "
            "never materialises it (cuflash.reference.probabilities and "
            "cuflash.reference.dropout_keep_mask give it for testing)"
        )
    for name, value in extra.items():
        if value is not None:
            raise NotImplementedError(f"{where}: {name} is not supported by cuflash (got {name}={value!r}); pass None")


@lists_valid_keywords("cuflash.torch.flash_attn_func")
def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """Drop-in for flash_attn.flash_attn_func (FlashAttention-2, same signature).

    q (batch, seqlen_q, heads, head_dim), k and v (batch, seqlen_k, heads_kv, head_dim);
    causal is bottom-right aligned. Returns out, or (out, softmax_lse, S_dmask) with
    return_attn_probs=True, softmax_lse (batch, heads, seqlen_q) and S_dmask an empty
    tensor, as FlashAttention-2 returns it without dropout; return_attn_probs=True with
    dropout_p > 0 raises NotImplementedError. A row that attends no key has output 0 and
    softmax_lse -inf (FlashAttention-2 reports +inf there)."""
    _fa2_unsupported("flash_attn_func", dropout_p, return_attn_probs)
    out, lse = _call(
        "cuflash.torch.flash_attn_func", q, k, v, alibi_slopes=alibi_slopes, dropout_p=dropout_p, softmax_scale=softmax_scale,
        causal=causal, causal_alignment="bottom_right", window_size=window_size,
        softcap=softcap, deterministic=deterministic, layout="bshd",
    )
    return _fa2_return(out, lse, q, return_attn_probs)


@lists_valid_keywords("cuflash.torch.flash_attn_varlen_func")
def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """Drop-in for flash_attn.flash_attn_varlen_func (FlashAttention-2 >= 2.6, same
    signature, block_table included).

    q (total_q, heads, head_dim), k and v (total_k, heads_kv, head_dim); cu_seqlens_q/k
    int32 (batch + 1,). Returns out, or (out, softmax_lse, S_dmask) with softmax_lse
    (heads, total_q). A paged KV cache (block_table) and return_attn_probs=True with
    dropout_p > 0 raise NotImplementedError."""
    _fa2_unsupported("flash_attn_varlen_func", dropout_p, return_attn_probs, block_table=block_table)
    out, lse = _call(
        "cuflash.torch.flash_attn_varlen_func", q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, alibi_slopes=alibi_slopes,
        dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        causal_alignment="bottom_right", window_size=window_size, softcap=softcap,
        deterministic=deterministic,
    )
    return _fa2_return(out, lse, q, return_attn_probs)


# ---- attention over a KV cache ------------------------------------------------------------
#
# A plain function, not an operator: it writes into the caller's caches in place and runs
# on the current stream, through the core API's plan cache (repeat calls allocate their
# outputs from PyTorch's allocator and launch, with no host sync), so a decode step can be
# captured in a CUDA graph once one call of the same shapes ran outside the capture (the
# first call compiles and loads the kernels). torch.compile treats it as opaque (a graph
# break).


@lists_valid_keywords("cuflash.torch.flash_attn_with_kvcache")
def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """Drop-in for flash_attn.flash_attn_with_kvcache (FlashAttention-2, same signature).

    q (batch, seqlen_q, heads, head_dim); k_cache, v_cache (batch_cache, seqlen_cache,
    heads_kv, head_dim), or (num_pages, page_size, heads_kv, head_dim) with block_table
    (batch, max_pages) int32 and any page size that is a multiple of 16; k, v (batch,
    seqlen_new, heads_kv, head_dim) are appended in place at cache_seqlens (an int or int32
    (batch,)), with the rotary embedding applied to them and to q when rotary_cos/sin are
    given. cache_seqlens=None means every cache row is in use (and k, v cannot be given).
    Returns out, or (out, softmax_lse) with softmax_lse float32 (batch, heads, seqlen_q),
    -inf on rows with no key (FlashAttention-2 reports +inf there)."""
    from ._kvcache import WHERE, attention_with_kvcache

    # The options go to the core unchanged, so that it judges them by its own rules (a
    # bool(causal) here would turn causal="no" into True).
    if cache_seqlens is None:
        if k is not None:
            raise ValidationError(WHERE, ["cache_seqlens=None with new keys k: give cache_seqlens, the rows where "
                                          "k and v are appended"], [])
        cache_seqlens = k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
    try:
        return attention_with_kvcache(
            q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table,
            cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad, rotary_cos=rotary_cos,
            rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved, num_splits=num_splits,
            return_lse=return_softmax_lse, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
            softcap=softcap, alibi_slopes=alibi_slopes,
        )
    except ValidationError as exc:
        _name_as_the_caller(exc, "return_lse", "return_softmax_lse")
        raise


def _name_as_the_caller(exc: ValidationError, option: str, given: str) -> None:
    """Rename `option` to `given` (the drop-in's name for it, which the caller wrote) in
    exc's reasons and message, in place, so that the error names what was passed."""
    prefix = option + "="
    if not any(r.startswith(prefix) for r in exc.reasons):
        return
    exc.reasons = [given + r[len(option):] if r.startswith(prefix) else r for r in exc.reasons]
    exc.args = (str(exc).replace("\n  - " + prefix, "\n  - " + given + "="),) + exc.args[1:]


__all__ += ["flash_attn_with_kvcache"]
