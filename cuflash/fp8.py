"""FP8 (e4m3) attention inputs: quantisation with scales, incoherent processing, and an
emulation of the FP8 forward kernel's arithmetic.

    q8, q_descale = cuflash.fp8.quantize(q, granularity="block")
    out, lse = cuflash.forward(q8, k8, v8, q_descale=q_descale, k_descale=..., v_descale=...)

The format is float8_e4m3fn (NumPy: ml_dtypes.float8_e4m3fn, torch.float8_e4m3fn,
jnp.float8_e4m3fn): 1 sign bit, 4 exponent bits, 3 mantissa bits, largest finite value
448, smallest normal 2**-6, smallest subnormal 2**-9, no infinity, one NaN per sign. A
quantised tensor stands for `x8 * descale`, with `descale` float32 broadcast over a
group of elements:

    granularity  descale shape                   group
    "tensor"     ()                              the whole tensor
    "head"       (batch, heads)                  one (batch, head) slice
    "block"      (batch, heads, ceil(seqlen/B))  B consecutive rows of one (batch, head)

B = BLOCK_ROWS = 128 by default: one query tile of the FP8 kernel, and one key tile, so a
scale is a single number per tile of either product. `descale = amax / 448` over the
group's finite values (1 for a group with none, or all zero), so the largest element maps
to 448 and nothing overflows. Rounding is to nearest, ties to even.

Non-finite values: NaN stays NaN, and ±inf becomes NaN (e4m3fn has no infinity). Finite
values never exceed ±448 after scaling except by the rounding of the scale itself; they
saturate to ±448 (libraries differ here: torch's cast saturates even infinities,
ml_dtypes and JAX turn anything past 464 into NaN, so the clip is explicit).

Incoherent processing (`hadamard_transform`, README "FP8"): q and k are multiplied along
head_dim by the same seeded random orthogonal matrix M = D H / sqrt(d), which leaves
q kᵀ unchanged and spreads a large coordinate over all d coordinates before quantisation.

`emulate_forward` reproduces the FP8 kernel's arithmetic in NumPy (e4m3 operands, fp32
scores and accumulators, P quantised to e4m3) for accuracy studies on machines without
a GPU; `benchmarks/fp8_accuracy.py` uses it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

E4M3_MAX = 448.0
E4M3_MIN_NORMAL = 2.0**-6
E4M3_MIN_SUBNORMAL = 2.0**-9
# Unit roundoff of e4m3: 3 stored mantissa bits, so a normal value rounds to within
# 2**-4 of itself (half a unit in the last place, relative); a subnormal one to within
# 2**-10 absolute (half the subnormal spacing 2**-9).
E4M3_UNIT_ROUNDOFF = 2.0**-4
E4M3_SUBNORMAL_HALF_SPACING = 2.0**-10
BLOCK_ROWS = 128
# P = exp(s - running max) lies in [0, 1]; the kernel multiplies it by 2**8 before the e4m3
# conversion (FlashAttention-3's max offset of 8) and divides the row sum by the same
# factor, so P's largest value sits at 256 <= 448 and values down to 2**-14 stay normal.
# A power of two makes the scaling itself exact.
P_SCALE = 256.0
GRANULARITIES = ("tensor", "head", "block")


def float8_dtype_name(obj: Any) -> str | None:
    """The float8 dtype's name of an array of any library ("float8_e4m3fn", ...), None
    for other dtypes. Reads only the dtype."""
    name = str(getattr(obj, "dtype", ""))
    name = name.removeprefix("torch.")
    return name if name.startswith("float8") else None


def is_e4m3(obj: Any) -> bool:
    return float8_dtype_name(obj) == "float8_e4m3fn"


def _e4m3_numpy() -> np.dtype:
    try:
        import ml_dtypes
    except ImportError as exc:  # pragma: no cover - ml_dtypes is a core dependency
        raise ImportError("cuflash.fp8 needs ml_dtypes for NumPy float8 arrays (pip install ml_dtypes)") from exc
    return np.dtype(ml_dtypes.float8_e4m3fn)


class _Lib:
    """The few array operations quantisation needs, for NumPy, torch and JAX arrays
    (torch tensors stay on their device)."""

    def __init__(self, x: Any):
        module = type(x).__module__.split(".")[0]
        if isinstance(x, np.ndarray) or module == "numpy":
            self.name, self.xp = "numpy", np
            self.work = np.float64  # exact: x / descale is rounded once, to e4m3
            self.e4m3 = _e4m3_numpy()
        elif module == "torch":
            import torch

            self.name, self.xp = "torch", torch
            self.work, self.e4m3 = torch.float32, torch.float8_e4m3fn
        elif module in ("jax", "jaxlib"):
            import jax.numpy as jnp

            self.name, self.xp = "jax", jnp
            self.work, self.e4m3 = jnp.float32, jnp.float8_e4m3fn
        else:
            raise TypeError(f"cuflash.fp8 takes NumPy, torch or JAX arrays; got {type(x).__name__}")

    def cast(self, x: Any, dtype: Any) -> Any:
        return x.to(dtype) if self.name == "torch" else x.astype(dtype)

    def array(self, values: np.ndarray, like: Any) -> Any:
        if self.name == "torch":
            return self.xp.as_tensor(values, device=like.device)
        return self.xp.asarray(values)

    def amax(self, x: Any, axes: tuple[int, ...]) -> Any:
        if self.name == "torch":
            return self.xp.amax(x, dim=axes) if axes else x
        return self.xp.max(x, axis=axes) if axes else x


def _group_axes(layout: str) -> tuple[int, int, int]:
    """(batch, seqlen, heads) axes of a 4-D q, k or v."""
    if layout == "bshd":
        return 0, 1, 2
    if layout == "bhsd":
        return 0, 2, 1
    raise ValueError(f"layout={layout!r} must be one of ('bshd', 'bhsd')")


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_floating(lib: _Lib, x: Any) -> None:
    """Quantisation scales real values: an integer array has no e4m3 meaning worth a
    silent cast, and a complex one would lose its imaginary part."""
    if lib.name == "torch":
        floating = x.is_floating_point()
    elif lib.name == "jax":
        floating = lib.xp.issubdtype(x.dtype, lib.xp.floating)
    else:
        floating = x.dtype.kind == "f" or x.dtype.name == "bfloat16" or x.dtype.name.startswith("float8")
    if not floating:
        raise ValueError(f"x.dtype={x.dtype} must be a floating dtype (float16, bfloat16, float32 or float64)")


def _check_block_size(block_size: Any) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive int (rows of one scale block)")
    return int(block_size)


def _blocked(lib: _Lib, a: Any, layout: str, block_size: int) -> Any:
    """a (4-D, the caller's layout) as (batch, heads, blocks, block_size, d), padded with
    zeros to whole blocks (zeros change no block's amax)."""
    b_ax, s_ax, h_ax = _group_axes(layout)
    xp = lib.xp
    a = xp.permute(a, (b_ax, h_ax, s_ax, 3)) if lib.name == "torch" else xp.transpose(a, (b_ax, h_ax, s_ax, 3))
    batch, heads, seqlen, dim = a.shape
    blocks = -(-seqlen // block_size)
    pad = blocks * block_size - seqlen
    if pad:
        zeros = xp.zeros((batch, heads, pad, dim), dtype=a.dtype, **({"device": a.device} if lib.name == "torch" else {}))
        a = xp.concatenate((a, zeros), axis=2) if lib.name != "torch" else xp.cat((a, zeros), dim=2)
    return xp.reshape(a, (batch, heads, blocks, block_size, dim))


def descale_shape(granularity: str, shape: tuple[int, ...], layout: str = "bshd", block_size: int = BLOCK_ROWS) -> tuple[int, ...]:
    """The descale shape `quantize` gives a 4-D array of `shape` (see the module doc)."""
    if granularity == "tensor":
        return ()
    b_ax, s_ax, h_ax = _group_axes(layout)
    if granularity == "head":
        return (shape[b_ax], shape[h_ax])
    if granularity == "block":
        return (shape[b_ax], shape[h_ax], -(-shape[s_ax] // _check_block_size(block_size)))
    raise ValueError(f"granularity={granularity!r} must be one of {GRANULARITIES}")


def quantize(x: Any, granularity: str = "block", *, block_size: int = BLOCK_ROWS, layout: str = "bshd") -> tuple[Any, Any]:
    """Quantise x (a 4-D q, k or v in `layout`; any shape for granularity="tensor") to
    float8_e4m3fn. Returns (x8, descale) in x's library, descale float32 of the shape in
    the module doc, so that x ≈ x8 * descale (broadcast over each group).

    Error: each finite element of x8 * descale is within 2**-4 * |x| of x where
    |x| / descale >= 2**-6 (normal range), and within 2**-10 * descale below it."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} must be one of {GRANULARITIES}")
    lib = _Lib(x)
    xp = lib.xp
    _check_floating(lib, x)
    if granularity != "tensor" and len(x.shape) != 4:
        raise ValueError(
            f"x shape {tuple(x.shape)}: granularity={granularity!r} needs a 4-D array "
            f"({'(batch, seqlen, heads, head_dim)' if layout == 'bshd' else '(batch, heads, seqlen, head_dim)'})"
        )
    if granularity == "block":
        block_size = _check_block_size(block_size)
    xw = lib.cast(x, lib.work)
    finite = xp.isfinite(xw)
    magnitude = xp.where(finite, xp.abs(xw), xp.zeros_like(xw))
    if granularity == "tensor":
        amax = lib.amax(magnitude, tuple(range(len(x.shape))))
    elif granularity == "head":
        b_ax, _, h_ax = _group_axes(layout)
        amax = lib.amax(magnitude, tuple(a for a in range(4) if a not in (b_ax, h_ax)))  # (batch, heads)
    else:
        amax = lib.amax(_blocked(lib, magnitude, layout, block_size), (3, 4))
    # float32 descale, as the kernel reads it; the division below uses that exact value.
    descale = lib.cast(amax / E4M3_MAX, np.float32 if lib.name == "numpy" else lib.xp.float32)
    one = xp.ones_like(descale)
    descale = xp.where(descale > 0, descale, one)
    scaled = xw / lib.cast(_expand(lib, descale, granularity, x.shape, layout, block_size), lib.work)
    clipped = xp.clip(scaled, -E4M3_MAX, E4M3_MAX)
    nan = xp.full_like(clipped, float("nan"))
    x8 = lib.cast(xp.where(finite, clipped, nan), lib.e4m3)
    return x8, descale


def _expand(lib: _Lib, descale: Any, granularity: str, shape: tuple[int, ...], layout: str, block_size: int) -> Any:
    """descale broadcast against a 4-D array of `shape` in `layout` (any shape for a
    per-tensor descale)."""
    if granularity == "tensor":
        return descale
    xp = lib.xp
    s_ax = _group_axes(layout)[1]
    if granularity == "block":
        rows = xp.repeat(descale, block_size, axis=2) if lib.name != "torch" else descale.repeat_interleave(block_size, dim=2)
        per_row = rows[:, :, : shape[s_ax]]  # (batch, heads, seqlen)
    else:
        per_row = descale[:, :, None]  # (batch, heads, 1)
    if layout == "bshd":
        per_row = xp.swapaxes(per_row, 1, 2) if lib.name != "torch" else per_row.transpose(1, 2)
    return per_row[..., None]


def granularity_of(descale_shape_: tuple[int, ...]) -> str:
    """Which granularity a descale of this shape stands for: () or (1,) "tensor",
    2-D "head", 3-D "block"."""
    shape = tuple(descale_shape_)
    if shape in ((), (1,)):
        return "tensor"
    return {2: "head", 3: "block"}.get(len(shape), "unknown")


def dequantize(x8: Any, descale: Any, *, layout: str = "bshd", block_size: int = BLOCK_ROWS, dtype: Any = None) -> Any:
    """x8 * descale in x8's library, float32 unless `dtype` is given (NumPy float64 is
    exact: an e4m3 value times a float32 has at most 4 + 24 significant bits).

    descale's shape is checked against x8 as cuflash.forward checks it, with `block_size`
    rows per block: a per-block descale must have ceil(seqlen / block_size) blocks, which
    catches most block sizes other than the one `quantize` used (not one that happens to
    give the same number of blocks)."""
    lib = _Lib(x8)
    _group_axes(layout)
    given = descale
    if not hasattr(descale, "shape"):
        try:
            descale = np.asarray(given)
        except ValueError:  # ragged nesting
            descale = np.asarray(None)
    if isinstance(descale, np.ndarray) and descale.dtype.kind not in "iuf":
        raise ValueError(f"descale={given!r} must be a number or an array of numbers (float32, as quantize gives it)")
    if not hasattr(given, "shape"):
        descale = lib.array(descale.astype(np.float32), x8)
    shape = tuple(descale.shape)
    granularity = granularity_of(shape)
    if granularity == "unknown" and len(x8.shape) != 4:
        raise ValueError(f"descale shape {shape} must be (), (1,), (batch, heads) or (batch, heads, blocks)")
    if granularity == "block":
        block_size = _check_block_size(block_size)
    if granularity != "tensor":
        rows = block_size if _is_int(block_size) and block_size >= 1 else BLOCK_ROWS
        _check_descale_fits(shape, tuple(x8.shape), layout, int(rows))
    target = dtype if dtype is not None else (np.float32 if lib.name == "numpy" else lib.xp.float32)
    if shape == (1,):
        descale = descale[0]
    d = _expand(lib, lib.cast(descale, target), granularity, tuple(x8.shape), layout, block_size)
    return lib.cast(x8, target) * d


def _check_descale_fits(shape: tuple[int, ...], x_shape: tuple[int, ...], layout: str, block_rows: int) -> None:
    """A per-head or per-block descale against its 4-D input, by descale_errors' rule;
    a per-block one whose block count is off most likely comes from another block_size."""
    if len(x_shape) != 4:
        dims = "(batch, seqlen, heads, head_dim)" if layout == "bshd" else "(batch, heads, seqlen, head_dim)"
        raise ValueError(f"descale shape {shape} (per head or per block) needs a 4-D x8 {dims}; got shape {x_shape}")
    b_ax, s_ax, h_ax = _group_axes(layout)
    batch, heads, seqlen = x_shape[b_ax], x_shape[h_ax], x_shape[s_ax]
    blocks = -(-seqlen // block_rows)
    if len(shape) == 3 and shape[:2] == (batch, heads) and shape[2] != blocks:
        raise ValueError(f"descale shape {shape} has {shape[2]} blocks, but block_size={block_rows} over "
                         f"seqlen={seqlen} makes {blocks}: pass the block_size quantize used")
    errors = descale_errors("descale", shape, None, batch=batch, heads=heads, heads_kv=heads, seqlen=seqlen,
                            varlen=False, block_rows=block_rows)
    if errors:
        raise ValueError("; ".join(errors) + f" (x8 shape {x_shape}, layout={layout!r})")


# ---- the semantics of FP8 attention calls ------------------------------------------------


def kernel_unavailable_reason(device_kind: str) -> str | None:
    """Where an FP8 call can run: None for host arrays ("cpu", the float64 reference on
    the dequantised inputs), otherwise why it cannot. cuflash has no FP8 kernel yet (the
    Hopper FP8 forward is planned), so a CUDA call is refused before anything is imported
    or launched."""
    if device_kind == "cpu":
        return None
    return (
        f"float8_e4m3fn inputs on a {device_kind} device: no FP8 attention kernel is built for this GPU "
        "(cuflash's Hopper FP8 forward does not exist yet); dequantise (cuflash.fp8.dequantize) and call "
        "with bfloat16/float16 inputs, or pass host arrays for the float64 reference"
    )


def forward_only_reason(name: str, dtype_name: str, where: str) -> str:
    """The reason an entry point other than cuflash.forward/attention gives for FP8 input."""
    return (
        f"{name}.dtype={dtype_name}: {where} does not take FP8 inputs. FP8 attention is forward-only "
        "(there is no backward through FP8 inputs, as in FlashAttention-3 and cuDNN): call "
        "cuflash.forward or cuflash.attention with q_descale, k_descale, v_descale"
    )


def gradient_reason(name: str, obj: Any, where: str) -> str | None:
    """Why an FP8 input asks for a gradient, or None: a torch tensor that requires grad
    (with grad mode on), or a traced JAX value (under jax.grad, jax.jit, ...)."""
    module = type(obj).__module__.split(".")[0]
    if module == "torch":
        import torch

        if getattr(obj, "requires_grad", False) and torch.is_grad_enabled():
            return (f"{name} is an FP8 tensor that requires grad: {where} has no backward through FP8 inputs "
                    f"(nor do FlashAttention-3 and cuDNN); pass {name}.detach() or call under torch.no_grad()")
    elif module in ("jax", "jaxlib"):
        import jax

        if isinstance(obj, jax.core.Tracer):
            return (f"{name} is a traced FP8 JAX value ({type(obj).__name__}): {where} computes FP8 attention on "
                    "concrete arrays and has no backward through FP8 inputs (nor do FlashAttention-3 and cuDNN); "
                    "call it outside jax.grad/jax.jit")
    return None


def descale_errors(name: str, shape: tuple[int, ...] | None, dtype_name: str | None, *, batch: int, heads: int,
                   heads_kv: int, seqlen: int, varlen: bool, block_rows: int = BLOCK_ROWS) -> list[str]:
    """Reasons a descale of this shape and dtype does not fit its input: () or (1,); for
    fixed-length batches also (batch, heads) and (batch, heads, ceil(seqlen/block_rows)),
    where heads is the input's own head count (q may also give one per kv head: GQA groups
    share it). float32, as the kernel reads it (dtype_name None: not checked)."""
    if shape is None:
        return []
    errors = []
    if dtype_name is not None and dtype_name != "float32":
        errors.append(f"{name}.dtype={dtype_name} must be float32")
    per_tensor = ((), (1,))
    if varlen:
        if tuple(shape) not in per_tensor:
            errors.append(f"{name} shape {tuple(shape)}: variable-length batches take a per-tensor descale only, "
                          "shape () or (1,)")
        return errors
    blocks = -(-seqlen // block_rows)
    allowed = per_tensor + ((batch, heads), (batch, heads, blocks))
    if name == "q_descale" and heads_kv != heads:
        allowed += ((batch, heads_kv),)
    if tuple(shape) not in allowed:
        spelled = ", ".join(str(a) for a in allowed)
        errors.append(
            f"{name} shape {tuple(shape)} must be one of {spelled}: per tensor, per (batch, head) or per "
            f"{block_rows} rows (batch, heads, ceil(seqlen/{block_rows}))"
        )
    return errors


def apply_descale(x64: np.ndarray, descale: Any, layout: str) -> np.ndarray:
    """x64 (float64, 4-D in `layout` or 3-D varlen) times its descale, exactly in float64.
    The descale's shape has been checked (`descale_errors`); a per-kv-head q descale is
    repeated over each GQA group."""
    if descale is None:
        return x64
    d = np.asarray(descale).astype(np.float64)
    if d.shape in ((), (1,)):
        return x64 * d.reshape(())
    _, _, h_ax = _group_axes(layout)
    if d.shape[1] != x64.shape[h_ax]:
        d = np.repeat(d, x64.shape[h_ax] // d.shape[1], axis=1)
    lib = _Lib(x64)
    return x64 * _expand(lib, d, granularity_of(d.shape), x64.shape, layout, BLOCK_ROWS)


# ---- incoherent processing ------------------------------------------------------------


def hadamard_signs(seed: int, head_dim: int) -> np.ndarray:
    """The random ±1 diagonal D of seed `seed` for head_dim (float64): a function of
    (seed, head_dim) alone, so q and k transformed with one seed get one matrix."""
    _check_power_of_two(head_dim)
    if not _is_int(seed) or not 0 <= seed < 2**64:
        raise ValueError(f"seed={seed!r} must be an int in [0, 2**64)")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), head_dim]))
    return rng.integers(0, 2, head_dim).astype(np.float64) * 2.0 - 1.0


def _check_power_of_two(head_dim: int) -> None:
    if not _is_int(head_dim):
        raise ValueError(f"head_dim={head_dim!r} must be an int (a power of two)")
    if head_dim < 1 or head_dim & (head_dim - 1):
        raise ValueError(
            f"head_dim={head_dim} must be a power of two for the Hadamard transform "
            "(a Sylvester Hadamard matrix exists only for powers of two); pad head_dim with zeros "
            "to the next power of two first (zeros in both q and k leave q kᵀ unchanged)"
        )


def hadamard_transform(x: Any, seed: int) -> Any:
    """x M along the last axis (head_dim, a power of two), M = D H / sqrt(d): D the
    seeded random ±1 diagonal (`hadamard_signs`), H the d x d Sylvester Hadamard matrix
    (entries ±1, H Hᵀ = d I). M is orthogonal, so applying it to q and k with one seed
    leaves q kᵀ unchanged (README "FP8"). A fast Walsh-Hadamard transform: O(d log d) per
    row, in x's library and floating dtype (float8 inputs: float32)."""
    lib = _Lib(x)
    xp = lib.xp
    if len(x.shape) < 1:
        raise ValueError("x is 0-d: the Hadamard transform acts along the last axis (head_dim)")
    d = int(x.shape[-1])
    _check_power_of_two(d)
    if is_e4m3(x) or float8_dtype_name(x) is not None:
        x = lib.cast(x, np.float32 if lib.name == "numpy" else xp.float32)
    signs = lib.cast(lib.array(hadamard_signs(seed, d), x), x.dtype)
    y = x * signs
    lead = tuple(y.shape[:-1])
    h = 1
    while h < d:
        # Butterflies on pairs (i, i + h) inside blocks of 2h: (a, b) -> (a + b, a - b).
        pairs = xp.reshape(y, lead + (d // (2 * h), 2, h))
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = xp.reshape(xp.stack((a + b, a - b), **({"dim": -2} if lib.name == "torch" else {"axis": -2})), lead + (d,))
        h *= 2
    return y * (1.0 / math.sqrt(d))


# ---- emulation of the FP8 kernel's arithmetic ------------------------------------------


def _round_e4m3(x: np.ndarray) -> np.ndarray:
    """Round float32 values to e4m3 and back (inputs already within ±448)."""
    return x.astype(_e4m3_numpy()).astype(np.float32)


# How the emulation rounds P before the P V product (`emulate_forward`'s p_mode):
#   "e4m3"         e4m3(256 P): the kernel's choice, a fixed power-of-two scale
#   "e4m3_rowmax"  e4m3(P * 448 / r), r the row's largest P in the key tile, and the
#                  product times r / 448: one more multiply per row and tile, and P values
#                  far below the running max (a tile whose scores are all small) stay in
#                  e4m3's normal range instead of flushing to zero
#   "bf16", "fp16" P in a 16-bit type (an FP8 kernel cannot feed that to an e4m3 MMA: a
#                  bound on how much of the error is P's, and the "standard attention"
#                  baseline whose softmax output is fp16)
#   "fp32"         P unrounded
P_MODES = ("e4m3", "e4m3_rowmax", "bf16", "fp16", "fp32")


def emulate_forward(q8, k8, v8, q_descale, k_descale, v_descale, *, softmax_scale: float | None = None,
                    causal: bool = False, layout: str = "bshd", block_size: int = BLOCK_ROWS,
                    block_n: int = BLOCK_ROWS, p_mode: str = "e4m3", v_block_size: int | None = None,
                    v_channel_descale: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The FP8 forward kernel's arithmetic in NumPy: returns (out, lse) as float64 arrays
    holding what the kernel's float32 accumulators would hold (out before its final
    rounding to bf16/fp16).

    q8, k8, v8: NumPy float8_e4m3fn in `layout` (k, v may have fewer heads: GQA), with
    descales as `quantize` gives them (per-block ones with `block_size` rows). For each
    tile of `block_n` keys, as the kernel does it:
      S = (q8 k8ᵀ) * (softmax_scale * q_descale * k_descale)   e4m3 products, fp32 sums
      m = max(m, rowmax S);  alpha = exp(m_old - m)
      P = exp(S - m) in [0, 1], fp32;  l = alpha l + rowsum(P_SCALE * P)  (fp32, unrounded P)
      O = alpha O + v_descale * (e4m3(P_SCALE * P) v8)                     (fp32)
    and out = O / l, lse = m + log(l / P_SCALE). A per-key-block v_descale costs the kernel
    nothing: it folds into the alpha rescale it does anyway. causal is bottom-right aligned
    (FlashAttention's); rows with no allowed key give out 0 and lse -inf.

    Options for accuracy studies of other kernel designs:
      p_mode             how P is rounded for the P V product (P_MODES above); l always
                         sums the unrounded P.
      v_block_size       rows per block of a per-block v_descale when it differs from
                         block_size (q's and k's). A block finer than block_n costs the
                         kernel a scaling of P's columns before the product; the
                         emulation scales P exactly, in fp32.
      v_channel_descale  (batch, heads_kv, head_dim) float32: one more factor per column
                         of v, applied to out's columns (the kernel's epilogue: free).
    Per-row q and k scales are block_size=1 (`quantize(x, "block", block_size=1)`): a
    query row's scale folds into the softmax scale the kernel applies per row, a key
    row's costs one multiply per score."""
    if p_mode not in P_MODES:
        raise ValueError(f"p_mode={p_mode!r} must be one of {P_MODES}")
    v_block_size = block_size if v_block_size is None else _check_block_size(v_block_size)
    e4m3 = _e4m3_numpy()
    for name, a in (("q8", q8), ("k8", k8), ("v8", v8)):
        if not isinstance(a, np.ndarray) or a.dtype != e4m3 or a.ndim != 4:
            raise ValueError(f"{name} must be a 4-D NumPy float8_e4m3fn array; got {type(a).__name__} "
                             f"{getattr(a, 'dtype', None)} shape {getattr(a, 'shape', None)}")
    q = dequantize(q8, np.asarray(q_descale, np.float32), layout=layout, block_size=block_size, dtype=np.float32)
    k = dequantize(k8, np.asarray(k_descale, np.float32), layout=layout, block_size=block_size, dtype=np.float32)
    # Scales multiply the fp32 products, not the e4m3 operands; for the sums that is the
    # same up to fp32 rounding, so S is formed from dequantised fp32 operands here, and V's
    # descale is applied per key tile to the product.
    v_raw = v8.astype(np.float32)
    v_desc = np.asarray(v_descale, np.float32)
    if layout == "bshd":
        q, k, v_raw = (a.transpose(0, 2, 1, 3) for a in (q, k, v_raw))
    batch, heads, seqlen_q, dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    group = heads // heads_kv
    k = np.repeat(k, group, axis=1)
    v_raw = np.repeat(v_raw, group, axis=1)
    v_rows = _value_descale_rows(v_desc, batch, heads_kv, seqlen_k, v_block_size)
    v_rows = np.repeat(v_rows, group, axis=1)  # (batch, heads, seqlen_k)
    scale = np.float32(softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(dim))
    m = np.full((batch, heads, seqlen_q), -np.inf, np.float32)
    l = np.zeros((batch, heads, seqlen_q), np.float32)
    o = np.zeros((batch, heads, seqlen_q, dim), np.float32)
    rows = np.arange(seqlen_q)[:, None] + (seqlen_k - seqlen_q)
    for start in range(0, seqlen_k, block_n):
        cols = slice(start, min(start + block_n, seqlen_k))
        s = np.matmul(q, np.swapaxes(k[:, :, cols], -1, -2)) * scale
        if causal:
            s = np.where(np.arange(cols.start, cols.stop)[None, :] <= rows, s, np.float32(-np.inf))
        m_new = np.maximum(m, s.max(axis=-1))
        # A row with no allowed key so far keeps m = -inf; use 0 there so exp stays 0, not NaN.
        m_safe = np.where(np.isfinite(m_new), m_new, np.float32(0))
        alpha = np.exp(m - m_safe)
        p = np.exp(s - m_safe[..., None])
        l = alpha * l + (P_SCALE * p).sum(axis=-1, dtype=np.float32)
        p8, unscale = _round_p(p, p_mode)
        # Exact per-key scaling of V here equals the kernel's per-tile one when the key
        # tile nests in the descale block (block_n divides v_block_size).
        pv = np.matmul(p8 * v_rows[:, :, None, cols], v_raw[:, :, cols])
        if unscale is not None:
            pv = pv * unscale[..., None]
        o = alpha[..., None] * o + pv
        m = m_new
    if v_channel_descale is not None:
        channel = np.asarray(v_channel_descale, np.float32)
        if channel.shape != (batch, heads_kv, dim):
            raise ValueError(f"v_channel_descale shape {channel.shape} must be (batch, heads_kv, head_dim) = "
                             f"{(batch, heads_kv, dim)}")
        o = o * np.repeat(channel, group, axis=1)[:, :, None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(l[..., None] > 0, o / l[..., None], 0.0).astype(np.float64)
        lse = np.where(l > 0, m.astype(np.float64) + np.log(l.astype(np.float64) / P_SCALE), -np.inf)
    if layout == "bshd":
        out = out.transpose(0, 2, 1, 3)
    return out, lse


def _round_p(p: np.ndarray, p_mode: str) -> tuple[np.ndarray, np.ndarray | None]:
    """P (fp32, in [0, 1]) as the P V product sees it, in units of P_SCALE * P, and the
    per-row factor the product is multiplied by afterwards (None: 1)."""
    scaled = np.float32(P_SCALE) * p  # exact: a power of two
    if p_mode == "e4m3":
        return _round_e4m3(scaled), None
    if p_mode == "e4m3_rowmax":
        # The row's largest P in this tile maps to 448 (all of e4m3's range); a row with
        # none (masked, or underflowed to 0) keeps 256.
        rowmax = p.max(axis=-1)
        up = np.where(rowmax > 0, np.float32(E4M3_MAX) / np.where(rowmax > 0, rowmax, 1), np.float32(P_SCALE))
        up = up.astype(np.float32)
        p8 = _round_e4m3(np.minimum(p * up[..., None], np.float32(E4M3_MAX)))
        return p8, (np.float32(P_SCALE) / up).astype(np.float32)
    if p_mode == "bf16":
        import ml_dtypes

        return scaled.astype(ml_dtypes.bfloat16).astype(np.float32), None
    if p_mode == "fp16":
        return scaled.astype(np.float16).astype(np.float32), None
    return scaled, None


def _value_descale_rows(v_desc: np.ndarray, batch: int, heads_kv: int, seqlen_k: int, block_size: int) -> np.ndarray:
    """V's descale per key row, (batch, heads_kv, seqlen_k)."""
    granularity = granularity_of(v_desc.shape)
    if granularity == "tensor":
        return np.full((batch, heads_kv, seqlen_k), v_desc.reshape(()), np.float32)
    if granularity == "head":
        return np.broadcast_to(v_desc[:, :, None], (batch, heads_kv, seqlen_k))
    if granularity == "block":
        return np.repeat(v_desc, block_size, axis=2)[:, :, :seqlen_k]
    raise ValueError(f"v_descale shape {v_desc.shape} must be (), (1,), (batch, heads_kv) or (batch, heads_kv, blocks)")
