"""The context-parallel plan (cuflash/_cp_plan.py) against the mask it must reproduce.

Each call is replayed the way the kernel reads its options (causal, window, alignment,
position offsets) on the rows and keys it is given, and the pairs it lets through are
mapped back to global positions. For every rank: every allowed (query, key) pair of the
whole-sequence attention is computed exactly once over all steps, no other pair ever is,
and where scores depend on positions (ALiBi, dropout) the kernel's positions are the
global ones.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cuflash import _cp_plan as plan

WINDOWS = [(-1, -1), (3, -1), (-1, 2), (5, 0), (0, 0), (2, 3), (9, 1)]


def allowed(n: int, causal: bool, window) -> np.ndarray:
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    ok = np.ones((n, n), bool)
    if causal:
        ok &= j <= i
    left, right = window
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


def positions(segments) -> np.ndarray:
    """Global position of each local row."""
    length = sum(s.length for s in segments)
    pos = np.full(length, -1)
    for s in segments:
        pos[s.local:s.local + s.length] = np.arange(s.start, s.end)
    return pos


def replay(call: plan.Call, options: dict, q_pos: np.ndarray, k_pos: np.ndarray, counts: np.ndarray,
           feats: plan.Features) -> None:
    """Add the pairs `call` computes to counts[global q, global k], checking positions."""
    o = call.kernel_options(options)
    nq, nk = call.q_hi - call.q_lo, call.k_hi - call.k_lo
    q_off, k_off = o.get("position_offsets", (0, 0))
    diag = (nk - nq if o["causal_alignment"] == "bottom_right" else 0) + q_off - k_off
    i = np.arange(nq)[:, None]
    j = np.arange(nk)[None, :]
    ok = np.ones((nq, nk), bool)
    if o["causal"]:
        ok &= j <= i + diag
    left, right = o["window_size"]
    if left >= 0:
        ok &= j >= i + diag - left
    if right >= 0:
        ok &= j <= i + diag + right
    gq = q_pos[call.q_lo:call.q_hi][:, None]
    gk = k_pos[call.k_lo:call.k_hi][None, :]
    if feats.alibi:  # the kernel's distance |i + diag - j| must be the global one
        assert np.array_equal(np.abs(i + diag - j)[ok], np.broadcast_to(np.abs(gq - gk), ok.shape)[ok])
    if feats.dropout:  # Philox coordinates (i + q_off, j + k_off) must be global
        assert np.array_equal(np.broadcast_to(i + q_off, ok.shape)[ok], np.broadcast_to(gq, ok.shape)[ok])
        assert np.array_equal(np.broadcast_to(j + k_off, ok.shape)[ok], np.broadcast_to(gk, ok.shape)[ok])
    rows, cols = np.nonzero(ok)
    np.add.at(counts, (gq[rows, 0], gk[0, cols]), 1)


def check(placement: str, sharding: str, world: int, local_len: int, feats: plan.Features) -> int:
    """Replays the whole plan; returns the number of kernel calls."""
    n = world * local_len
    options = dict(causal=feats.causal, window_size=feats.window_size, causal_alignment="bottom_right")
    counts = np.zeros((n, n), int)
    num_calls = 0
    if placement == "ring":
        p = plan.ring_plan(sharding, world, local_len, feats, "test")
        for rank, step in itertools.product(range(world), range(world)):
            calls = p.rank_calls(rank, step)
            if step >= p.steps:
                assert not calls
            q_pos = positions(plan.local_segments(sharding, rank, world, local_len))
            k_pos = positions(plan.local_segments(sharding, (rank - step) % world, world, local_len))
            for call in calls:
                replay(call, options, q_pos, k_pos, counts, feats)
                num_calls += 1
    else:
        p = plan.allgather_plan(sharding, world, local_len, feats, "test")
        for rank in range(world):
            q_pos = positions(plan.local_segments(sharding, rank, world, local_len))
            for call in p[rank]:
                replay(call, options, q_pos, np.arange(n), counts, feats)
                num_calls += 1
    expected = allowed(n, feats.causal, feats.window_size).astype(int)
    assert np.array_equal(counts, expected), f"pairs computed != allowed pairs:\n{counts - expected}"
    return num_calls


CASES = [
    (placement, sharding, world, causal, window)
    for placement in ("ring", "allgather")
    for sharding in plan.SHARDINGS
    for world in (1, 2, 3, 4)
    for causal in (False, True)
    for window in WINDOWS
]


@pytest.mark.parametrize("placement,sharding,world,causal,window", CASES)
def test_plan_computes_every_allowed_pair_exactly_once(placement, sharding, world, causal, window):
    for offsets_supported in (False, True):
        feats = plan.Features(causal, window, alibi=False, dropout=False, offsets_supported=offsets_supported)
        try:
            check(placement, sharding, world, 6, feats)
        except plan.OffsetsUnavailable:
            # Only a window edge inside an off-diagonal block may need the offsets.
            assert not offsets_supported and window != (-1, -1)


@pytest.mark.parametrize("placement,sharding,world", [(p, s, w) for p in ("ring", "allgather")
                                                      for s in plan.SHARDINGS for w in (1, 2, 4)])
@pytest.mark.parametrize("feature", ["alibi", "dropout"])
def test_positional_features_see_global_positions(placement, sharding, world, feature):
    for causal, window in [(False, (-1, -1)), (True, (-1, -1)), (True, (40, -1)), (False, (17, 33))]:
        feats = plan.Features(causal, window, alibi=feature == "alibi", dropout=feature == "dropout",
                              offsets_supported=True)
        check(placement, sharding, world, 64, feats)


def test_plain_causal_needs_no_offsets():
    """Plain causal attention (no window, ALiBi or dropout) runs on today's core."""
    for placement, sharding, world in itertools.product(("ring", "allgather"), plan.SHARDINGS, (1, 2, 3, 4)):
        check(placement, sharding, world, 8, plan.Features(True, (-1, -1), False, False, offsets_supported=False))


