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
from cuflash import _api

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
    tensors that require grad; autograd supplies the gradient, not the export), with a unit
    stride along its last dimension (the kernels load rows as vectors). Other strides,
    broadcast (stride-0) dimensions included, are passed through as they are."""
    if t is None:
        return None
    t = t.detach()
    if t.dim() > 0 and t.size(-1) > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return t


def _core_options(
    bias, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed,
    softmax_scale, causal, causal_alignment, window_left, window_right, softcap, dropout_p,
    max_seqlen_q, max_seqlen_k, deterministic, layout,
) -> dict[str, Any]:
    """The operator's arguments as cuflash.forward/backward keyword options."""
    return dict(
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
) -> tuple[Tensor, Tensor]:
    """cuflash.forward as a PyTorch operator: returns (out, lse).

    Options are cuflash's (README.md), with window_size split into window_left and
    window_right, and the dropout seed given as an int64 tensor (read on the host)."""
    return _forward_impl(
        q, k, v, bias, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, softmax_scale, causal,
        causal_alignment, window_left, window_right, softcap, dropout_p, max_seqlen_q,
        max_seqlen_k, deterministic, layout,
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
    if varlen or q.dim() != 4:
        return layout
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


def _forward_impl(q, k, v, bias, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, *scalars):
    """The forward operator's body (its arguments in its order)."""
    layout = scalars[-1]
    run = _memory_layout(q, layout, cu_seqlens_q is not None or cu_seqlens_k is not None)
    if run != layout:
        q, k, v = _swap(q), _swap(k), _swap(v)
    done = None
    if (bias is None and mask is None and alibi_slopes is None and cu_seqlens_q is None and cu_seqlens_k is None
            and seed is None):
        done = _planned("forward", (q, k, v), scalars, run)
    if done is not None:
        out, lse = done
    else:
        opts = _core_options(bias, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, *scalars[:-1], run)
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
    max_seqlen_k=None, deterministic=False, layout="bshd",
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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """cuflash.backward as a PyTorch operator: returns (dq, dk, dv, dbias). dbias has
    bias's shape and dtype, and is an empty (0,) tensor when no bias is given or
    compute_dbias is false (an operator cannot return None; skipping it saves the dense
    fp32 score-gradient workspace). The options must be the forward's."""
    return _backward_impl(
        dout, q, k, v, out, lse, bias, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed,
        softmax_scale, causal, causal_alignment, window_left, window_right, softcap, dropout_p,
        max_seqlen_q, max_seqlen_k, deterministic, layout, compute_dbias=compute_dbias,
    )


def _backward_impl(dout, q, k, v, out, lse, bias, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, *scalars,
                   compute_dbias: bool):
    """The backward operator's body (its arguments in its order). The gradients come in the
    layout the forward ran in (`_memory_layout` of q), viewed in the caller's."""
    layout = scalars[-1]
    run = _memory_layout(q, layout, cu_seqlens_q is not None or cu_seqlens_k is not None)
    if run != layout:
        dout, q, k, v, out = _swap(dout), _swap(q), _swap(k), _swap(v), _swap(out)
    with_dbias = bias is not None and compute_dbias
    grads = None
    if (bias is None and mask is None and alibi_slopes is None and cu_seqlens_q is None and cu_seqlens_k is None
            and seed is None):
        if dout.size(-1) > 1 and dout.stride(-1) != 1:  # as _exportable gives it the full path
            dout = dout.contiguous()
        grads = _planned("backward", (dout, q, k, v, out, lse), scalars, run)
    if grads is None:
        opts = _core_options(bias, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, *scalars[:-1], run)
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
    compute_dbias=True,
):
    dbias = bias.new_empty(bias.shape) if bias is not None and compute_dbias else q.new_empty((0,))
    if _memory_layout(q, layout, cu_seqlens_q is not None or cu_seqlens_k is not None) != layout:
        return (*(_swap(t.new_empty(_swap(t).shape)) for t in (q, k, v)), dbias)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


# ---- autograd -----------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, *scalars = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed)
    ctx.scalars = scalars
    ctx.num_inputs = len(inputs)
    # The backward has no formula for a gradient flowing into lse: say so to autograd
    # rather than dropping one silently.
    ctx.mark_non_differentiable(lse)


