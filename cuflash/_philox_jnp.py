"""Philox4x32-10 and dropout's keep mask in jax.numpy, on uint32 words alone.

Bit for bit cuflash/_philox.py and `cuflash.reference.dropout_keep_mask`, but the seed and
offset may be traced values (a jitted step draws them from a key), and nothing needs
64-bit types (JAX disables them unless jax_enable_x64).

The one step that wants more than 32 bits is mulhilo, the 64-bit product of two 32-bit
words. The low word is the wrapping uint32 product. The high word is assembled from
16-bit halves, a = ah * 2**16 + al and b = bh * 2**16 + bl:

    a * b = ah*bh * 2**32 + (ah*bl + al*bh) * 2**16 + al*bl

Each partial product is below 2**32. The carry into the high word is the top of
(al*bl >> 16) + (ah*bl & 0xffff) + (al*bh & 0xffff), a sum below 3 * 2**16, so every
intermediate fits in uint32 and the high word is exact.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from ._philox import PHILOX_M0, PHILOX_M1, PHILOX_ROUNDS, PHILOX_W0, PHILOX_W1

_U32 = jnp.uint32


def _mulhilo32(a: int, b):
    """(high, low) 32-bit words of a * b for a constant a and a uint32 array b."""
    b = b.astype(_U32)
    al, ah = _U32(a & 0xFFFF), _U32(a >> 16)
    bl, bh = b & _U32(0xFFFF), b >> _U32(16)
    ll, lh, hl, hh = al * bl, al * bh, ah * bl, ah * bh
    carry = ((ll >> _U32(16)) + (lh & _U32(0xFFFF)) + (hl & _U32(0xFFFF))) >> _U32(16)
    high = hh + (lh >> _U32(16)) + (hl >> _U32(16)) + carry
    return high, b * _U32(a)


def philox_words(c0, c1, c2, c3, k0, k1) -> tuple:
    """Philox4x32-10 with each counter and key word its own broadcastable uint32 array
    (concrete or traced); the four output words as uint32 arrays of the broadcast shape."""
    c0, c1, c2, c3, k0, k1 = (jnp.asarray(w).astype(_U32) for w in (c0, c1, c2, c3, k0, k1))
    for round_index in range(PHILOX_ROUNDS):
        if round_index > 0:  # the key is bumped between rounds (uint32 addition wraps mod 2**32)
            k0 = k0 + _U32(PHILOX_W0)
            k1 = k1 + _U32(PHILOX_W1)
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return tuple(jnp.broadcast_arrays(c0, c1, c2, c3))


def keep_mask(words, dropout_p: float, shape: tuple[int, int, int, int],
              position_offsets: tuple[int, int] = (0, 0)):
    """`cuflash.reference.dropout_keep_mask` (bool (B, H, Nq, Nk)) from rng words.

    `words` is a uint32 (4,) array [seed_lo, seed_hi, offset, 0] (traced or not): the
    seed is seed_lo + seed_hi * 2**32 and the offset is Philox's fourth counter word.
    Only the key and that counter word are traced; every coordinate is a trace-time
    constant computed in NumPy from the global positions (position_offsets added), so
    the mask depends on (b * H + h, global row, global column) alone, as the kernels'."""
    batch, heads, seqlen_q, seqlen_k = (int(n) for n in shape)
    q_start, k_start = (int(x) for x in position_offsets)
    words = jnp.asarray(words).astype(_U32)
    threshold = min(math.floor(dropout_p * 2**32), 2**32 - 1)
    rows = q_start + np.arange(seqlen_q, dtype=np.int64)
    cols = k_start + np.arange(seqlen_k, dtype=np.int64)
    # Counter words (every one mod 2**32): column pair, row counter (rows i and i + 8 of a
    # 16-row group share one), batch * heads + head, offset.
    pair = ((cols >> 1) % 2**32).astype(np.uint32)[None, None, :]
    row_counter = (((rows >> 4) * 8 + (rows & 7)) % 2**32).astype(np.uint32)[None, :, None]
    batch_head = (np.arange(batch * heads, dtype=np.int64) % 2**32).astype(np.uint32)[:, None, None]
    out = philox_words(pair, row_counter, batch_head, words[2], words[0], words[1])
    # Element (i, j) reads word 2 * ((i >> 3) & 1) + (j & 1) of its call's four.
    which = (2 * ((rows >> 3) & 1))[:, None] + (cols & 1)[None, :]
    picked = jnp.where(which == 0, out[0], jnp.where(which == 1, out[1], jnp.where(which == 2, out[2], out[3])))
    return jnp.reshape(picked >= _U32(threshold), (batch, heads, seqlen_q, seqlen_k))
