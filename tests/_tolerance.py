"""The FlashAttention tolerance method.

A kernel result X passes when

    max|X - X_ref64| <= factor * max|X_naive - X_ref64| + floor

where X_ref64 is cuflash.reference (float64) on the same (rounded) inputs and X_naive is
plain attention computed the way a framework would in the same dtype: matrix products
accumulate in fp32 and every materialised intermediate (scores, probabilities, output,
dP, dS, gradients) is rounded to the dtype. factor is 2 for out and lse, 3 for dq, dk, dv;
the floor is a few units in the last place at the result's scale (FLOOR_ULPS).

Gradients take one more baseline: the error that the stored output alone forces on an
exact backward (X_forced: the float64 backward given the kernel's own, rounded, out).
The backward uses out through D = rowsum(dO * out), and dS = P (dP - D) can cancel to far
below D; the rounding of out then dominates. The naive baseline rounds its own out, whose
errors fall elsewhere and may cancel by chance. So for gradients the naive error is
max(naive error, forced error).

The naive attention here is written independently of the reference (dense problems,
heads-first (B, H, N, D) arrays); varlen problems are checked sequence by sequence.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cuflash import reference

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None

EPS = {np.dtype(np.float16): 2.0**-10, np.dtype(np.float32): 2.0**-23}
if BF16 is not None:
    EPS[BF16] = 2.0**-7
# The floor in ulps of the result's largest magnitude. fp32 runs on tensor cores as three
# bf16 terms whose fp32 sums the hardware truncates; against NumPy's IEEE fp32 baseline
# (pairwise summation, near-exact at small head dims) that costs a few more ulps.
FLOOR_ULPS = {np.dtype(np.float16): 4, np.dtype(np.float32): 16}
if BF16 is not None:
    FLOOR_ULPS[BF16] = 4
# The smallest scale the floor is taken at. A gradient can be exactly 0 (a row with one
# allowed key: dS = P (dP - D) cancels) while its rounding error is set by the unit-scale
# inputs that formed dP and D: the fp32 kernel forms dP on the tensor cores and D with
# FFMA, so the cancellation leaves ~1e-7, where NumPy's identical products cancel to 0.
MIN_SCALE = {np.dtype(np.float16): 1e-3, np.dtype(np.float32): 1.0}
if BF16 is not None:
    MIN_SCALE[BF16] = 1e-3


def rounder(dtype: np.dtype):
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return lambda x: np.asarray(x, dtype=np.float32)
    return lambda x: np.asarray(x, dtype=np.float32).astype(dtype).astype(np.float32)


def _diagonal(nq: int, nk: int, opts: dict) -> int:
    """The key aligned with query 0: the alignment's offset, shifted by position_offsets."""
    off = nk - nq if opts.get("causal_alignment", "bottom_right") == "bottom_right" else 0
    q_start, k_start = opts.get("position_offsets", (0, 0))
    return off + q_start - k_start


def _allowed(nq: int, nk: int, opts: dict) -> np.ndarray:
    off = _diagonal(nq, nk, opts)
    i = np.arange(nq)[:, None] + off
    j = np.arange(nk)[None, :]
    ok = np.ones((nq, nk), dtype=bool)
    if opts.get("causal"):
        ok &= j <= i
    left, right = opts.get("window_size", (-1, -1))
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


def naive_attention(q, k, v, dout, dtype, opts: dict, keep=None):
    """Same-dtype attention (heads-first float arrays), forward and backward.

    Returns dict(out, lse, dq, dk, dv, ds). `keep` is the dropout keep mask (B,H,Nq,Nk)."""
    r = rounder(dtype)
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = h // hkv
    kr = np.repeat(k, group, axis=1).astype(np.float32)
    vr = np.repeat(v, group, axis=1).astype(np.float32)
    q32 = q.astype(np.float32)
    scale = opts.get("softmax_scale")
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    s = r(q32 @ np.swapaxes(kr, -1, -2))
    x = r(s * np.float32(scale))
    softcap = opts.get("softcap", 0.0)
    if softcap:
        t = np.tanh(x / np.float32(softcap))
        x = r(np.float32(softcap) * t)
    else:
        t = None
    off = _diagonal(nq, nk, opts)
    slopes = opts.get("alibi_slopes")
    if slopes is not None:
        slopes = np.broadcast_to(np.asarray(slopes, np.float32), (b, h))
        dist = np.abs(np.arange(nq)[:, None] + off - np.arange(nk)[None, :]).astype(np.float32)
        x = r(x - slopes[:, :, None, None] * dist)
    bias = opts.get("bias")
    if bias is not None:
        x = r(x + np.asarray(bias, np.float32))
    allowed = np.broadcast_to(_allowed(nq, nk, opts), x.shape)
    mask = opts.get("mask")
    if mask is not None:
        allowed = allowed & np.asarray(mask, bool)
    x = np.where(allowed, x, -np.inf)
    mx = x.max(axis=-1, keepdims=True, initial=-np.inf)
    mx = np.where(np.isfinite(mx), mx, 0)
    e = np.exp(x - mx)
    denom = e.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(denom > 0, e / denom, 0.0)
        lse = np.where(denom[..., 0] > 0, np.log(denom[..., 0]) + mx[..., 0], -np.inf)
    p = r(p)
    dropout_p = opts.get("dropout_p", 0.0)
    p_drop = r(p * keep / (1 - dropout_p)) if keep is not None else p
    out = r(p_drop @ vr)
    res = {"out": out, "lse": lse.astype(np.float32)}
    if dout is None:
        return res
    do = r(dout)
    dv = r(np.swapaxes(p_drop, -1, -2) @ do)
    dp = r(do @ np.swapaxes(vr, -1, -2))
    if keep is not None:
        dp = r(dp * keep / (1 - dropout_p))
    drow = (do * out).sum(axis=-1, keepdims=True)
    ds = r(p * (dp - drow))
    dx = r(ds * (1 - t * t)) if t is not None else ds
    dq = r(dx @ kr * np.float32(scale))
    dk_full = r(np.swapaxes(dx, -1, -2) @ q32 * np.float32(scale))
    dv_full = dv
    res["dq"] = dq
    res["dk"] = dk_full.reshape(b, hkv, group, nk, d).sum(axis=2)
    res["dv"] = dv_full.reshape(b, hkv, group, nk, d).sum(axis=2)
    res["ds"] = ds
    return res


