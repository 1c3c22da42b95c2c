"""Which attention calls each rank makes at each step of context-parallel attention.

Shared by the PyTorch (`cuflash.distributed`) and JAX (`cuflash.jax_distributed`) front
ends, which only move arrays: this module holds the geometry, and nothing here touches an
array or a collective.

The sequence (total length N, self-attention: the same positions for queries and keys) is
split over `world` ranks. A rank's local buffer holds one or more *segments* of the global
sequence, back to back:

    contiguous  rank r holds [r n, (r + 1) n)                       (n = N / world)
    zigzag      rank r holds chunks r and 2 world - 1 - r of 2 world  (c = N / (2 world))

A rank's queries always stay home. The keys and values it sees at a step are some other
rank's local buffer (ring), or the whole sequence in global order (all-gather). For every
(query segment, key segment) pair the plan clips the keys to those some query row of the
segment may see (causal and window limits), drops empty pairs, and records whether the
rest is fully visible or still needs the mask. A masked block is exact without position
offsets in the kernel when its diagonal is one the kernel already knows: the query
segment starts where the keys start (top-left alignment) or ends where they end
(bottom-right alignment). Anything else (a window edge inside an off-diagonal block, ALiBi
or dropout off the diagonal) needs the core's `position_offsets=(q_start, k_start)`.

Merging keeps the number of kernel calls small where positions do not matter (no ALiBi,
no dropout): key pieces adjacent in the local buffer merge when all but the last are fully
visible and the last is bottom-right aligned (one bottom-right causal call covers a zigzag
rank's second query chunk against both of its key chunks), and query segments adjacent in
the buffer merge when they make the same fully visible call.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

SHARDINGS = ("contiguous", "zigzag")


@dataclasses.dataclass(frozen=True)
class Segment:
    """A piece of the global sequence in a local buffer: global positions
    [start, start + length), local rows [local, local + length)."""

    start: int
    length: int
    local: int

    @property
    def end(self) -> int:
        return self.start + self.length


def local_segments(sharding: str, rank: int, world: int, local_len: int) -> tuple[Segment, ...]:
    """The segments of the sequence rank `rank` holds, in local-buffer order."""
    if sharding == "contiguous":
        return (Segment(rank * local_len, local_len, 0),)
    half = local_len // 2
    return (Segment(rank * half, half, 0), Segment((2 * world - 1 - rank) * half, half, half))


def global_chunk_order(sharding: str, world: int) -> list[tuple[int, int]]:
    """For each global chunk in order, (rank, index of the chunk in that rank's buffer):
    how to put an all-gathered sequence back in global order. Contiguous sharding has one
    chunk per rank, zigzag two."""
    if sharding == "contiguous":
        return [(r, 0) for r in range(world)]
    return [(g, 0) if g < world else (2 * world - 1 - g, 1) for g in range(2 * world)]


@dataclasses.dataclass(frozen=True)
class Band:
    """Which keys query i may see: j in [i - left, i + right] (None: unbounded), the
    causal limit folded into `right` (causal means right <= 0)."""

    left: int | None
    right: int | None

    @classmethod
    def of(cls, causal: bool, window_size: tuple[int, int]) -> "Band":
        left, right = window_size
        left = None if left < 0 else int(left)
        right = None if right < 0 else int(right)
        if causal:
            right = 0 if right is None else min(right, 0)
        return cls(left, right)

    def keys_seen(self, q_start: int, q_end: int) -> tuple[float, float]:
        """The global keys [lo, hi) some query in [q_start, q_end) may see."""
        lo = -math.inf if self.left is None else q_start - self.left
        hi = math.inf if self.right is None else q_end - 1 + self.right + 1
        return lo, hi

    def all_visible(self, q_start: int, q_end: int, k_lo: int, k_hi: int) -> bool:
        """Whether every query in [q_start, q_end) sees every key in [k_lo, k_hi)."""
        if self.right is not None and k_hi - 1 > q_start + self.right:
            return False
        if self.left is not None and k_lo < q_end - 1 - self.left:
            return False
        return True


@dataclasses.dataclass(frozen=True)
class Call:
    """One kernel call: local query rows [q_lo, q_hi) against rows [k_lo, k_hi) of the held
    key/value buffer, whose first query and key sit at global positions q_start, k_start.

    masked: the block needs the causal/window mask (else every pair is visible and the
    call runs without it). alignment: the causal alignment that puts the block's diagonal
    where it belongs (meaningful when masked or positional). offsets: the call must pass
    position_offsets=(q_start, k_start) (with top-left alignment) to be exact."""

    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    q_start: int
    k_start: int
    masked: bool
    alignment: str = "top_left"
    offsets: bool = False

    def kernel_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """cuflash keyword options for this call, from the attention's own (which hold
        causal, window_size, ALiBi, dropout, ... for the whole sequence)."""
        o = dict(options)
        if not self.masked:
            o.update(causal=False, window_size=(-1, -1))
        if self.offsets:
            o.update(causal_alignment="top_left", position_offsets=(self.q_start, self.k_start))
        else:
            o.update(causal_alignment=self.alignment)
        return o


class PlanError(ValueError):
    """The attention cannot be split this way (the message says why)."""


class OffsetsUnavailable(NotImplementedError):
    """A call needs position offsets and the core does not have them."""


@dataclasses.dataclass(frozen=True)
class Features:
    """What the plan needs to know about the attention's options."""

    causal: bool
    window_size: tuple[int, int]
    alibi: bool
    dropout: bool
    offsets_supported: bool

    @property
    def positional(self) -> bool:
        """Whether scores depend on absolute positions beyond the mask."""
        return self.alibi or self.dropout

    @property
    def band(self) -> Band:
        return Band.of(self.causal, self.window_size)


