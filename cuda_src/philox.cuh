// Counter-based dropout: Philox4x32-10, keyed on global coordinates.
//
// A draw depends only on (seed, offset, batch * num_heads + head, query row, key column),
// never on tile sizes, so the backward regenerates the forward's mask and
// cuflash/_philox.py reproduces it bit for bit. One Philox call yields four words, which
// serve exactly the four elements a thread holds in one m16n8 accumulator tile: rows i
// and i + 8 of a 16-row group, columns j and j + 1:
//   counter = (j >> 1, (i >> 4) * 8 + (i & 7), batch * num_heads + head, offset)
//   word    = w[2 * ((i >> 3) & 1) + (j & 1)],   kept iff word >= floor(p * 2^32).
#pragma once
#include "common.cuh"

struct Philox4 {
    u32 x, y, z, w;
};

CF_DEVICE Philox4 philox4x32_10(u32 c0, u32 c1, u32 c2, u32 c3, u32 k0, u32 k1) {
    const u32 kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        const u32 hi0 = __umulhi(kM0, c0), lo0 = kM0 * c0;
        const u32 hi1 = __umulhi(kM1, c2), lo1 = kM1 * c2;
        const u32 n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
        k0 += kW0;
        k1 += kW1;
    }
    return Philox4{c0, c1, c2, c3};
}

// Keep flags of the four accumulator elements of one m16n8 tile: (i, j), (i, j+1),
// (i+8, j), (i+8, j+1), where i is the tile's row g (i & 8 == 0) and j is even.
CF_DEVICE void dropout_keep4(const Params& p, int bh, int i, int j, bool (&keep)[4]) {
    const Philox4 r = philox4x32_10((u32)j >> 1, (u32)((i >> 4) * 8 + (i & 7)), (u32)bh, p.dropout_offset,
                                    (u32)(p.seed & 0xffffffffu), (u32)(p.seed >> 32));
    keep[0] = r.x >= p.dropout_threshold;
    keep[1] = r.y >= p.dropout_threshold;
    keep[2] = r.z >= p.dropout_threshold;
    keep[3] = r.w >= p.dropout_threshold;
}