def _gradients(ctx, grad_out, backward_fn):
    """The gradients autograd wants from the saved context, computed by `backward_fn`
    (the backward operator, or its body on the eager path)."""
    q, k, v, out, lse, bias, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed = ctx.saved_tensors
    want_dbias = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = backward_fn(
        grad_out, q, k, v, out, lse, bias, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
        seed, *ctx.scalars, compute_dbias=want_dbias,
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
    but plain tensors (FakeTensor, subclasses)."""
    if torch.compiler.is_compiling():
        return True
    functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)
    if functorch_active is not None and functorch_active():
        return True
    return any(t is not None and type(t) is not Tensor for t in tensors)


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


def _call(
    q: Tensor, k: Tensor, v: Tensor, *, bias=None, mask=None, alibi_slopes=None,
    cu_seqlens_q=None, cu_seqlens_k=None, dropout_p=0.0, seed=None, softmax_scale=None,
    causal=False, causal_alignment="bottom_right", window_size=(-1, -1), softcap=0.0,
    max_seqlen_q=None, max_seqlen_k=None, deterministic=False, layout="bshd",
) -> tuple[Tensor, Tensor]:
    if window_size is None:
        window_size = (-1, -1)
    window_left, window_right = window_size
    args = (
        q, k, v, bias, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
        _seed_tensor(dropout_p, seed, q),
        None if softmax_scale is None else float(softmax_scale),
        bool(causal), causal_alignment, int(window_left), int(window_right),
        float(softcap or 0.0), float(dropout_p or 0.0),
        None if max_seqlen_q is None else int(max_seqlen_q),
        None if max_seqlen_k is None else int(max_seqlen_k),
        bool(deterministic), layout,
    )
    if _use_operators(*args[:8]):
        return torch.ops.cuflash.attention_fwd(*args)
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                         or (bias is not None and bias.requires_grad))):
        return _forward_impl(*args)
    # Function.apply inspects every argument (~1 us each): the 16 that take no gradient go
    # as one tuple.
    return _EagerAttention.apply(q, k, v, bias, args[4:])


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
) -> Tensor | tuple[Tensor, Tensor]:
    """cuflash.attention for torch tensors, differentiable in q, k, v and a float bias.

    Takes every cuflash option (same names and meanings as cuflash.forward). With
    dropout_p > 0 and seed=None the dropout state is drawn from torch's generator (CUDA
    tensors: on the device, graph-safe; see the module doc). Returns out,
    or (out, lse) with return_lse=True (lse carries no gradient)."""
    out, lse = _call(
        q, k, v, bias=bias, mask=mask, alibi_slopes=alibi_slopes, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, dropout_p=dropout_p, seed=seed, softmax_scale=softmax_scale,
        causal=causal, causal_alignment=causal_alignment, window_size=window_size,
        softcap=softcap, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        deterministic=deterministic, layout=layout,
    )
    return (out, lse) if return_lse else out


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
        if attn_mask.dtype == torch.bool:
            mask = _scores_operand_as_bhsd(attn_mask, query)
        else:
            bias = _scores_operand_as_bhsd(attn_mask, query)
    out, _ = _call(
        _as_bhsd(query), _as_bhsd(key), _as_bhsd(value), bias=bias, mask=mask,
        dropout_p=dropout_p, softmax_scale=scale, causal=is_causal,
        causal_alignment="top_left", layout="bhsd",
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
    if return_attn_probs and dropout_p > 0:
        raise NotImplementedError(
            f"{where}: return_attn_probs=True with dropout_p={dropout_p} > 0 asks for S_dmask, "
            "the probability matrix with the dropout pattern encoded in its signs; cuflash "
            "never materialises it (cuflash.reference.probabilities and "
            "cuflash.reference.dropout_keep_mask give it for testing)"
        )
    for name, value in extra.items():
        if value is not None:
            raise NotImplementedError(f"{where}: {name} is not supported by cuflash (got {name}={value!r}); pass None")


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
        q, k, v, alibi_slopes=alibi_slopes, dropout_p=dropout_p, softmax_scale=softmax_scale,
        causal=causal, causal_alignment="bottom_right", window_size=window_size,
        softcap=softcap, deterministic=deterministic, layout="bshd",
    )
    return _fa2_return(out, lse, q, return_attn_probs)


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
        q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, alibi_slopes=alibi_slopes,
        dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        causal_alignment="bottom_right", window_size=window_size, softcap=softcap,
        deterministic=deterministic,
    )
    return _fa2_return(out, lse, q, return_attn_probs)