def _piece(q: Segment, k: Segment, feats: Features) -> Call | None:
    """The call of query segment q against key segment k, clipped to the keys q may see."""
    lo_seen, hi_seen = feats.band.keys_seen(q.start, q.end)
    lo = int(max(k.start, lo_seen))
    hi = int(min(k.end, hi_seen))
    if lo >= hi or q.length == 0:
        return None
    if feats.dropout:
        lo = max(k.start, lo - lo % 2)  # dropout's Philox pairs keys (2j, 2j + 1): start on an even key
    masked = not feats.band.all_visible(q.start, q.end, lo, hi)
    k_lo = k.local + (lo - k.start)
    call = Call(q.local, q.local + q.length, k_lo, k_lo + (hi - lo), q.start, lo, masked)
    if not (masked or feats.positional):
        return call
    if feats.dropout:
        exact = (q.start, lo) == (0, 0)  # the kernel's Philox coordinates are then global
        alignment = "top_left"
    elif q.start == lo:
        exact, alignment = True, "top_left"
    elif q.end == hi:
        exact, alignment = True, "bottom_right"
    else:
        exact, alignment = False, "top_left"
    if exact:
        return dataclasses.replace(call, alignment=alignment)
    return dataclasses.replace(call, offsets=True)


def _merge_keys(pieces: list[Call], feats: Features) -> list[Call]:
    """Merge key pieces of one query segment that are adjacent in the buffer, where one
    bottom-right call over the union is exact (see the module docstring)."""
    if feats.positional or feats.band.left is not None:
        return pieces
    merged: list[Call] = []
    for piece in sorted(pieces, key=lambda c: c.k_lo):
        prev = merged[-1] if merged else None
        if prev is not None and not prev.masked and prev.k_hi == piece.k_lo and _closes_bottom_right(piece):
            merged[-1] = dataclasses.replace(prev, k_hi=piece.k_hi, masked=piece.masked, alignment="bottom_right")
        else:
            merged.append(piece)
    return merged


def _closes_bottom_right(piece: Call) -> bool:
    """Whether fully visible keys placed before `piece` in one bottom-right call stay fully
    visible and `piece` keeps its own mask: it is unmasked, or it ends where its queries end
    (its diagonal is the bottom-right one) and starts at or before its first query (so
    the first query's limit lies inside it, past the keys placed before it)."""
    if not piece.masked:
        return True
    k_end = piece.k_start + (piece.k_hi - piece.k_lo)
    q_end = piece.q_start + (piece.q_hi - piece.q_lo)
    return not piece.offsets and k_end == q_end and piece.k_start <= piece.q_start


