"""The framework-agnostic API: attention, forward, backward.

Each call runs the data path once: import (zero-copy) → validate → (host: float64
reference | CUDA: params → kernel variant → build → launch) → results in the caller's type.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import _fast, _interop, _validate, fp8, reference
from ._interop import ArrayRef, Device, InteropError
from ._options import Options, is_real, make_options

_DESCALES = ("q_descale", "k_descale", "v_descale")
_ARRAY_OPTIONS = ("bias", "mask", "alibi_slopes", "cu_seqlens_q", "cu_seqlens_k", "rng_state", "block_mask") + _DESCALES


def _option_arrays(opts: Options) -> dict[str, Any]:
    """The array-valued options by the name they are imported under: a compact block mask
    contributes its four lists (block_mask.kv_count, ...)."""
    out = {}
    for name in _ARRAY_OPTIONS:
        value = getattr(opts, name)
        if value is None:
            continue
        if name == "block_mask" and hasattr(value, "kv_index"):
            out.update({f"block_mask.{part}": arr for part, arr in value.arrays().items()})
        else:
            out[name] = value
    return out


class _Call:
    """Everything one call needs, after import and validation."""

    def __init__(self, where: str, arrays: dict[str, Any], opts: Options, fp8_forward: bool = False):
        self.where = where
        self.fp8 = any(fp8.float8_dtype_name(arrays[n]) for n in ("q", "k", "v"))
        if self.fp8:
            self._refuse_fp8(arrays, fp8_forward, None)
        reasons: list[str] = []
        devices: dict[str, Device] = {}
        for name, obj in arrays.items():
            try:
                devices[name] = _interop.device_of(obj)
            except InteropError as exc:
                reasons.append(f"{name}: {exc}")
        sequences: dict[str, np.ndarray] = {}
        for name, value in _option_arrays(opts).items():
            if isinstance(value, (list, tuple)) or (name in _DESCALES and is_real(value)):
                converted = _validate.sequence_option(name, value, reasons)
                if converted is not None:
                    sequences[name] = converted
            else:
                try:
                    devices[name] = _interop.device_of(value)
                except InteropError as exc:
                    reasons.append(f"{name}: {exc}")
        if len(set(devices.values())) > 1:
            listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
            reasons.append(f"all arrays must be on one device; got {listing}")
        if reasons:
            raise _validate.ValidationError(where, reasons, [])
        self.device = devices["q"]
        self.on_host = self.device.kind == "cpu"
        if self.fp8:
            self._refuse_fp8(arrays, fp8_forward, self.device)
        self.stream = None
        if not self.on_host:
            _require_cupy(where)
            self.stream = _interop.caller_stream(arrays["q"], self.device)
        self.refs: dict[str, ArrayRef] = {
            name: _interop.import_array(name, obj, self.stream) for name, obj in arrays.items()
        }
        self.option_refs: dict[str, ArrayRef] = {}
        for name, value in _option_arrays(opts).items():
            if name in sequences:
                value = self._upload(sequences[name])
            self.option_refs[name] = _interop.import_array(name, value, self.stream)
        self.opts = opts
        self.dims = _validate.check(where, self.refs, opts, self.option_refs, fp8_forward=fp8_forward)

    def _refuse_fp8(self, arrays: dict[str, Any], fp8_forward: bool, device: Device | None) -> None:
        """FP8 calls that cannot run, refused before any array is imported: an entry point
        without FP8, a gradient asked through an FP8 input (checked before the device: a
        traced JAX value has none), a device without an FP8 kernel
        (fp8.kernel_unavailable_reason: every GPU for now)."""
        if not fp8_forward:
            reasons = [fp8.forward_only_reason(n, fp8.float8_dtype_name(arrays[n]), self.where)
                       for n in ("q", "k", "v") if fp8.float8_dtype_name(arrays[n])]
        elif device is None:
            reasons = [r for n in ("q", "k", "v") if (r := fp8.gradient_reason(n, arrays[n], self.where))]
        else:
            unavailable = fp8.kernel_unavailable_reason(device.kind)
            reasons = [] if unavailable is None else [unavailable]
        if reasons:
            raise _validate.ValidationError(self.where, reasons, [])

    def _upload(self, host: np.ndarray) -> Any:
        """Sequences given for small option arrays go to the computing device."""
        if self.on_host:
            return host
        import cupy

        with _interop.on_device(self.device, self.stream):
            return cupy.asarray(host)

    @property
    def q(self) -> ArrayRef:
        return self.refs["q"]

    def option_view(self, name: str) -> Any:
        ref = self.option_refs.get(name)
        return None if ref is None else ref.view

    def reference_options(self) -> dict[str, Any]:
        """The options as the float64 reference takes them, arrays as host views."""
        o = self.opts
        return dict(
            softmax_scale=o.softmax_scale,
            causal=o.causal,
            causal_alignment=o.causal_alignment,
            window_size=o.window_size,
            softcap=o.softcap,
            alibi_slopes=self.option_view("alibi_slopes"),
            bias=self.option_view("bias"),
            mask=self.option_view("mask"),
            block_mask=o.block_mask if "block_mask" not in self.option_refs else self.option_view("block_mask"),
            block_size=o.block_sparse_size,
            dropout_p=o.dropout_p,
            seed=o.seed,
            rng_state=self.option_view("rng_state"),
            position_offsets=o.position_offsets,
            cu_seqlens_q=self.option_view("cu_seqlens_q"),
            cu_seqlens_k=self.option_view("cu_seqlens_k"),
            max_seqlen_q=self.dims.seqlen_q if o.is_varlen else None,
            max_seqlen_k=self.dims.seqlen_k if o.is_varlen else None,
            layout=o.layout,
        )

    def lse_dtype(self) -> np.dtype:
        if self.on_host and self.q.dtype == np.float64:
            return np.dtype(np.float64)
        return np.dtype(np.float32)


def _require_cupy(where: str) -> None:
    try:
        import cupy  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"{where}: CUDA arrays need CuPy; install cuflash with the cuda12 or cuda13 extra "
            "(pip install 'cuflash[cuda12]')"
        ) from exc


@_validate.lists_valid_keywords("cuflash.forward")
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
    rng_state: Any = None,
    position_offsets: Sequence[int] = (0, 0),
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    deterministic: bool = False,
    layout: str = "bshd",
    q_descale: Any = None,
    k_descale: Any = None,
    v_descale: Any = None,
    out_dtype: Any = None,
) -> tuple[Any, Any]:
    """Exact attention forward. Returns (out, lse) in the caller's array type.

    out has q's shape and dtype; lse (float32; float64 for float64 host inputs) has shape
    (batch, num_heads, seqlen_q), or (num_heads, total_q) for a variable-length batch, and
    is -inf on rows that attend to no key. See README.md for every option's meaning.

    float8_e4m3fn q, k, v (host arrays only, for now) stand for q * q_descale, k *
    k_descale, v * v_descale (shapes in cuflash.fp8; None means 1); out is then bfloat16,
    or float16 with out_dtype="float16", and lse float32. No gradient flows through them."""
    options = {k_: v_ for k_, v_ in locals().items() if k_ not in ("q", "k", "v")}
    key = _fast_key("forward", (q, k, v), options)
    if key is not None:
        done = _fast.run(key, (q, k, v), seed)
        if done is not None:
            return done
    return _forward(_Call("cuflash.forward", dict(q=q, k=k, v=v), make_options(**options), fp8_forward=True), key)


@_validate.lists_valid_keywords("cuflash.attention")
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
    rng_state: Any = None,
    position_offsets: Sequence[int] = (0, 0),
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    deterministic: bool = False,
    layout: str = "bshd",
    q_descale: Any = None,
    k_descale: Any = None,
    v_descale: Any = None,
    out_dtype: Any = None,
) -> Any:
    """Exact attention: softmax(q kᵀ · scale + modifiers) v, returned in q's array type.

    With dropout_p > 0 and no seed, a fresh random seed is drawn. FP8 inputs and their
    options (q_descale, k_descale, v_descale, out_dtype) as in `forward`."""
    options = {k_: v_ for k_, v_ in locals().items() if k_ not in ("q", "k", "v")}
    if options["seed"] is None and options["rng_state"] is None and is_real(dropout_p) and dropout_p > 0:
        options["seed"] = int(np.random.default_rng().integers(0, 2**63))
    key = _fast_key("forward", (q, k, v), options)
    if key is not None:
        done = _fast.run(key, (q, k, v), options["seed"])
        if done is not None:
            return done[0]
    out, _ = _forward(_Call("cuflash.attention", dict(q=q, k=k, v=v), make_options(**options), fp8_forward=True), key)
    return out


_PROBABILITIES_LIMIT = 2**28


@_validate.lists_valid_keywords("cuflash.probabilities")
def probabilities(
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
    position_offsets: Sequence[int] = (0, 0),
    layout: str = "bshd",
) -> Any:
    """The attention probabilities P (batch, heads, seqlen_q, seqlen_k), for debugging.

    Row i of P is softmax over keys of the scores with every mask and modifier applied
    (before dropout); rows with no allowed key are 0. Materialises N^2 values: for small
    problems only (at most 2**28 entries). float32 (float64 for float64 host inputs)."""
    opts = make_options(**{k_: v_ for k_, v_ in locals().items() if k_ not in ("q", "k", "v")})
    call = _Call("cuflash.probabilities", dict(q=q, k=k, v=v), opts)
    d = call.dims
    entries = d.batch * d.num_heads * d.seqlen_q * d.seqlen_k
    if entries > _PROBABILITIES_LIMIT:
        raise _validate.ValidationError(
            "cuflash.probabilities",
            [f"batch*heads*seqlen_q*seqlen_k={entries} exceeds {_PROBABILITIES_LIMIT}: probabilities are for small debugging shapes"],
            [call.q],
        )
    if call.on_host:
        probs = reference.probabilities(q=call.q.view, k=call.refs["k"].view, v=call.refs["v"].view,
                                        **{n: val for n, val in call.reference_options().items()
                                           if n not in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "rng_state")})
        return _interop.to_caller(probs.astype(call.lse_dtype()), call.q)
    from . import _launch

    return _launch.probabilities(call)


@_validate.lists_valid_keywords("cuflash.backward")
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
    rng_state: Any = None,
    position_offsets: Sequence[int] = (0, 0),
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    deterministic: bool = False,
    layout: str = "bshd",
    compute_dbias: bool = True,
) -> tuple[Any, ...]:
    """Gradients of exact attention given the forward's out and lse.

    Returns (dq, dk, dv), and (dq, dk, dv, dbias) when a bias is given and compute_dbias
    is true, in the caller's array type. The options must be those of the forward call.
    compute_dbias=False skips the bias gradient and its dense fp32
    (batch, heads, seqlen_q, seqlen_k) workspace (an additive mask needs no gradient)."""
    options = {k_: v_ for k_, v_ in locals().items() if k_ not in ("dout", "q", "k", "v", "out", "lse", "compute_dbias")}
    arrays = (dout, q, k, v, out, lse)
    key = _fast_key("backward", arrays, options)
    if key is not None:
        done = _fast.run(key, arrays, seed)
        if done is not None:
            return done
    call = _Call("cuflash.backward", dict(q=q, k=k, v=v, dout=dout, out=out, lse=lse), make_options(**options))
    return _backward(call, bool(compute_dbias), key)


def _fast_key(kind: str, arrays: tuple, options: dict[str, Any]) -> tuple | None:
    """The call's signature for the plan cache (`_fast`); None for calls with array
    options, which always take the full path."""
    if any(options.get(name) is not None for name in _ARRAY_OPTIONS + ("out_dtype",)):
        return None
    window = options["window_size"]
    offsets = options["position_offsets"]
    scalars = _scalars_key(
        options["softmax_scale"], options["causal"], options["causal_alignment"],
        # The window's element types too: (-1.0, -1) equals (-1, -1) but is rejected.
        (tuple(window), tuple(map(type, window))) if type(window) in (list, tuple) else window,
        options["softcap"], options["dropout_p"],
        options["seed"] is None, options["max_seqlen_q"], options["max_seqlen_k"], options["deterministic"],
        options["layout"], tuple(offsets) if type(offsets) in (list, tuple) else offsets,
    )
    return _fast.signature(kind, arrays, scalars, options["seed"])


def _scalars_key(softmax_scale, causal, causal_alignment, window_size, softcap, dropout_p, no_seed, max_seqlen_q,
                 max_seqlen_k, deterministic, layout, position_offsets) -> tuple:
    """The scalar options' part of a plan-cache signature (`_fast_key`, `planned`)."""
    return (softmax_scale, causal, causal_alignment, window_size, softcap, dropout_p, no_seed, max_seqlen_q,
            max_seqlen_k, deterministic, layout, position_offsets)


