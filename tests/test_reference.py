"""Properties of the float64 reference (cuflash.reference), which defines what every kernel
must compute. Each test states one promise; odd shapes are pinned as Hypothesis examples.

The checks compare the reference against independent formulations: finite differences,
hand-written loops, boolean masks standing in for causal/window, bias standing in for
ALiBi, one-sequence runs standing in for varlen, and scalar Philox calls.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cuflash import reference
from cuflash._philox import philox4x32_10

# ---------------------------------------------------------------------------------------
# Problems and option sets


@dataclasses.dataclass
class Case:
    """A dense problem in layout bshd with float64 inputs drawn from a seeded generator."""

    batch: int
    heads: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    seed: int = 0

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        self.q = rng.standard_normal((self.batch, self.seqlen_q, self.heads, self.head_dim))
        self.k = rng.standard_normal((self.batch, self.seqlen_k, self.heads_kv, self.head_dim))
        self.v = rng.standard_normal((self.batch, self.seqlen_k, self.heads_kv, self.head_dim))
        self.dout = rng.standard_normal(self.q.shape)

    @property
    def scores_shape(self):
        return (self.batch, self.heads, self.seqlen_q, self.seqlen_k)

    @property
    def group(self):
        return self.heads // self.heads_kv


@dataclasses.dataclass
class VarlenCase:
    """A packed problem: sequence b has seqlens_q[b] queries and seqlens_k[b] keys.
    max_seqlen_q/k may exceed the longest sequence by pad_q/pad_k."""

    seqlens_q: tuple
    seqlens_k: tuple
    heads: int
    heads_kv: int
    head_dim: int
    pad_q: int = 0
    pad_k: int = 0
    seed: int = 0

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        self.cu_seqlens_q = np.concatenate([[0], np.cumsum(self.seqlens_q)]).astype(np.int32)
        self.cu_seqlens_k = np.concatenate([[0], np.cumsum(self.seqlens_k)]).astype(np.int32)
        total_q, total_k = int(self.cu_seqlens_q[-1]), int(self.cu_seqlens_k[-1])
        self.q = rng.standard_normal((total_q, self.heads, self.head_dim))
        self.k = rng.standard_normal((total_k, self.heads_kv, self.head_dim))
        self.v = rng.standard_normal((total_k, self.heads_kv, self.head_dim))
        self.dout = rng.standard_normal(self.q.shape)

    @property
    def batch(self):
        return len(self.seqlens_q)

    @property
    def seqlen_q(self):
        return max(self.seqlens_q) + self.pad_q

    @property
    def seqlen_k(self):
        return max(self.seqlens_k) + self.pad_k

    @property
    def scores_shape(self):
        return (self.batch, self.heads, self.seqlen_q, self.seqlen_k)

    def varlen_options(self):
        return dict(cu_seqlens_q=self.cu_seqlens_q, cu_seqlens_k=self.cu_seqlens_k,
                    max_seqlen_q=self.seqlen_q, max_seqlen_k=self.seqlen_k)


def bias_shape(case, kind):
    """The bias shapes the tests use, each broadcastable to (B, H, Nq, Nk)."""
    b, h, nq, nk = case.scores_shape
    return {"full": (b, h, nq, nk), "heads": (1, h, nq, nk), "batch_keys": (b, 1, 1, nk),
            "keys": (nk,), "rows": (h, nq, 1)}[kind]


@dataclasses.dataclass(frozen=True)
class Features:
    """Which options a test turns on; options(case) makes the arrays for a given case."""

    causal: bool = False
    causal_alignment: str = "bottom_right"
    window_size: tuple = (-1, -1)
    softcap: float = 0.0
    softmax_scale: float | None = None
    alibi: str | None = None  # None, "heads" (H,) or "batch_heads" (B, H)
    bias: str | None = None  # None or a kind of bias_shape
    mask: bool = False
    dropout_p: float = 0.0

    def options(self, case):
        rng = np.random.default_rng([case.seed, 1])  # same arrays on every call
        opts = dict(causal=self.causal, causal_alignment=self.causal_alignment,
                    window_size=self.window_size, softcap=self.softcap,
                    softmax_scale=self.softmax_scale)
        if self.alibi:
            shape = (case.heads,) if self.alibi == "heads" else (case.batch, case.heads)
            opts["alibi_slopes"] = rng.uniform(0.0, 1.0, shape)
        if self.bias:
            opts["bias"] = rng.standard_normal(bias_shape(case, self.bias))
        if self.mask:
            opts["mask"] = rng.random(case.scores_shape) < 0.8
        if self.dropout_p:
            opts.update(dropout_p=self.dropout_p, seed=int(rng.integers(2**64, dtype=np.uint64)),
                        dropout_offset=int(rng.integers(0, 2**32)))
        return opts


@st.composite
def cases(draw, max_batch=2, max_seqlen=9, max_head_dim=8, gqa=False):
    heads_kv = draw(st.sampled_from((1, 2) if gqa else (1, 2, 4)))
    heads = draw(st.sampled_from(
        [h for h in (1, 2, 4) if h % heads_kv == 0 and (h > heads_kv or not gqa)]))
    return Case(
        batch=draw(st.integers(1, max_batch)), heads=heads, heads_kv=heads_kv,
        seqlen_q=draw(st.integers(0, max_seqlen)), seqlen_k=draw(st.integers(0, max_seqlen)),
        head_dim=draw(st.integers(1, max_head_dim)), seed=draw(st.integers(0, 2**32 - 1)),
    )


@st.composite
def varlen_cases(draw):
    batch = draw(st.integers(1, 3))
    heads_kv = draw(st.sampled_from((1, 2)))
    return VarlenCase(
        seqlens_q=tuple(draw(st.lists(st.integers(0, 6), min_size=batch, max_size=batch))),
        seqlens_k=tuple(draw(st.lists(st.integers(0, 6), min_size=batch, max_size=batch))),
        heads=heads_kv * draw(st.sampled_from((1, 2))), heads_kv=heads_kv,
        head_dim=draw(st.integers(1, 4)), pad_q=draw(st.integers(0, 2)),
        pad_k=draw(st.integers(0, 2)), seed=draw(st.integers(0, 2**32 - 1)),
    )


def features(**fixed):
    """Option sets; keyword arguments pin a field to one value."""
    strategies = dict(
        causal=st.booleans(),
        causal_alignment=st.sampled_from(("bottom_right", "top_left")),
        window_size=st.tuples(st.integers(-1, 4), st.integers(-1, 4)),
        softcap=st.sampled_from((0.0, 0.0, 0.7, 3.0)),
        softmax_scale=st.sampled_from((None, 0.3, 1.7)),
        alibi=st.sampled_from((None, None, "heads", "batch_heads")),
        bias=st.sampled_from((None, "full", "heads", "batch_keys", "keys", "rows")),
        mask=st.booleans(),
        dropout_p=st.sampled_from((0.0, 0.0, 0.3)),
    )
    strategies.update({name: st.just(value) for name, value in fixed.items()})
    return st.builds(Features, **strategies)


PLAIN = Features()
fast = settings(deadline=None, max_examples=100)


# ---------------------------------------------------------------------------------------
# Independent formulations


def with_arrays(case, **changes):
    """A shallow copy of case with some of its arrays (or sizes) replaced."""
    changed = copy.copy(case)
    for name, value in changes.items():
        setattr(changed, name, value)
    return changed


def run(case, **options):
    """out, lse and the gradients (with case.dout) of the reference."""
    out, lse = reference.forward(case.q, case.k, case.v, **options)
    grads = reference.backward(case.dout, case.q, case.k, case.v, out, lse, **options)
    return out, lse, grads


def scores_by_hand(case, scale=None, softcap=0.0):
    """softmax_scale * q.k (softcapped), (B, H, Nq, Nk), by explicit loops over heads."""
    scale = 1.0 / math.sqrt(case.head_dim) if scale is None else scale
    s = np.zeros(case.scores_shape)
    for h in range(case.heads):
        s[:, h] = scale * np.einsum("bid,bjd->bij", case.q[:, :, h], case.k[:, :, h // case.group])
    return softcap * np.tanh(s / softcap) if softcap > 0 else s


def attention_by_hand(s, case):
    """(out (B, Nq, H, D), lse (B, H, Nq)) from scores with -inf for masked keys, row by row."""
    out = np.zeros(case.q.shape)
    lse = np.full(case.scores_shape[:3], -np.inf)
    for b, h, i in np.ndindex(*lse.shape):
        row = s[b, h, i]
        if not np.isfinite(row).any():
            continue
        top = row.max()
        weights = np.exp(row - top)
        lse[b, h, i] = top + math.log(weights.sum())
        out[b, i, h] = weights @ case.v[b, :, h // case.group] / weights.sum()
    return out, lse


def causal_mask(seqlen_q, seqlen_k, alignment):
    off = seqlen_k - seqlen_q if alignment == "bottom_right" else 0
    allowed = [[j <= i + off for j in range(seqlen_k)] for i in range(seqlen_q)]
    return np.array(allowed, dtype=bool).reshape(seqlen_q, seqlen_k)


def window_mask(seqlen_q, seqlen_k, window_size, alignment):
    off = seqlen_k - seqlen_q if alignment == "bottom_right" else 0
    left, right = window_size
    allowed = [[(left < 0 or j >= i + off - left) and (right < 0 or j <= i + off + right)
                for j in range(seqlen_k)] for i in range(seqlen_q)]
    return np.array(allowed, dtype=bool).reshape(seqlen_q, seqlen_k)


def sum_over_broadcast_axes(full, shape):
    padded = (1,) * (full.ndim - len(shape)) + tuple(shape)
    axes = tuple(a for a, (n, m) in enumerate(zip(padded, full.shape)) if n == 1 and m != 1)
    return full.sum(axis=axes, keepdims=True).reshape(shape)


def numeric_gradient(loss, x, eps=1e-6):
    """Central finite differences of loss() with respect to x, perturbed in place."""
    grad = np.zeros_like(x)
    for index in np.ndindex(*x.shape):
        saved = x[index]
        x[index] = saved + eps
        plus = loss()
        x[index] = saved - eps
        minus = loss()
        x[index] = saved
        grad[index] = (plus - minus) / (2 * eps)
    return grad


def assert_same(actual, expected):
    """Equal up to float64 rounding; -inf must match -inf."""
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-12)


def flat(result):
    """[out, lse, *grads] from run()'s (out, lse, grads)."""
    out, lse, grads = result
    return [out, lse, *grads]