def _merge_queries(calls: list[Call], feats: Features) -> list[Call]:
    """Merge query segments adjacent in the buffer that make the same unmasked call."""
    if feats.positional:
        return calls
    merged: list[Call] = []
    for call in calls:
        prev = merged[-1] if merged else None
        if (prev is not None and not prev.masked and not call.masked and prev.q_hi == call.q_lo
                and (prev.k_lo, prev.k_hi) == (call.k_lo, call.k_hi)):
            merged[-1] = dataclasses.replace(prev, q_hi=call.q_hi)
        else:
            merged.append(call)
    return merged


def calls_for(q_segments: Iterable[Segment], k_segments: Iterable[Segment], feats: Features) -> list[Call]:
    """The kernel calls that attend the local queries to the held keys."""
    k_segments = tuple(k_segments)
    calls: list[Call] = []
    for q in q_segments:
        pieces = [p for p in (_piece(q, k, feats) for k in k_segments) if p is not None]
        calls.extend(_merge_keys(pieces, feats))
    calls = _merge_queries(calls, feats)
    return calls


def check_calls(calls: Iterable[Call], feats: Features, where: str) -> None:
    """Raise before any work when a call cannot be made exactly."""
    for call in calls:
        if not call.offsets:
            continue
        if not feats.offsets_supported:
            needs = ("dropout" if feats.dropout else "ALiBi" if feats.alibi else
                     f"window_size={feats.window_size!r}")
            raise OffsetsUnavailable(
                f"{where}: {needs} across sequence chunks needs the core option position_offsets "
                f"(queries at global position {call.q_start} against keys at {call.k_start}), which this "
                "cuflash does not have ('position_offsets' not in cuflash.OPTION_NAMES)")
        if feats.dropout and (call.q_start % 16 or call.k_start % 2):
            raise PlanError(
                f"{where}: dropout needs every chunk's query start to be a multiple of 16 and key start "
                f"a multiple of 2 (the Philox blocks are keyed on global positions); got q_start={call.q_start}, "
                f"k_start={call.k_start}: make the local sequence length a multiple of 16 (32 for zigzag)")


@dataclasses.dataclass(frozen=True)
class RingPlan:
    """Every rank's calls at every ring step. At step s rank r holds the buffer of rank
    (r - s) mod world. `steps` is the number of steps that do any work anywhere: keys that
    no query ever reaches (a window) are never sent."""

    world: int
    sharding: str
    local_len: int
    calls: tuple[tuple[tuple[Call, ...], ...], ...]  # [rank][step]
    steps: int

    def rank_calls(self, rank: int, step: int) -> tuple[Call, ...]:
        return self.calls[rank][step]


def ring_plan(sharding: str, world: int, local_len: int, feats: Features, where: str) -> RingPlan:
    """The plan of ring attention (placements "ring" and "zigzag")."""
    calls = []
    for rank in range(world):
        mine = local_segments(sharding, rank, world, local_len)
        per_step = []
        for step in range(world):
            source = (rank - step) % world
            held = local_segments(sharding, source, world, local_len)
            step_calls = tuple(calls_for(mine, held, feats))
            check_calls(step_calls, feats, where)
            per_step.append(step_calls)
        calls.append(tuple(per_step))
    busy = [s for s in range(world) if any(calls[r][s] for r in range(world))]
    steps = (max(busy) + 1) if busy else 1
    return RingPlan(world, sharding, local_len, tuple(calls), steps)


def allgather_plan(sharding: str, world: int, local_len: int, feats: Features,
                   where: str) -> tuple[tuple[Call, ...], ...]:
    """Each rank's calls against the whole sequence, gathered in global order."""
    whole = (Segment(0, world * local_len, 0),)
    plans = []
    for rank in range(world):
        calls = tuple(calls_for(local_segments(sharding, rank, world, local_len), whole, feats))
        check_calls(calls, feats, where)
        plans.append(calls)
    return tuple(plans)