def planned(kind: str, arrays: tuple, softmax_scale: float | None, causal: bool, causal_alignment: str,
            window_size: tuple[int, int], softcap: float, max_seqlen_q: int | None, max_seqlen_k: int | None,
            deterministic: bool, layout: str) -> tuple | None:
    """A repeat call through the plan cache alone, for adapters that call with the same
    options every step: kind "forward" (arrays q, k, v; returns (out, lse)) or "backward"
    (arrays dout, q, k, v, out, lse; returns (dq, dk, dv)), without array options,
    dropout or position offsets. Returns None, having done nothing, when the call's
    signature has no plan: the caller then takes `forward`/`backward`, whose first
    successful call makes one (so every error is still raised there). The options must be
    given with the types `forward`/`backward` would get them (the signature holds the
    types): window_size a tuple of two ints."""
    window = (tuple(window_size), tuple(map(type, window_size)))  # as _fast_key spells it
    scalars = _scalars_key(softmax_scale, causal, causal_alignment, window, softcap, 0.0, True, max_seqlen_q,
                           max_seqlen_k, deterministic, layout, (0, 0))
    key = _fast.signature(kind, arrays, scalars, None)
    return None if key is None else _fast.run(key, arrays, None)


def _forward(call: _Call, fast_key: tuple | None = None) -> tuple[Any, Any]:
    q = call.q
    if call.on_host and call.fp8:
        # The float64 reference on the dequantised inputs; out in the FP8 kernel's dtype.
        out64, lse64 = reference.forward(
            q.view, call.refs["k"].view, call.refs["v"].view, **call.reference_options(),
            **{name: call.option_view(name) for name in _DESCALES},
        )
        out_dtype = _interop.BFLOAT16 if call.opts.out_dtype in (None, "bfloat16") else np.dtype(np.float16)
        return _interop.to_caller(out64.astype(out_dtype), q), _interop.to_caller(lse64.astype(np.float32), q)
    if call.on_host:
        out64, lse64 = reference.forward(
            q.view, call.refs["k"].view, call.refs["v"].view, **call.reference_options()
        )
        out = out64.astype(q.dtype)
        lse = lse64.astype(call.lse_dtype())
        return _interop.to_caller(out, q), _interop.to_caller(lse, q)
    from . import _launch

    return _launch.forward(call, fast_key)


def _backward(call: _Call, compute_dbias: bool, fast_key: tuple | None = None) -> tuple[Any, ...]:
    q = call.q
    if call.on_host:
        r = call.refs
        grads = reference.backward(
            r["dout"].view, q.view, r["k"].view, r["v"].view, r["out"].view, r["lse"].view,
            **call.reference_options(),
        )
        if not compute_dbias:
            grads = grads[:3]
        results = []
        for grad, like in zip(grads, ("q", "k", "v", "bias")):
            ref = r[like] if like != "bias" else call.option_refs["bias"]
            results.append(_interop.to_caller(grad.astype(ref.dtype), ref))
        return tuple(results)
    from . import _launch

    return _launch.backward(call, compute_dbias, fast_key)