@dataclasses.dataclass
class Comparison:
    name: str
    err: float
    mean_err: float
    where: tuple
    naive_err: float
    bound: float
    baseline: str = "naive same-dtype"  # which error set naive_err

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.err) and self.err <= self.bound)

    def __str__(self) -> str:
        return (
            f"{self.name}: max|kernel-ref64|={self.err:.3e} at {self.where} (mean {self.mean_err:.3e}); "
            f"{self.baseline} max err {self.naive_err:.3e}; bound {self.bound:.3e}"
        )


def compare(name: str, got, ref, naive, dtype, factor: float, forced=None) -> Comparison:
    """`forced`: the float64 result given the kernel's stored output (gradients only)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    naive = np.asarray(naive, dtype=np.float64)
    if got.shape != ref.shape:
        raise AssertionError(f"{name}: shape {got.shape} != reference {ref.shape}")
    if got.size == 0:
        return Comparison(name, 0.0, 0.0, (), 0.0, 0.0)
    both_inf = np.isinf(ref) & (got == ref)
    with np.errstate(invalid="ignore"):  # inf - inf where both are -inf: zeroed by the where
        diff = np.where(both_inf, 0.0, np.abs(got - ref))
        ndiff = np.where(np.isinf(ref) & (naive == ref), 0.0, np.abs(naive - ref))
    diff = np.where(np.isnan(diff), np.inf, diff)
    ndiff = np.where(np.isnan(ndiff), 0.0, ndiff)
    at = np.unravel_index(int(np.argmax(diff)), diff.shape)
    finite_ref = np.abs(ref[np.isfinite(ref)])
    scale = float(finite_ref.max()) if finite_ref.size else 1.0
    floor = FLOOR_ULPS[np.dtype(dtype)] * EPS[np.dtype(dtype)] * max(scale, MIN_SCALE[np.dtype(dtype)])
    naive_err = float(ndiff.max())
    baseline = "naive same-dtype"
    if forced is not None:
        forced = np.asarray(forced, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            fdiff = np.where(np.isinf(ref) & (forced == ref), 0.0, np.abs(forced - ref))
        forced_err = float(np.nan_to_num(fdiff, nan=0.0).max())
        if forced_err > naive_err:
            naive_err, baseline = forced_err, "float64 given the stored output"
    return Comparison(name, float(diff.max()), float(diff[np.isfinite(diff)].mean()) if np.isfinite(diff).any() else np.inf,
                      tuple(int(i) for i in at), naive_err, factor * naive_err + floor, baseline)


def check_all(comparisons: list[Comparison]) -> None:
    bad = [c for c in comparisons if not c.ok]
    if bad:
        raise AssertionError("outside the tolerance method:\n" + "\n".join(str(c) for c in comparisons))


def reference_dropout_keep(opts: dict, b: int, h: int, nq: int, nk: int, batch_offset: int = 0):
    if opts.get("dropout_p", 0.0) <= 0:
        return None
    return reference.dropout_keep_mask(opts["seed"], opts["dropout_p"], (b, h, nq, nk), batch_offset=batch_offset,
                                       position_offsets=opts.get("position_offsets", (0, 0)))


def assert_close_at_scale(actual, expected, rtol: float, what: str = "") -> None:
    """Two computations of the same quantity in one floating-point dtype that differ only
    in operation order (jit against eager, vmap against a loop, autodiff against the
    analytic formula) agree to `rtol` of the quantity's largest magnitude, entry by entry.

    Rounding error is set by the size of the terms that were summed, not by the size of
    each result: a gradient entry that cancels to an exact 0 one way comes out as 2e-6
    another way when its terms are ~1, which an element-wise rtol with a tiny atol calls a
    failure. Infinities must match exactly; NaN must not appear where the expectation has
    none."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    infinite = np.isinf(expected)
    np.testing.assert_array_equal(actual[infinite], expected[infinite], err_msg=f"{what}: infinities")
    finite = ~infinite
    scale = float(np.max(np.abs(expected[finite]), initial=0.0))
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=0, atol=rtol * scale + 1e-30,
                               err_msg=f"{what}: tolerance {rtol} of the largest magnitude {scale:.3g}")
