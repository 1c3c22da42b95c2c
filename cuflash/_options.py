"""One vocabulary of attention options, shared by the API, the reference and the adapters.

Every entry point takes the same keyword options (FlashAttention-2's names where it has
one). `Options` is the normalised, immutable record of them; it holds arrays (bias, mask,
slopes, cu_seqlens) by reference and never copies them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

LAYOUTS = ("bshd", "bhsd")
CAUSAL_ALIGNMENTS = ("bottom_right", "top_left")
# Global positions (position_offsets) stay within the kernels' 32-bit row arithmetic.
MAX_POSITION = 2**30

# The keyword options every entry point accepts, in documentation order.
OPTION_NAMES = (
    "softmax_scale",
    "causal",
    "causal_alignment",
    "window_size",
    "softcap",
    "alibi_slopes",
    "bias",
    "mask",
    "block_mask",
    "block_size",
    "dropout_p",
    "seed",
    "rng_state",
    "position_offsets",
    "cu_seqlens_q",
    "cu_seqlens_k",
    "max_seqlen_q",
    "max_seqlen_k",
    "deterministic",
    "layout",
)

# Options of FP8 (float8_e4m3fn) inputs, taken by forward and attention only (FP8 has no
# backward): each input's descale factor (x stands for x8 * x_descale; cuflash.fp8 gives
# the shapes) and the output's dtype.
FP8_OPTION_NAMES = ("q_descale", "k_descale", "v_descale", "out_dtype")
FP8_OUT_DTYPES = ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Options:
    """Normalised attention options. Field meanings are documented in README.md."""

    softmax_scale: float | None = None
    causal: bool = False
    causal_alignment: str = "bottom_right"
    window_size: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi_slopes: Any = None
    bias: Any = None
    mask: Any = None
    # Block-sparse attention (cuflash.block_sparse): a boolean block mask with its
    # block_size, or a compact BlockSparse (which carries its own block size).
    block_mask: Any = None
    block_size: tuple[int, int] | None = None
    dropout_p: float = 0.0
    seed: int | None = None
    rng_state: Any = None
    position_offsets: tuple[int, int] = (0, 0)
    cu_seqlens_q: Any = None
    cu_seqlens_k: Any = None
    max_seqlen_q: int | None = None
    max_seqlen_k: int | None = None
    deterministic: bool = False
    layout: str = "bshd"
    # FP8 inputs: descales (None means 1) and the output dtype (None means bfloat16).
    q_descale: Any = None
    k_descale: Any = None
    v_descale: Any = None
    out_dtype: str | None = None

    @property
    def block_sparse_size(self) -> tuple[int, int] | None:
        """The block size of a block-sparse call, None for a dense one."""
        if self.block_mask is None:
            return None
        size = getattr(self.block_mask, "block_size", None)
        if size is None or not hasattr(self.block_mask, "kv_index"):
            size = self.block_size
        return None if size is None else tuple(int(b) for b in size)

    @property
    def is_varlen(self) -> bool:
        return self.cu_seqlens_q is not None or self.cu_seqlens_k is not None

    def scale_for(self, head_dim: int) -> float:
        """The softmax scale actually used: the given one, or 1/sqrt(head_dim)."""
        if self.softmax_scale is not None:
            return float(self.softmax_scale)
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0

    def replace(self, **changes: Any) -> "Options":
        return dataclasses.replace(self, **changes)


def option_errors(opts: Options) -> list[str]:
    """Reasons why scalar options are invalid (array-valued options are checked in
    _validate, which knows the shapes). Each reason names the offending value."""
    errors = []
    if opts.layout not in LAYOUTS:
        errors.append(f"layout={opts.layout!r} must be one of {LAYOUTS}")
    if opts.causal_alignment not in CAUSAL_ALIGNMENTS:
        errors.append(
            f"causal_alignment={opts.causal_alignment!r} must be one of {CAUSAL_ALIGNMENTS}"
        )
    ws = opts.window_size
    if not (isinstance(ws, tuple) and len(ws) == 2 and all(_is_int(w) for w in ws)):
        errors.append(f"window_size={ws!r} must be a pair of ints (left, right)")
    elif ws[0] < -1 or ws[1] < -1:
        errors.append(f"window_size={ws!r}: each side must be >= -1 (-1 means unbounded)")
    if not is_real(opts.softcap) or not math.isfinite(opts.softcap) or opts.softcap < 0:
        errors.append(f"softcap={opts.softcap!r} must be a finite number >= 0 (0 disables it)")
    if not is_real(opts.dropout_p) or not (0.0 <= opts.dropout_p < 1.0):
        errors.append(f"dropout_p={opts.dropout_p!r} must satisfy 0 <= dropout_p < 1")
    if opts.softmax_scale is not None and (
        not is_real(opts.softmax_scale) or not math.isfinite(opts.softmax_scale)
    ):
        errors.append(f"softmax_scale={opts.softmax_scale!r} must be a finite number or None")
    if opts.seed is not None and (not _is_int(opts.seed) or not 0 <= opts.seed < 2**64):
        errors.append(f"seed={opts.seed!r} must be an int in [0, 2**64) or None")
    if opts.seed is not None and opts.rng_state is not None:
        errors.append("seed and rng_state are both given: give one (rng_state is a device [seed, offset] pair)")
    po = opts.position_offsets
    if not (isinstance(po, tuple) and len(po) == 2 and all(_is_int(x) for x in po)):
        errors.append(f"position_offsets={po!r} must be a pair of ints (q_start, k_start)")
    elif not all(0 <= x <= MAX_POSITION for x in po):
        errors.append(f"position_offsets={po!r}: each must lie in [0, {MAX_POSITION}]")
    elif is_real(opts.dropout_p) and opts.dropout_p > 0 and (po[0] % 16 or po[1] % 2):
        errors.append(
            f"position_offsets={po!r} with dropout_p={opts.dropout_p}: dropout draws by global position "
            "and needs q_start % 16 == 0 and k_start % 2 == 0"
        )
    for name in ("max_seqlen_q", "max_seqlen_k"):
        value = getattr(opts, name)
        if value is not None and (not _is_int(value) or value < 0):
            errors.append(f"{name}={value!r} must be a non-negative int or None")
    errors += _block_mask_errors(opts)
    if opts.out_dtype is not None and opts.out_dtype not in FP8_OUT_DTYPES:
        errors.append(f"out_dtype={opts.out_dtype!r} must be one of {FP8_OUT_DTYPES} or None (bfloat16)")
    if not isinstance(opts.causal, bool):
        errors.append(f"causal={opts.causal!r} must be a bool")
    if not isinstance(opts.deterministic, bool):
        errors.append(f"deterministic={opts.deterministic!r} must be a bool")
    return errors


def _block_mask_errors(opts: Options) -> list[str]:
    from .block_sparse import block_size_errors

    if opts.block_mask is None:
        if opts.block_size is not None:
            return [f"block_size={opts.block_size!r} is given without a block_mask"]
        return []
    compact = hasattr(opts.block_mask, "kv_index")
    if compact:
        own = tuple(opts.block_mask.block_size)
        if opts.block_size is not None and tuple(opts.block_size) != own:
            return [f"block_size={tuple(opts.block_size)!r} differs from the compact block mask's block_size={own!r}"]
        return block_size_errors(own)
    if opts.block_size is None:
        return ["block_size=None with a boolean block_mask: give block_size=(block_q, block_k)"]
    return block_size_errors(opts.block_size)


def make_options(**kwargs: Any) -> Options:
    """Build Options from keyword arguments, converting the forgiving spellings
    (lists for window_size, numpy scalars) to their canonical types."""
    unknown = sorted(set(kwargs) - set(OPTION_NAMES) - set(FP8_OPTION_NAMES))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; the options are {list(OPTION_NAMES + FP8_OPTION_NAMES)}")
    ws = kwargs.get("window_size", (-1, -1))
    if ws is None:
        ws = (-1, -1)
    if isinstance(ws, list):
        ws = tuple(ws)
    if isinstance(ws, tuple) and all(_is_int(w) for w in ws):
        ws = tuple(int(w) for w in ws)
    kwargs["window_size"] = ws
    po = kwargs.get("position_offsets", (0, 0))
    if po is None:
        po = (0, 0)
    if isinstance(po, list):
        po = tuple(po)
    if isinstance(po, tuple) and all(_is_int(x) for x in po):
        po = tuple(int(x) for x in po)
    kwargs["position_offsets"] = po
    bs = kwargs.get("block_size")
    if isinstance(bs, list):
        bs = tuple(bs)
    if isinstance(bs, tuple) and all(_is_int(x) for x in bs):
        bs = tuple(int(x) for x in bs)
    kwargs["block_size"] = bs
    if kwargs.get("out_dtype") is not None:
        kwargs["out_dtype"] = _dtype_spelling(kwargs["out_dtype"])
    for name in ("softcap", "dropout_p"):
        if name in kwargs and kwargs[name] is None:
            kwargs[name] = 0.0
    for name in ("causal", "deterministic"):
        if name in kwargs and _is_bool_like(kwargs[name]):
            kwargs[name] = bool(kwargs[name])
    return Options(**kwargs)


def _dtype_spelling(dtype: Any) -> Any:
    """out_dtype as a name ("bfloat16" for torch.bfloat16, jnp.bfloat16, ml_dtypes.bfloat16
    or the string); anything else is kept as given, for option_errors to name."""
    if isinstance(dtype, str):
        return dtype
    import numpy as np

    name = str(dtype).removeprefix("torch.")
    if name not in FP8_OUT_DTYPES:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            return dtype
    return name if name in FP8_OUT_DTYPES else dtype


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) or _is_numpy_integer(x)


def _is_numpy_integer(x: Any) -> bool:
    import numpy as np

    return isinstance(x, np.integer)


def is_real(x: Any) -> bool:
    import numpy as np

    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _is_bool_like(x: Any) -> bool:
    import numpy as np

    return isinstance(x, (bool, np.bool_))
