"""Hugging Face transformers integration: cuflash as a selectable attention implementation.

    import cuflash.transformers
    name = cuflash.transformers.register()            # "cufa"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)
    model.set_attn_implementation(name)               # or switch an existing model

`register` adds cuflash's attention function to transformers' `AttentionInterface` and,
where the installed transformers has one (4.53 and later), the matching mask function to
its `AttentionMaskInterface`, under one name. Models written on the attention interface
(Llama, Mistral, Qwen2/3, Gemma, Gemma-2/3, Phi-3, ... : the models whose
`_supports_attention_backend` is true) then run their attention through
`cuflash.torch.attention`, forward and backward, with padding masks, grouped-query heads,
logit soft-capping, sliding windows, dropout and the model's own scaling.

The name. transformers treats an implementation name by its text before it looks it up:

- a name containing "flash" is a FlashAttention request, sent to transformers' own kernel
  loader (`is_flash_attention_requested` tests `"flash" in name`), which fails for any
  name it does not know ("Could not find the currently requested flash attention
  implementation"), whatever is registered under it; so "cuflash" itself cannot be used;
- a name of the form "owner/repo" (optionally "@rev" / ":func") is a Hub kernel to download;
- "sdpa", "flex_attention" and "paged|..." (as substrings) select checks and mask
  builders of their own.

"cufa" (cuflash attention) avoids all of them, in 4.5x and 5.x alike; `register` refuses a
name that would be rerouted, naming the reason.

Masks. transformers 5.x builds no mask at all for an implementation its mask interface does
not list, so `register` lists the name there with transformers' SDPA mask builder: a
boolean (batch, 1, q_len, kv_len) mask (True = attend), or None when causal alone is
exact (no padding), in which case the kernels apply causality (and the sliding window)
themselves and read no mask. Older releases (before the mask interface) hand every custom
implementation the additive float mask they build for eager attention; it goes to cuflash
as an additive bias (no gradient), exactly what eager attention adds. Either way the mask
transformers made is passed as a view, broadcast over heads: nothing larger is built here.
A query row that may attend no key (a padded row) gives 0, as SDPA does; eager attention
gives the mean of the values there. Neither touches a real token's output.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from . import torch as cuflash_torch
from ._options import _is_int
from ._validate import ValidationError, check_options

__all__ = ["DEFAULT_NAME", "attention_forward", "register"]

DEFAULT_NAME = "cufa"
_WHERE = "cuflash.transformers.attention_forward"
# transformers' names for the core's options, so that an error names what the model passed.
_RENAMED = {"dropout_p": "dropout", "softmax_scale": "scaling", "causal": "is_causal"}
# Option sets already judged valid (as in cuflash.torch: the check is ~10 us of Python per
# layer call, the lookup ~2 us); bounded, a model uses one or two.
_valid_options: dict[tuple, Any] = {}
_MAX_VALID_OPTIONS = 64


def _checked_options(**scalars: Any):
    """The scalar options by the core's rules (cuflash._validate.check_options), named as
    transformers names them in an error."""
    key = None if torch.compiler.is_compiling() else cuflash_torch._options_key(scalars)
    found = None if key is None else _valid_options.get(key)
    if found is None:
        found = check_options(_WHERE, _RENAMED, **scalars)
        if key is not None and len(_valid_options) < _MAX_VALID_OPTIONS:
            _valid_options[key] = found
    return found

# Substrings by which transformers routes an implementation name elsewhere, with why.
_ROUTED = (
    ("flash", "transformers sends any name containing 'flash' to its own FlashAttention kernel loader"),
    ("sdpa", "transformers applies its SDPA checks to any name containing 'sdpa'"),
    ("flex_attention", "transformers applies its flex-attention checks to any name containing 'flex_attention'"),
    ("paged", "transformers treats 'paged' names as its paged-cache implementations"),
    ("/", "transformers reads 'owner/repo' names as Hub kernels to download"),
    (":", "transformers reads 'repo:function' names as Hub kernels to download"),
)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast runs matrix products in on `device_type`, None when it is off.
    The custom operators are not on autocast's lists, so the inputs are cast here as
    autocast casts SDPA's (models apply rotary embeddings in fp32 under autocast, and the
    kernels take one dtype for q, k and v)."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract, on cuflash.

    query (batch, heads, q_len, head_dim), key and value (batch, kv_heads, kv_len,
    head_dim), heads a multiple of kv_heads (grouped-query attention runs on the kv heads
    directly; nothing is repeated). attention_mask: boolean (True = attend) or additive
    float, broadcastable to (batch, heads, q_len, kv_len), or None, when the module's
    causality (`is_causal`, default the module's own, default True) is the whole mask.
    Returns (attn_output (batch, q_len, heads, head_dim), None): attention weights are
    never materialised."""
    for name in ("position_bias", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"cuflash attention: {name} is not supported (got a {type(kwargs[name]).__name__}); "
                "use attn_implementation='eager' for this model"
            )
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # The options are judged by the core's rules before any of them is converted (a
    # bool("no") or float("x") here would run with another value, or fail unclearly).
    reasons = []
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        reasons.append(f"attention_mask must be a torch.Tensor or None; got {type(attention_mask).__name__}")
    if sliding_window is not None and not _is_int(sliding_window):
        reasons.append(f"sliding_window={sliding_window!r} must be an int or None")
    try:
        opts = _checked_options(dropout_p=dropout, softmax_scale=scaling, softcap=softcap, causal=is_causal)
    except ValidationError as exc:
        reasons = exc.reasons + reasons
    if reasons:
        raise ValidationError(_WHERE, reasons, [])
    cast = _autocast_dtype(query.device.type)
    if cast is not None and query.is_floating_point():
        query, key, value = (t if t.dtype == cast else t.to(cast) for t in (query, key, value))

    q_len, kv_len = query.shape[2], key.shape[2]
    bias = mask = None
    window = (-1, -1)
    if attention_mask is not None:
        # transformers may build the mask for a longer (static) cache than it passes keys
        # for; the first kv_len columns are this call's.
        if attention_mask.shape[-1] != kv_len:
            attention_mask = attention_mask[..., :kv_len]
        if attention_mask.dtype == torch.bool:
            mask = attention_mask
        else:
            bias = attention_mask.detach()
        causal = False
    else:
        causal = opts.causal and q_len > 1
        if causal and kv_len > q_len:
            # Causal without a mask and more keys than queries only happens for a prefill
            # into an empty static cache: the trailing keys are empty slots, and SDPA's
            # top-left causal attends none of them. Attend the first q_len keys.
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        if causal and sliding_window is not None and sliding_window > 0:
            # transformers' sliding window lets query i see keys i - sliding_window + 1 .. i.
            window = (int(sliding_window) - 1, -1)
    out = cuflash_torch.attention(
        query, key, value, bias=bias, mask=mask, causal=causal, causal_alignment="top_left",
        window_size=window, softcap=float(opts.softcap), dropout_p=float(opts.dropout_p),
        softmax_scale=opts.softmax_scale, layout="bhsd",
    )
    # (batch, heads, q_len, dim) -> (batch, q_len, heads, dim). When q is a head-transposed
    # view of (batch, q_len, heads, dim) memory (a projection viewed per head), so is out,
    # and this is free.
    return out.transpose(1, 2).contiguous(), None


def register(name: str = DEFAULT_NAME) -> str:
    """Register cuflash with transformers under `name` (default "cufa") and return the name,
    for `from_pretrained(..., attn_implementation=name)` or
    `model.set_attn_implementation(name)`. Registering again is harmless.

    Needs transformers with `AttentionInterface` (4.51 or later). See the module doc for
    why the name cannot contain "flash"."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r} must be a non-empty string")
    for part, reason in _ROUTED:
        if part in name:
            raise ValueError(f"name={name!r} must not contain {part!r}: {reason}; the default is {DEFAULT_NAME!r}")
    if name == "eager":
        raise ValueError(f"name={name!r} is transformers' own eager attention; pick another name")
    try:
        from transformers import AttentionInterface
    except ImportError as exc:
        raise ImportError(
            "cuflash.transformers.register needs transformers 4.51 or later (AttentionInterface); "
            "pip install 'transformers>=4.51'"
        ) from exc
    AttentionInterface.register(name, attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        # Before the mask interface, custom implementations receive eager's additive mask.
        return name
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