def assert_all_same(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        assert_same(a, e)


# ---------------------------------------------------------------------------------------
# Gradients


@settings(deadline=None, max_examples=60)
@given(case=cases(max_seqlen=5, max_head_dim=3), features=features())
@example(case=Case(1, 2, 1, 4, 2, 3),
         features=Features(causal=True, softcap=0.7, alibi="heads", bias="batch_keys", mask=True))
@example(case=Case(2, 4, 2, 2, 5, 2),
         features=Features(causal=True, causal_alignment="top_left", window_size=(1, 0),
                           bias="keys", dropout_p=0.3))
def test_backward_matches_central_finite_differences(case, features):
    options = features.options(case)
    weights = case.dout  # the loss is the linear functional sum(out * weights)

    def loss():
        return np.sum(reference.forward(case.q, case.k, case.v, **options)[0] * weights)

    out, lse = reference.forward(case.q, case.k, case.v, **options)
    grads = reference.backward(weights, case.q, case.k, case.v, out, lse, **options)
    inputs = [case.q, case.k, case.v] + ([options["bias"]] if "bias" in options else [])
    assert len(grads) == len(inputs)
    for analytic, x in zip(grads, inputs):
        np.testing.assert_allclose(analytic, numeric_gradient(loss, x), rtol=1e-5, atol=1e-7)


@fast
@given(case=cases(), features=features(bias=None), shift_scale=st.sampled_from((1.0, 50.0)))
def test_adding_a_per_row_constant_to_the_scores_changes_nothing(case, features, shift_scale):
    options = features.options(case)
    rng = np.random.default_rng([case.seed, 2])
    shift = shift_scale * rng.standard_normal(case.scores_shape[:3] + (1,))
    out, lse, grads = run(case, **options)
    shifted_out, shifted_lse, shifted_grads = run(case, bias=shift, **options)
    np.testing.assert_allclose(shifted_out, out, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(shifted_lse, lse + shift[..., 0], rtol=1e-9, atol=1e-10)
    for shifted, plain in zip(shifted_grads[:3], grads):
        np.testing.assert_allclose(shifted, plain, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(shifted_grads[3], 0.0, atol=1e-10)  # rows of ds sum to 0


@fast
@given(case=cases(), features=features(causal=False, window_size=(-1, -1), alibi=None,
                                       bias="full", dropout_p=0.0), data=st.data())
def test_permuting_keys_with_values_changes_nothing(case, features, data):
    perm = np.array(data.draw(st.permutations(range(case.seqlen_k))), dtype=int)
    options = features.options(case)
    out, lse, (dq, dk, dv, dbias) = run(case, **options)
    permuted = with_arrays(case, k=case.k[:, perm], v=case.v[:, perm])
    options["bias"] = options["bias"][..., perm]
    if "mask" in options:
        options["mask"] = options["mask"][..., perm]
    p_out, p_lse, (p_dq, p_dk, p_dv, p_dbias) = run(permuted, **options)
    assert_all_same([p_out, p_lse, p_dq], [out, lse, dq])
    assert_all_same([p_dk, p_dv, p_dbias], [dk[:, perm], dv[:, perm], dbias[..., perm]])


@fast
@given(case=cases(gqa=True), features=features())
@example(case=Case(1, 4, 1, 3, 5, 2), features=Features(causal=True, dropout_p=0.3, alibi="heads"))
def test_gqa_equals_repeating_the_kv_heads(case, features):
    options = features.options(case)
    out, lse, (dq, dk, dv, *dbias) = run(case, **options)
    repeated = with_arrays(case, k=np.repeat(case.k, case.group, axis=2),
                           v=np.repeat(case.v, case.group, axis=2), heads_kv=case.heads)
    r_out, r_lse, (r_dq, r_dk, r_dv, *r_dbias) = run(repeated, **options)

    def sum_groups(grad):
        b, n, _, d = grad.shape
        return grad.reshape(b, n, case.heads_kv, case.group, d).sum(axis=3)

    assert_all_same([out, lse, dq, *dbias], [r_out, r_lse, r_dq, *r_dbias])
    assert_all_same([dk, dv], [sum_groups(r_dk), sum_groups(r_dv)])


# ---------------------------------------------------------------------------------------
# Each option against an independent formulation


@fast
@given(case=cases(), features=features(causal=False, window_size=(-1, -1)),
       causal_alignment=st.sampled_from(("bottom_right", "top_left")))
@example(case=Case(1, 1, 1, 7, 3, 2), features=PLAIN, causal_alignment="bottom_right")
@example(case=Case(1, 1, 1, 3, 7, 2), features=PLAIN, causal_alignment="bottom_right")
@example(case=Case(1, 1, 1, 7, 3, 2), features=PLAIN, causal_alignment="top_left")
@example(case=Case(1, 1, 1, 3, 7, 2), features=PLAIN, causal_alignment="top_left")
def test_causal_equals_its_boolean_mask(case, features, causal_alignment):
    options = features.options(case)
    options["causal_alignment"] = causal_alignment
    mask = causal_mask(case.seqlen_q, case.seqlen_k, causal_alignment)
    mask = np.broadcast_to(mask, case.scores_shape)
    if "mask" in options:
        mask = mask & options["mask"]
    causal = run(case, **{**options, "causal": True})
    masked = run(case, **{**options, "causal": False, "mask": mask})
    assert_all_same(flat(causal), flat(masked))


@fast
@given(case=cases(), features=features(window_size=(-1, -1)),
       window_size=st.tuples(st.integers(-1, 5), st.integers(-1, 5)))
@example(case=Case(1, 1, 1, 8, 3, 2), features=PLAIN, window_size=(0, 0))
@example(case=Case(1, 1, 1, 3, 8, 2), features=Features(causal=True), window_size=(2, 3))
def test_window_equals_its_boolean_mask(case, features, window_size):
    options = features.options(case)
    mask = window_mask(case.seqlen_q, case.seqlen_k, window_size, features.causal_alignment)
    mask = np.broadcast_to(mask, case.scores_shape)
    if "mask" in options:
        mask = mask & options["mask"]
    windowed = run(case, **{**options, "window_size": window_size})
    masked = run(case, **{**options, "mask": mask})
    assert_all_same(flat(windowed), flat(masked))


@fast
@given(case=cases(), softcap=st.sampled_from((0.0, 0.1, 0.7, 3.0, 30.0)),
       softmax_scale=st.sampled_from((None, 0.5, 2.0)))
def test_softcap_equals_applying_tanh_by_hand(case, softcap, softmax_scale):
    out, lse = reference.forward(case.q, case.k, case.v, softcap=softcap,
                                 softmax_scale=softmax_scale)
    scores = scores_by_hand(case, softmax_scale, softcap)
    expected_out, expected_lse = attention_by_hand(scores, case)
    assert_same(out, expected_out)
    assert_same(lse, expected_lse)


@fast
@given(case=cases(), features=features(alibi=None, bias=None),
       alibi=st.sampled_from(("heads", "batch_heads")))
@example(case=Case(2, 2, 2, 6, 3, 2), features=Features(causal=True), alibi="batch_heads")
@example(case=Case(1, 2, 1, 3, 6, 2), features=Features(causal_alignment="top_left"), alibi="heads")
def test_alibi_equals_its_bias_formulation(case, features, alibi):
    options = dataclasses.replace(features, alibi=alibi).options(case)
    slopes = np.broadcast_to(options["alibi_slopes"], (case.batch, case.heads))
    off = case.seqlen_k - case.seqlen_q if features.causal_alignment == "bottom_right" else 0
    distance = np.abs(np.arange(case.seqlen_q)[:, None] + off - np.arange(case.seqlen_k)[None, :])
    bias = -slopes[:, :, None, None] * distance
    with_alibi = run(case, **options)
    with_bias = run(case, **{**options, "alibi_slopes": None, "bias": bias})
    assert_all_same(flat(with_alibi), flat(with_bias)[:-1])  # all but dbias


@fast
@given(case=cases(), causal=st.booleans(), use_mask=st.booleans(),
       softmax_scale=st.sampled_from((None, 0.2, 3.0)))
def test_lse_equals_logsumexp_of_the_scaled_masked_scores(case, causal, use_mask, softmax_scale):
    allowed = np.ones(case.scores_shape, dtype=bool)
    if use_mask:
        allowed &= np.random.default_rng(case.seed).random(case.scores_shape) < 0.7
    if causal:
        allowed &= causal_mask(case.seqlen_q, case.seqlen_k, "bottom_right")
    _, lse = reference.forward(case.q, case.k, case.v, causal=causal, softmax_scale=softmax_scale,
                               mask=allowed if use_mask else None)
    s = scores_by_hand(case, softmax_scale)
    expected = np.full(case.scores_shape[:3], -np.inf)
    for b, h, i in np.ndindex(*expected.shape):
        kept = s[b, h, i][allowed[b, h, i]]
        if kept.size:
            expected[b, h, i] = math.log(sum(math.exp(x) for x in kept))
    assert_same(lse, expected)


@fast
@given(case=varlen_cases(), features=features(bias=None),
       bias=st.sampled_from((None, "full", "batch_keys", "keys")))
@example(case=VarlenCase((0, 3, 2), (2, 0, 4), heads=2, heads_kv=1, head_dim=2),
         features=Features(causal=True, alibi="batch_heads", mask=True, dropout_p=0.3), bias="full")
def test_varlen_equals_running_each_sequence_alone(case, features, bias):
    options = dataclasses.replace(features, bias=bias).options(case)
    out, lse = reference.forward(case.q, case.k, case.v, **options, **case.varlen_options())
    grads = reference.backward(case.dout, case.q, case.k, case.v, out, lse, **options,
                               **case.varlen_options())
    assert out.shape == case.q.shape and lse.shape == (case.heads, case.q.shape[0])
    full_dbias = np.zeros(case.scores_shape)
    for b, (seqlen_q, seqlen_k) in enumerate(zip(case.seqlens_q, case.seqlens_k)):
        rows_q = slice(case.cu_seqlens_q[b], case.cu_seqlens_q[b + 1])
        rows_k = slice(case.cu_seqlens_k[b], case.cu_seqlens_k[b + 1])
        alone = with_arrays(Case(1, case.heads, case.heads_kv, seqlen_q, seqlen_k, case.head_dim),
                            q=case.q[rows_q][None], k=case.k[rows_k][None],
                            v=case.v[rows_k][None], dout=case.dout[rows_q][None])
        alone_options = dict(options)
        local = (slice(b, b + 1), slice(None), slice(0, seqlen_q), slice(0, seqlen_k))
        for name in ("bias", "mask"):
            if name in options:
                alone_options[name] = np.broadcast_to(options[name], case.scores_shape)[local]
        if "alibi_slopes" in options and options["alibi_slopes"].ndim == 2:
            alone_options["alibi_slopes"] = options["alibi_slopes"][b : b + 1]
        if features.dropout_p:
            alone_options["dropout_mask"] = reference.dropout_keep_mask(
                options["seed"], features.dropout_p, (1, case.heads, seqlen_q, seqlen_k),
                offset=options["dropout_offset"], batch_offset=b)
        a_out, a_lse, a_grads = run(alone, **alone_options)
        assert_same(out[rows_q], a_out[0])
        assert_same(lse[:, rows_q], a_lse[0])
        assert_same(grads[0][rows_q], a_grads[0][0])
        assert_same(grads[1][rows_k], a_grads[1][0])
        assert_same(grads[2][rows_k], a_grads[2][0])
        if bias:
            full_dbias[local] = a_grads[3]
    if bias:
        assert_same(grads[3], sum_over_broadcast_axes(full_dbias, options["bias"].shape))


# ---------------------------------------------------------------------------------------
# Fully masked rows and empty problems


@fast
@given(case=cases(), features=features())
@example(case=Case(1, 2, 1, 5, 2, 3), features=Features(causal=True))
def test_rows_without_allowed_keys_give_zero_output_minus_inf_lse_and_no_gradient(case, features):
    options = features.options(case)
    rng = np.random.default_rng([case.seed, 2])
    dead = rng.random(case.scores_shape[:3]) < 0.3
    options["mask"] = options.get("mask", np.ones(case.scores_shape, bool)) & ~dead[..., None]
    out, lse, grads = run(case, **options)
    for array in (out, lse, *grads):
        assert not np.isnan(array).any()
    dead = lse == -np.inf  # the forced rows and any that causal/window left empty
    assert dead.shape == case.scores_shape[:3]
    dead_rows = dead.transpose(0, 2, 1)  # (B, Nq, H), as out and dq are laid out
    assert (out[dead_rows] == 0).all() and (grads[0][dead_rows] == 0).all()
    if "bias" in options and features.bias == "full":
        assert (grads[3][dead] == 0).all()
    # Dead rows contribute nothing to dk and dv, whatever their q and dout.
    noise = 1e3 * rng.standard_normal((2,) + case.q.shape)
    noisy = with_arrays(case, q=np.where(dead_rows[..., None], noise[0], case.q),
                        dout=np.where(dead_rows[..., None], noise[1], case.dout))
    _, _, noisy_grads = run(noisy, **options)
    assert_same(noisy_grads[1], grads[1])
    assert_same(noisy_grads[2], grads[2])


def test_causal_bottom_right_with_more_queries_than_keys_leaves_the_first_rows_empty():
    case = Case(batch=2, heads=2, heads_kv=1, seqlen_q=7, seqlen_k=3, head_dim=4)
    out, lse, (dq, dk, dv) = run(case, causal=True)
    empty = 7 - 3  # query i sees keys j <= i - 4
    assert (lse[:, :, :empty] == -np.inf).all() and np.isfinite(lse[:, :, empty:]).all()
    assert (out[:, :empty] == 0).all() and (dq[:, :empty] == 0).all()
    assert np.isfinite(dk).all() and np.isfinite(dv).all()


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize(
    "batch, heads, heads_kv, seqlen_q, seqlen_k, head_dim",
    [(0, 2, 1, 3, 4, 2), (2, 0, 0, 3, 4, 2), (2, 0, 1, 3, 4, 2), (2, 2, 1, 0, 4, 2),
     (2, 2, 1, 3, 0, 2), (2, 2, 2, 0, 0, 2), (1, 2, 1, 3, 4, 0)],
)
def test_zero_size_dimensions_give_correctly_shaped_results(layout, batch, heads, heads_kv,
                                                            seqlen_q, seqlen_k, head_dim):
    case = Case(batch, heads, heads_kv, seqlen_q, seqlen_k, head_dim)
    to_layout = (lambda a: a.transpose(0, 2, 1, 3)) if layout == "bhsd" else (lambda a: a)
    q, k, v, dout = (to_layout(a) for a in (case.q, case.k, case.v, case.dout))
    bias = np.zeros((heads, seqlen_q, 1))
    options = dict(layout=layout, causal=True, bias=bias)
    out, lse = reference.forward(q, k, v, **options)
    dq, dk, dv, dbias = reference.backward(dout, q, k, v, out, lse, **options)
    assert (out.shape, lse.shape) == (q.shape, (batch, heads, seqlen_q))
    assert (dq.shape, dk.shape, dv.shape, dbias.shape) == (q.shape, k.shape, v.shape, bias.shape)
    assert all(a.dtype == np.float64 for a in (out, lse, dq, dk, dv, dbias))
    if seqlen_k == 0:
        assert (out == 0).all() and (lse == -np.inf).all()
        assert (dq == 0).all() and (dbias == 0).all()


@fast
@given(case=cases(), features=features())
def test_bhsd_layout_equals_bshd_transposed(case, features):
    options = features.options(case)
    out, lse, grads = run(case, **options)
    transposed = with_arrays(case, **{name: getattr(case, name).transpose(0, 2, 1, 3)
                                      for name in ("q", "k", "v", "dout")})
    t_out, t_lse, t_grads = run(transposed, layout="bhsd", **options)
    to_bshd = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731
    assert_all_same([to_bshd(t_out), t_lse, *map(to_bshd, t_grads[:3]), *t_grads[3:]],
                    [out, lse, *grads])


# ---------------------------------------------------------------------------------------
# Dropout and Philox


@fast
@given(case=cases(), features=features(dropout_p=0.0),
       keep_shape=st.sampled_from(("full", "batch_keys")),
       dropout_p=st.sampled_from((0.0, 0.2, 0.6)))
def test_explicit_dropout_mask_matches_manual_computation(case, features, keep_shape, dropout_p):
    options = features.options(case)
    keep = np.random.default_rng([case.seed, 3]).random(bias_shape(case, keep_shape)) < 0.6
    out, lse = reference.forward(case.q, case.k, case.v, dropout_p=dropout_p, dropout_mask=keep,
                                 **options)
    probs = reference.probabilities(case.q, case.k, case.v, **options)
    v = np.repeat(case.v, case.group, axis=2)
    expected = np.einsum("bhij,bjhd->bihd", probs * keep / (1 - dropout_p), v)
    _, undropped_lse = reference.forward(case.q, case.k, case.v, **options)
    assert_same(out, expected)
    assert_same(lse, undropped_lse)  # dropout does not touch the softmax normaliser


@fast
@given(case=cases(), features=features(dropout_p=0.3))
def test_generated_dropout_equals_its_keep_mask(case, features):
    options = features.options(case)
    keep = reference.dropout_keep_mask(options["seed"], 0.3, case.scores_shape,
                                       offset=options["dropout_offset"])
    generated = run(case, **options)
    explicit = run(case, **{**options, "seed": None, "dropout_mask": keep})
    assert_all_same(flat(generated), flat(explicit))


def test_dropout_keep_mask_is_reproducible_and_depends_on_seed_and_offset():
    shape = (2, 3, 20, 33)
    mask = reference.dropout_keep_mask(7, 0.5, shape, offset=3)
    assert mask.shape == shape and mask.dtype == np.bool_
    assert (reference.dropout_keep_mask(7, 0.5, shape, offset=3) == mask).all()
    for other in (reference.dropout_keep_mask(8, 0.5, shape, offset=3),
                  reference.dropout_keep_mask(7 + 2**32, 0.5, shape, offset=3),
                  reference.dropout_keep_mask(7, 0.5, shape, offset=4)):
        assert 0.3 < (other != mask).mean() < 0.7
    assert reference.dropout_keep_mask(7, 0.0, shape).all()


def test_dropout_keep_mask_depends_only_on_global_coordinates():
    big = reference.dropout_keep_mask(2**40 + 5, 0.4, (3, 2, 37, 29), offset=9)
    small = reference.dropout_keep_mask(2**40 + 5, 0.4, (2, 2, 17, 10), offset=9)
    assert (small == big[:2, :, :17, :10]).all()
    alone = reference.dropout_keep_mask(2**40 + 5, 0.4, (1, 2, 37, 29), offset=9, batch_offset=2)
    assert (alone[0] == big[2]).all()


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_dropout_keep_fraction_is_within_one_percent_of_one_minus_p(dropout_p):
    keep = reference.dropout_keep_mask(1234, dropout_p, (2, 4, 256, 256))
    assert abs(keep.mean() - (1 - dropout_p)) < 0.01


def test_one_philox_call_serves_rows_i_and_i_plus_8_and_columns_j_and_j_plus_1():
    seed, dropout_p, offset, batch_offset = 0x0123456789ABCDEF, 0.5, 77, 3
    batch, heads = 2, 3
    keep = reference.dropout_keep_mask(seed, dropout_p, (batch, heads, 40, 37), offset,
                                       batch_offset)
    threshold = 2**31
    calls = [(0, 0, 0, 0, 0), (1, 2, 1, 5, 7), (0, 1, 2, 7, 17), (1, 0, 2, 3, 3)]
    for b, h, row_group, row, col_pair in calls:
        i = 16 * row_group + row  # row < 8: this call also serves row i + 8
        j = 2 * col_pair
        counter = (j >> 1, (i >> 4) * 8 + (i & 7), (batch_offset + b) * heads + h, offset)
        words = philox4x32_10(counter, (seed & 0xFFFFFFFF, seed >> 32))
        for word, (ii, jj) in zip(words, [(i, j), (i, j + 1), (i + 8, j), (i + 8, j + 1)]):
            if ii < 40 and jj < 37:
                assert keep[b, h, ii, jj] == (word >= threshold), (b, h, ii, jj)


def test_dropout_threshold_is_floor_of_p_times_two_to_the_32():
    # keep = word >= floor(p * 2**32): one word exactly on the threshold must be kept.
    seed, shape = 99, (1, 1, 1, 2)
    words = philox4x32_10((0, 0, 0, 0), (seed, 0))
    word = int(words[0])
    assert reference.dropout_keep_mask(seed, word / 2**32, shape)[0, 0, 0, 0]
    assert not reference.dropout_keep_mask(seed, (word + 1) / 2**32, shape)[0, 0, 0, 0]


@pytest.mark.parametrize("counter, key, expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_matches_the_random123_known_answers(counter, key, expected):
    words = philox4x32_10(counter, key)
    assert words.dtype == np.uint32 and tuple(int(w) for w in words) == expected
    batched = philox4x32_10(np.array([counter, counter]), np.array(key))
    assert [tuple(map(int, row)) for row in batched] == [expected, expected]


# ---------------------------------------------------------------------------------------
# Bias gradients, dtypes, probabilities, errors


@fast
@given(case=cases(), features=features(bias=None),
       kind=st.sampled_from(("heads", "batch_keys", "keys", "rows")))
@example(case=Case(2, 2, 1, 3, 4, 2), features=PLAIN, kind="keys")
def test_dbias_of_a_broadcast_bias_is_the_full_dbias_summed_over_broadcast_axes(case, features,
                                                                                kind):
    options = features.options(case)
    bias = np.random.default_rng([case.seed, 4]).standard_normal(bias_shape(case, kind))
    *_, dbias = run(case, bias=bias, **options)[2]
    *_, full_dbias = run(case, bias=np.broadcast_to(bias, case.scores_shape).copy(), **options)[2]
    assert dbias.shape == bias.shape
    assert_same(dbias, sum_over_broadcast_axes(full_dbias, bias.shape))


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32])
def test_low_precision_inputs_are_computed_in_float64(dtype):
    case = Case(2, 2, 1, 5, 6, 8, seed=5)
    low = [a.astype(dtype) for a in (case.q, case.k, case.v)]
    out, lse = reference.forward(*low, causal=True)
    upcast = [a.astype(np.float64) for a in low]
    expected_out, expected_lse = reference.forward(*upcast, causal=True)
    assert out.dtype == lse.dtype == np.float64
    assert (out == expected_out).all() and (lse == expected_lse).all()


@fast
@given(case=cases(), features=features(dropout_p=0.0))
def test_probabilities_are_the_softmax_behind_the_output(case, features):
    options = features.options(case)
    probs = reference.probabilities(case.q, case.k, case.v, **options)
    out, lse = reference.forward(case.q, case.k, case.v, **options)
    live = np.isfinite(lse)
    assert probs.shape == case.scores_shape and (probs >= 0).all()
    assert_same(probs.sum(axis=-1), live.astype(float))
    assert_same(np.einsum("bhij,bjhd->bihd", probs, np.repeat(case.v, case.group, axis=2)), out)


def test_probabilities_reject_varlen():
    case = VarlenCase((2, 3), (3, 1), heads=1, heads_kv=1, head_dim=2)
    with pytest.raises(ValueError, match="varlen"):
        reference.probabilities(case.q, case.k, case.v, **case.varlen_options())


def test_dropout_without_a_seed_is_an_error_naming_seed():
    case = Case(1, 1, 1, 2, 2, 2)
    with pytest.raises(ValueError, match="seed=None"):
        reference.forward(case.q, case.k, case.v, dropout_p=0.1)


@pytest.mark.parametrize("change, message", [
    (dict(k=np.zeros((1, 4, 3, 2)), v=np.zeros((1, 4, 3, 2))), "4 heads, k and v 3"),
    (dict(v=np.zeros((1, 5, 1, 2))), "differ in heads or seqlen"),
    (dict(k=np.zeros((1, 4, 1, 3)), v=np.zeros((1, 4, 1, 3))), "head dim 2 != k head dim 3"),
    (dict(bias=np.zeros((4, 3))), r"bias has shape \(4, 3\)"),
    (dict(mask=np.ones((4,))), "mask has dtype float64"),
    (dict(alibi_slopes=np.ones(3)), r"alibi_slopes has shape \(3,\)"),
    (dict(window_size=(-2, 0)), "window_size=(.)-2, 0(.)"),
    (dict(layout="sbhd"), "layout='sbhd'"),
])
def test_inconsistent_inputs_raise_value_errors_that_name_them(change, message):
    change = dict(change)
    arrays = dict(q=np.zeros((1, 3, 4, 2)), k=np.zeros((1, 4, 1, 2)), v=np.zeros((1, 4, 1, 2)))
    arrays.update({name: change.pop(name) for name in ("q", "k", "v") if name in change})
    with pytest.raises(ValueError, match=message):
        reference.forward(arrays["q"], arrays["k"], arrays["v"], **change)


def test_backward_checks_the_shapes_of_dout_out_and_lse():
    case = Case(1, 2, 1, 3, 4, 2)
    out, lse = reference.forward(case.q, case.k, case.v)
    with pytest.raises(ValueError, match=r"lse has shape \(1, 2, 4\); expected \(1, 2, 3\)"):
        reference.backward(case.dout, case.q, case.k, case.v, out, np.zeros((1, 2, 4)))
    with pytest.raises(TypeError, match="unknown option"):
        reference.backward(case.dout, case.q, case.k, case.v, out, lse, is_causal=True)


def test_tolerance_bound_names_the_baseline_that_set_it():
    """The GPU tests' tolerance method (tests/_tolerance.py): a gradient's bound comes from
    the larger of the naive same-dtype error and the float64 error given the kernel's
    stored output, and a failure message names which one it was."""
    from _tolerance import compare

    ref = np.array([1.0, -2.0, 3.0])
    naive = ref + np.array([1e-3, 0.0, 0.0])
    small, large = ref + np.array([0.0, 1e-4, 0.0]), ref + np.array([0.0, 0.0, 5e-3])
    by_naive = compare("dq", ref, ref, naive, np.float16, 3, forced=small)
    by_forced = compare("dq", ref, ref, naive, np.float16, 3, forced=large)
    assert by_naive.naive_err == pytest.approx(1e-3) and "naive same-dtype max err" in str(by_naive)
    assert by_forced.naive_err == pytest.approx(5e-3) and "float64 given the stored output max err" in str(by_forced)
    assert by_forced.bound > by_naive.bound


# ---------------------------------------------------------------------------------------
# Blocks of query rows: the numbers of one whole block, in O(N * block) memory


@contextlib.contextmanager
def block_rows(rows, case):
    """Blocks of `rows` query rows for `case` (the reference sizes blocks in scores)."""
    saved = reference.BLOCK_ELEMENTS
    reference.BLOCK_ELEMENTS = rows * case.batch * case.heads * max(case.seqlen_k, 1)
    try:
        yield
    finally:
        reference.BLOCK_ELEMENTS = saved


def everything(case, options, varlen=False):
    """out, lse, every gradient and (dense) the probabilities."""
    results = flat(run(case, **options))
    if not varlen:
        results.append(reference.probabilities(case.q, case.k, case.v, **options))
    return results


@fast
@given(case=cases(max_seqlen=20, max_head_dim=4), features=features(), rows=st.integers(1, 7))
@example(case=Case(2, 4, 2, 37, 11, 3), rows=5,
         features=Features(causal=True, softcap=0.7, alibi="batch_heads", bias="rows", mask=True, dropout_p=0.3))
@example(case=Case(1, 2, 1, 19, 23, 2), rows=3,
         features=Features(window_size=(2, 4), causal_alignment="top_left", bias="full", dropout_p=0.3))
def test_blocks_of_query_rows_equal_one_block(case, features, rows):
    """Row blocks (that cut through the 8- and 16-row groups of the dropout counters)
    give the single block's out, lse, gradients, bias gradient and probabilities."""
    assert reference.BLOCK_ELEMENTS >= 2**20  # these problems are one block by default
    options = features.options(case)
    whole = everything(case, options)
    with block_rows(rows, case):
        blocked = everything(case, options)
    assert_all_same(blocked, whole)


@fast
@given(case=varlen_cases(), features=features(bias=None), bias=st.sampled_from((None, "full", "keys")),
       rows=st.integers(1, 4))
def test_varlen_blocks_of_query_rows_equal_one_block(case, features, bias, rows):
    options = {**dataclasses.replace(features, bias=bias).options(case), **case.varlen_options()}
    whole = everything(case, options, varlen=True)
    with block_rows(rows, case):
        blocked = everything(case, options, varlen=True)
    assert_all_same(blocked, whole)


def test_dropout_rows_of_any_block_are_those_of_the_whole_mask():
    seed, dropout_p, offset, batch_offset = 2**63 + 12345, 0.4, 5, 1
    whole = reference.dropout_keep_mask(seed, dropout_p, (2, 3, 45, 19), offset, batch_offset)
    for start, stop in ((0, 45), (3, 11), (7, 9), (8, 24), (16, 33), (44, 45), (5, 5)):
        part = reference._keep_rows(seed, dropout_p, 2, 3, np.arange(start, stop), 19, offset, batch_offset)
        np.testing.assert_array_equal(part, whole[:, :, start:stop])


def test_host_path_memory_grows_with_n_times_block_not_n_squared():
    """Forward and backward at N = 1024 and 2048 with 16-row blocks: the peak of traced
    allocations (a block makes ~15 arrays of 16 x N) stays well below one N x N float64
    matrix and doubles, not quadruples, with N."""

    def peak(n):
        case = Case(batch=1, heads=1, heads_kv=1, seqlen_q=n, seqlen_k=n, head_dim=16, seed=n)
        options = dict(causal=True, dropout_p=0.2, seed=3, bias=np.zeros(n), softcap=2.0)
        with block_rows(16, case):
            tracemalloc.start()
            try:
                out, lse = reference.forward(case.q, case.k, case.v, **options)
                reference.backward(case.dout, case.q, case.k, case.v, out, lse, **options)
                return tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()

    small, large = peak(1024), peak(2048)
    assert large < 2048 * 2048 * 8 / 4, f"peak {large / 2**20:.1f} MiB at N = 2048"
    assert large / small < 2.6, (small, large)