def test_zigzag_balances_causal_work():
    """Every rank computes the same number of (query, key) pairs at every step but the
    first (whose diagonal blocks are the same size on every rank too), in at most two
    calls per step."""
    world, local_len = 4, 8
    p = plan.ring_plan("zigzag", world, local_len, plan.Features(True, (-1, -1), False, False, False), "test")
    for step in range(world):
        work = set()
        for rank in range(world):
            calls = p.rank_calls(rank, step)
            assert 1 <= len(calls) <= 2
            work.add(sum((c.q_hi - c.q_lo) * (c.k_hi - c.k_lo) * (0.5 if c.masked else 1.0) for c in calls))
        assert len(work) == 1, f"step {step}: unequal work {work}"


def test_contiguous_causal_ring_skips_blocks_above_the_diagonal():
    p = plan.ring_plan("contiguous", 4, 8, plan.Features(True, (-1, -1), False, False, False), "test")
    for rank, step in itertools.product(range(4), range(4)):
        assert bool(p.rank_calls(rank, step)) == (step <= rank)


def test_window_ring_stops_when_no_query_reaches_further():
    p = plan.ring_plan("contiguous", 4, 8, plan.Features(True, (8, -1), False, False, True), "test")
    assert p.steps == 2


def test_dropout_needs_aligned_chunk_starts():
    feats = plan.Features(False, (-1, -1), alibi=False, dropout=True, offsets_supported=True)
    with pytest.raises(plan.PlanError, match="q_start=8"):
        plan.ring_plan("contiguous", 2, 8, feats, "test")


def test_offsets_unavailable_is_reported_with_positions():
    feats = plan.Features(True, (-1, -1), alibi=True, dropout=False, offsets_supported=False)
    with pytest.raises(plan.OffsetsUnavailable, match="position_offsets"):
        plan.ring_plan("contiguous", 2, 8, feats, "test")
