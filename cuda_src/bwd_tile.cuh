// The backward's dK/dV work unit, shared by the portable and the Hopper kernels: a block
// owns a tile of keys of one (batch, kv head) and walks every query head of the kv group
// times the query tiles that can see those keys, flattened into one sequence.
#pragma once
#include "common.cuh"
#include "mask.cuh"

// Offset of row 0's entry in the row workspaces (lse_log2, dsum, the dQ accumulator's
// rows) for (batch b, head h).
CF_DEVICE i64 ws_offset(const Params& p, const SeqInfo& seq, int b, int h) {
    return seq.q_row0 + (i64)b * p.ws_batch_stride + (i64)h * p.ws_head_stride;
}

// The key tile of a dK/dV block: key tiles first, then (batch, kv head).
struct KeyBlock {
    int b, hk, n0;

    CF_DEVICE KeyBlock(const Params& p, int block_n) {
        const i64 linear = blockIdx.x;
        const int bhk = (int)(linear / p.num_n_blocks);
        b = bhk / p.num_heads_kv;
        hk = bhk % p.num_heads_kv;
        n0 = (int)(linear % p.num_n_blocks) * block_n;
    }
};

// Adds a warp's m16n8 accumulator rows of dQ (rows row0 and row0 + 8, column pairs
// col0 + 8j) into the fp32 dQ accumulator at workspace offset ws, rows below rows_q only.
// kPadded: columns from kHeadDim on are head-dim padding and are skipped.
template <int kHeadDim, bool kPadded, int NJ>
CF_DEVICE void add_dq_rows(const Params& p, i64 ws, int row0, int rows_q, int col0, const float (&acc)[NJ][4]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + 8 * r;
        if (row < rows_q) {
            float* dst = p.dq_accum + (ws + row) * kHeadDim + col0;
#pragma unroll
            for (int j = 0; j < NJ; ++j)
                if (!kPadded || col0 + 8 * j < kHeadDim) atomic_add2(dst + 8 * j, acc[j][2 * r], acc[j][2 * r + 1]);
        }
    }
}

// One step of the walk: query head h, rows [m0, m0 + rows_q), workspace offset of row m0.
struct QueryTile {
    int h, m0, rows_q;
    i64 ws;
};

// The flattened walk (query head of the group, query tile) of a key tile. Dense: every
// head sees the same query tiles, so step `it` is found by division. Block-sparse: each
// head has its own list, so a cursor steps through the heads' ranges; the kernels ask for
// steps in the order 0, 1, 0, 2, 1, 3, 2, ... (the next tile is loaded before the current
// one is computed), so the cursor keeps the step before its own as well.
template <typename T, bool kSparse = false>
struct KeyTileWalk {
    const Params& p;
    const SeqInfo& seq;
    int b, hk, group, block_m, m_lo, m_hi, per_head, iterations;
    // Block-sparse: the key tile's key block and the tiles per query block (log2); the
    // cursor: step cur_it is position cur_pos of head cur_h's range (tile cur_tile), and
    // step cur_it - 1 was tile prev_tile of head prev_h.
    int kb, shift;
    mutable int range_hi, cur_it, cur_h, cur_pos, cur_tile, prev_h, prev_tile;

    CF_DEVICE KeyTileWalk(const Params& p_, const SeqInfo& seq_, const IndexMask& index_mask, int b_, int hk_, int n0,
                          int block_n, int block_m_)
        : p(p_), seq(seq_), b(b_), hk(hk_), group(p_.num_heads / p_.num_heads_kv), block_m(block_m_) {
        index_mask.query_blocks(n0, block_n, block_m, m_lo, m_hi);
        if constexpr (kSparse) {
            kb = n0 / p.bs_block_k;
            shift = tiles_per_block_log2(p.bs_block_q, block_m);
            iterations = 0;
            if (p.bs_heads == 1) {
                iterations = group * head_range(0).count();  // one list for every head
            } else {
                for (int hl = 0; hl < group; ++hl) iterations += head_range(hl).count();
            }
            cur_it = cur_h = -1;
            cur_pos = range_hi = 0;
            cur_tile = prev_h = prev_tile = 0;
        } else {
            per_head = max(m_hi - m_lo, 0);
            iterations = group * per_head;
        }
    }

    // Block-sparse: the query tiles of the group's head hl (0 <= hl < group).
    CF_DEVICE TileRange<true> head_range(int hl) const {
        const i64 row = block_list_row(p, b, hk * group + hl, kb, p.bs_k_blocks);
        return TileRange<true>(p.bs_q_index + row * p.bs_q_blocks, p.bs_q_count[row], shift, m_lo, m_hi);
    }

    CF_DEVICE QueryTile tile(int hl, int m_block) const {
        QueryTile t;
        t.h = hk * group + hl;
        t.m0 = m_block * block_m;
        t.rows_q = min(block_m, seq.seqlen_q - t.m0);
        t.ws = ws_offset(p, seq, b, t.h) + t.m0;
        return t;
    }

    CF_DEVICE QueryTile at(int it) const {
        if constexpr (kSparse) {
            if (it == cur_it - 1) return tile(prev_h, prev_tile);
            if (it != cur_it) {  // it == cur_it + 1 (it < iterations): step the cursor
                prev_h = cur_h;
                prev_tile = cur_tile;
                ++cur_pos;
                while (cur_pos >= range_hi) {  // the next head with a tile
                    const TileRange<true> r = head_range(++cur_h);
                    cur_pos = r.lo;
                    range_hi = r.hi;
                }
                const i64 row = block_list_row(p, b, hk * group + cur_h, kb, p.bs_k_blocks);
                cur_tile = TileRange<true>::tile_at(p.bs_q_index + row * p.bs_q_blocks, shift, cur_pos);
                cur_it = it;
            }
            return tile(cur_h, cur_tile);
        } else {
            return tile(it / per_head, m_lo + it % per_head);
        }
    }

    // First rows of the tiles in global memory.
    CF_DEVICE const T* q(const QueryTile& t) const {
        return static_cast<const T*>(p.q) + seq.q_offset(p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, t.h) +
               (i64)t.m0 * p.q_row_stride;
    }
    CF_DEVICE const T* dout(const QueryTile& t) const {
        return static_cast<const T*>(p.dout) + seq.q_offset(p.do_batch_stride, p.do_row_stride, p.do_head_stride, b, t.h) +
               (i64)t.m0 * p.do_row_stride;
    }
    CF_DEVICE const T* k(int n0) const {
        return static_cast<const T*>(p.k) + seq.k_offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, hk) +
               (i64)n0 * p.k_row_stride;
    }
    CF_DEVICE const T* v(int n0) const {
        return static_cast<const T*>(p.v) + seq.k_offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, hk) +
               (i64)n0 * p.v_row_stride;
    }
    CF_DEVICE T* dk(int n0) const {
        return static_cast<T*>(p.dk) + seq.k_offset(p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, b, hk) +
               (i64)n0 * p.dk_row_stride;
    }
    CF_DEVICE T* dv(int n0) const {
        return static_cast<T*>(p.dv) + seq.k_offset(p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, b, hk) +
               (i64)n0 * p.dv_row_stride;
    }
};
