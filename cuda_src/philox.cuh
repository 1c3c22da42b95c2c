// Counter-based dropout: Philox4x32-10, keyed on global coordinates.
//
// A draw depends only on (seed, offset, batch * num_heads + head, global query row, global
// key column), never on tile sizes, so the backward regenerates the forward's mask and
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

// One block's dropout stream: the Philox key, the counter's fourth word and the keep
// threshold, read once (from device memory when the call gives an rng_state, so a
// replayed CUDA graph sees the state as it is at replay), and the global position of
// row 0 and key 0. The host requires q_position % 16 == 0 and k_position % 2 == 0, so a
// shifted (i, j) keeps the (i & 8) == 0, even-j shape of an m16n8 tile's four elements.
struct DropoutRng {
    u32 key0, key1, offset, threshold;
    int row0, col0;

    CF_DEVICE explicit DropoutRng(const Params& p) {
        u64 seed = p.seed;
        u32 off = p.dropout_offset;
        if (p.rng_state != nullptr) {
            seed = p.rng_state[0];
            off = (u32)(p.rng_state[1] & 0xffffffffull);
        }
        key0 = (u32)(seed & 0xffffffffull);
        key1 = (u32)(seed >> 32);
        offset = off;
        threshold = p.dropout_threshold;
        row0 = p.q_position;
        col0 = p.k_position;
    }

    // Keep flags of the four accumulator elements of one m16n8 tile: (i, j), (i, j+1),
    // (i+8, j), (i+8, j+1), where i is the tile's row g (i & 8 == 0) and j is even
    // (sequence-local coordinates; the global ones are drawn).
    CF_DEVICE void keep4(int bh, int i, int j, bool (&keep)[4]) const {
        i += row0;
        j += col0;
        const Philox4 r =
            philox4x32_10((u32)j >> 1, (u32)((i >> 4) * 8 + (i & 7)), (u32)bh, offset, key0, key1);
        keep[0] = r.x >= threshold;
        keep[1] = r.y >= threshold;
        keep[2] = r.z >= threshold;
        keep[3] = r.w >= threshold;
    }
};
