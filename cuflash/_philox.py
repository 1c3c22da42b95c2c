"""Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011;
the Random123 library) in NumPy, bit for bit the generator the CUDA kernels use.

Philox is counter-based: its output is a pure function of (counter, key), so any element of
a dropout mask can be regenerated from its coordinates alone, by any tiling, on the host or
on the device, forward or backward. See `cuflash.reference.dropout_keep_mask` for how
dropout turns attention coordinates into counters.

The arithmetic is done on uint64 arrays that hold 32-bit values: a 32 x 32-bit product fits
exactly in 64 bits (so mulhilo is one multiply and two bit operations), and the only sum,
the key bump, is reduced mod 2**32 by hand.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PHILOX_M0 = 0xD2511F53  # multiplier for counter word 0
PHILOX_M1 = 0xCD9E8D57  # multiplier for counter word 2
PHILOX_W0 = 0x9E3779B9  # key bump for key word 0 (golden ratio)
PHILOX_W1 = 0xBB67AE85  # key bump for key word 1 (sqrt(3) - 1)
PHILOX_ROUNDS = 10

_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


def philox4x32_10(counter: Any, key: Any) -> np.ndarray:
    """Philox4x32-10 of `counter` (..., 4) under `key` (..., 2); leading axes broadcast.

    Every value must lie in [0, 2**32). Returns the four output words as uint32 (..., 4).
    """
    counter = _as_words(counter, 4, "counter")
    key = _as_words(key, 2, "key")
    words = philox_words(*np.moveaxis(counter, -1, 0), *np.moveaxis(key, -1, 0))
    return np.stack(words, axis=-1)


def philox_words(c0, c1, c2, c3, k0, k1) -> tuple[np.ndarray, ...]:
    """Philox4x32-10 with each counter and key word given as its own (broadcastable)
    array of values in [0, 2**32); returns the four output words as uint32 arrays."""
    c0, c1, c2, c3, k0, k1 = (np.asarray(w, dtype=np.uint64) for w in (c0, c1, c2, c3, k0, k1))
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    w0, w1 = np.uint64(PHILOX_W0), np.uint64(PHILOX_W1)
    for round_index in range(PHILOX_ROUNDS):
        if round_index > 0:  # the key is bumped between rounds, not before the first
            k0 = (k0 + w0) & _MASK32
            k1 = (k1 + w1) & _MASK32
        hi0, lo0 = _mulhilo32(m0, c0)
        hi1, lo1 = _mulhilo32(m1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return tuple(w.astype(np.uint32) for w in np.broadcast_arrays(c0, c1, c2, c3))


def _mulhilo32(a: np.uint64, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """High and low 32-bit halves of the exact 64-bit product of two 32-bit values."""
    product = a * b
    return product >> _SHIFT32, product & _MASK32


def _as_words(values: Any, width: int, name: str) -> np.ndarray:
    words = np.asarray(values)
    if words.shape[-1:] != (width,):
        raise ValueError(f"{name} has shape {words.shape}; its last axis must have {width} words")
    if words.size and (words.min() < 0 or words.max() > 0xFFFFFFFF):
        raise ValueError(f"{name} words must lie in [0, 2**32); got {words.min()}..{words.max()}")
    return words.astype(np.uint64)
