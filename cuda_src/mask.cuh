// Which keys a query may attend, and the score modifiers.
//
// Index rules (causal, sliding window, sequence ends) decide which tiles run at all and
// which need per-element masking: a tile strictly inside the allowed band runs with no
// mask arithmetic. Disallowed scores become -inf, never a large negative number: a finite
// sentinel leaks probability mass into rows whose every key is masked and breaks the
// "fully masked row gives 0" promise.
#pragma once
#include "common.cuh"

#ifndef CF_BLOCK_SPARSE
#define CF_BLOCK_SPARSE 0  // 1: kernels walk block-sparse lists (Params::bs_*)
#endif

// One sequence of the batch: its lengths, where its rows start in a packed (varlen)
// batch, and its diagonal (the key aligned with query 0). Global positions (a chunk of a
// longer sequence: query row i at q_position + i, key j at k_position + j) shift the
// diagonal by q_position - k_position, so causal, windows and ALiBi see global distances.
struct SeqInfo {
    int seqlen_q, seqlen_k;
    i64 q_row0, k_row0;
    int diag;

    CF_DEVICE SeqInfo(const Params& p, int b) {
        if (p.flags & CF_IS_VARLEN) {
            const int q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
            q_row0 = q0;
            k_row0 = k0;
            seqlen_q = p.cu_seqlens_q[b + 1] - q0;
            seqlen_k = p.cu_seqlens_k[b + 1] - k0;
        } else {
            q_row0 = k_row0 = 0;
            seqlen_q = p.seqlen_q;
            seqlen_k = p.seqlen_k;
        }
        diag = (p.bottom_right ? seqlen_k - seqlen_q : 0) + (p.q_position - p.k_position);
    }

    // Element offset of (row 0, head h) of a tensor in batch b. A packed (varlen) batch
    // has batch stride 0 (set by the host) and starts at the sequence's first packed row.
    CF_DEVICE i64 q_offset(i64 batch_stride, i64 row_stride, i64 head_stride, int b, int h) const {
        return q_row0 * row_stride + (i64)b * batch_stride + (i64)h * head_stride;
    }
    CF_DEVICE i64 k_offset(i64 batch_stride, i64 row_stride, i64 head_stride, int b, int h) const {
        return k_row0 * row_stride + (i64)b * batch_stride + (i64)h * head_stride;
    }
};

// The query tile of a block of the forward and the deterministic dQ kernels: blocks walk
// the query tiles from the last (the heaviest under causal masking, so they start first),
// then (batch, head). A persistent kernel passes the linear index of each tile it takes.
struct QueryBlock {
    int bh, b, h, hk, m0;

    CF_DEVICE QueryBlock(const Params& p, int block_m, i64 linear = blockIdx.x) {
        const int m_block = p.num_m_blocks - 1 - (int)(linear % p.num_m_blocks);
        bh = (int)(linear / p.num_m_blocks);
        b = bh / p.num_heads;
        h = bh % p.num_heads;
        hk = h / (p.num_heads / p.num_heads_kv);
        m0 = m_block * block_m;
    }
};

// The kernel tiles one tile walks along the other axis (key tiles of a query tile, or
// query tiles of a key tile): positions [lo, hi), position i being tile at(i), ascending.
// Dense: the index rules' tile range itself (at(i) = i, so a dense walk compiles to the
// plain loop over tile indices). Block-sparse: positions in the list of the listed blocks
// expanded to tiles (each block is 2^shift tiles), clipped to the index rules' range; the
// list is ascending, so the clipped tiles are one contiguous run of positions, found by
// two binary searches over the (L2-resident) list before the walk starts.
template <bool kSparse>
struct TileRange;

template <>
struct TileRange<false> {
    int lo, hi;
    CF_DEVICE TileRange(int lo_, int hi_) : lo(lo_), hi(hi_) {}
    CF_DEVICE int at(int i) const { return i; }
    CF_DEVICE int count() const { return hi > lo ? hi - lo : 0; }
};

template <>
struct TileRange<true> {
    const int* blocks;
    int shift, lo, hi;

    CF_DEVICE TileRange() : blocks(nullptr), shift(0), lo(0), hi(0) {}
    CF_DEVICE TileRange(const int* blocks_, int num_blocks, int shift_, int lo_tile, int hi_tile)
        : blocks(blocks_), shift(shift_) {
        lo = expanded_lower_bound(num_blocks, lo_tile);
        hi = max(expanded_lower_bound(num_blocks, hi_tile), lo);
    }
    CF_DEVICE int at(int i) const { return tile_at(blocks, shift, i); }
    static CF_DEVICE int tile_at(const int* blocks, int shift, int i) {
        return (blocks[i >> shift] << shift) + (i & ((1 << shift) - 1));
    }
    CF_DEVICE int count() const { return hi - lo; }
    // The first position of the expanded list whose tile is >= x (x >= 0).
    CF_DEVICE int expanded_lower_bound(int num_blocks, int x) const {
        const int block = x >> shift;
        int lo = 0, hi = num_blocks;
        while (lo < hi) {
            const int mid = (lo + hi) >> 1;
            if (blocks[mid] < block) lo = mid + 1;
            else hi = mid;
        }
        const int e = lo << shift;
        return (lo < num_blocks && blocks[lo] == block) ? e + (x & ((1 << shift) - 1)) : e;
    }
};

// log2 of the tiles per block (block and tile sizes are powers of two, tile <= block).
CF_DEVICE int tiles_per_block_log2(int block, int tile) { return __ffs(block / tile) - 1; }

// The block-sparse list row of (batch b, head h, block `blk`) among `blocks` blocks along
// the listed axis; broadcast batch and head dimensions have size 1.
CF_DEVICE i64 block_list_row(const Params& p, int b, int h, int blk, int blocks) {
    const i64 bb = p.bs_batches > 1 ? b : 0, hh = p.bs_heads > 1 ? h : 0;
    return (bb * p.bs_heads + hh) * blocks + blk;
}

// Whether block-sparse lists allow (query i, key j) of (b, h): a scan of query block
// i's list, for the one-element-per-thread probabilities kernel only.
CF_DEVICE bool block_allows(const Params& p, int b, int h, int i, int j) {
    const i64 row = block_list_row(p, b, h, i / p.bs_block_q, p.bs_q_blocks);
    const int* list = p.bs_kv_index + row * p.bs_k_blocks;
    const int n = p.bs_kv_count[row], kb = j / p.bs_block_k;
    for (int e = 0; e < n; ++e)
        if (list[e] == kb) return true;
    return false;
}

// Causal and sliding-window limits. left/right < 0 mean unbounded; the host folds
// `causal` into right = 0.
struct IndexMask {
    int seqlen_q, seqlen_k, diag, left, right;

    CF_DEVICE IndexMask(const Params& p, const SeqInfo& s)
        : seqlen_q(s.seqlen_q), seqlen_k(s.seqlen_k), diag(s.diag), left(p.window_left), right(p.window_right) {}

    // The keys [lo, hi] that query row i may attend (hi < lo when there are none).
    // Computed once per row, so masking an element is two integer compares and a
    // select, with no branch: a per-element branch splits the softmax into tiny basic
    // blocks that the scheduler cannot interleave.
    CF_DEVICE void row_limits(int i, int& lo, int& hi) const {
        const i64 d = (i64)i + diag;
        i64 h = seqlen_k - 1, l = 0;
        if (right >= 0) h = min(h, d + right);
        if (left >= 0) l = max(l, d - left);
        lo = (int)min(l, (i64)seqlen_k);
        hi = (int)max(h, (i64)-1);
    }

    // The queries [lo, hi] that may attend key j (hi < lo when there are none): the
    // transpose of row_limits, for kernels whose accumulator rows are keys.
    CF_DEVICE void col_limits(int j, int& lo, int& hi) const {
        const i64 d = (i64)j - diag;
        i64 l = 0, h = seqlen_q - 1;
        if (right >= 0) l = max(l, d - right);
        if (left >= 0) h = min(h, d + left);
        if (j >= seqlen_k) h = -1;
        lo = (int)min(l, (i64)seqlen_q);
        hi = (int)max(h, (i64)-1);
    }

    // Key blocks [lo, hi) that rows [m0, m0 + M) may attend.
    CF_DEVICE void key_blocks(int m0, int M, int N, int& lo, int& hi) const {
        hi = (seqlen_k + N - 1) / N;
        lo = 0;
        if (right >= 0) {
            const i64 last_row = (i64)min(m0 + M, seqlen_q) - 1;
            const i64 max_key = last_row + diag + right;
            hi = (int)min((i64)hi, floor_div(max_key, N) + 1);
        }
        if (left >= 0) {
            const i64 min_key = (i64)m0 + diag - left;
            lo = (int)max((i64)0, floor_div(min_key, N));
        }
    }

    // Query blocks [lo, hi) that may attend keys [n0, n0 + N).
    CF_DEVICE void query_blocks(int n0, int N, int M, int& lo, int& hi) const {
        hi = (seqlen_q + M - 1) / M;
        lo = 0;
        if (right >= 0) {
            const i64 first_row = (i64)n0 - diag - right;
            lo = (int)max((i64)0, floor_div(first_row, M));
        }
        if (left >= 0) {
            const i64 last_key = (i64)min(n0 + N, seqlen_k) - 1;
            const i64 last_row = last_key - diag + left;
            hi = (int)min((i64)hi, floor_div(last_row, M) + 1);
        }
    }

    // The key tiles (N keys each) that query tile [m0, m0 + M) of (b, h) computes: the
    // index rules' range and, block-sparse, only the listed key blocks of the query block
    // holding the tile (M divides the query block).
    template <bool kSparse>
    CF_DEVICE TileRange<kSparse> key_tiles(const Params& p, int b, int h, int m0, int M, int N) const {
        int lo, hi;
        key_blocks(m0, M, N, lo, hi);
        if constexpr (kSparse) {
            const i64 row = block_list_row(p, b, h, m0 / p.bs_block_q, p.bs_q_blocks);
            return TileRange<true>(p.bs_kv_index + row * p.bs_k_blocks, p.bs_kv_count[row],
                                   tiles_per_block_log2(p.bs_block_k, N), lo, hi);
        } else {
            return TileRange<false>(lo, hi);
        }
    }

    // The query tiles (M rows each) of query head h that key tile [n0, n0 + N) of batch b
    // is seen by: the transpose of key_tiles, from the transposed lists.
    template <bool kSparse>
    CF_DEVICE TileRange<kSparse> query_tiles(const Params& p, int b, int h, int n0, int N, int M) const {
        int lo, hi;
        query_blocks(n0, N, M, lo, hi);
        if constexpr (kSparse) {
            const i64 row = block_list_row(p, b, h, n0 / p.bs_block_k, p.bs_k_blocks);
            return TileRange<true>(p.bs_q_index + row * p.bs_q_blocks, p.bs_q_count[row],
                                   tiles_per_block_log2(p.bs_block_q, M), lo, hi);
        } else {
            return TileRange<false>(lo, hi);
        }
    }

    // True when every (i, j) of the tile is allowed, so no element needs masking.
    CF_DEVICE bool tile_is_full(int m0, int M, int n0, int N) const {
        if (n0 + N > seqlen_k) return false;
        if (right >= 0 && (i64)n0 + N - 1 > (i64)m0 + diag + right) return false;
        if (left >= 0 && (i64)n0 < (i64)m0 + M - 1 + diag - left) return false;
        return true;
    }
};

// The general variant's score modifiers for one (batch, head) of one sequence.
struct ScoreMods {
    int flags, diag;
    float scale, softcap, inv_softcap, slope;
    const void* bias;
    const unsigned char* mask;
    i64 bias_row_stride, bias_col_stride, mask_row_stride, mask_col_stride;

    CF_DEVICE ScoreMods(const Params& p, const SeqInfo& s, int b, int h) {
        flags = p.flags;
        diag = s.diag;
        scale = p.softmax_scale;
        softcap = p.softcap;
        inv_softcap = p.softcap > 0.f ? 1.f / p.softcap : 0.f;
        slope = (flags & CF_HAS_ALIBI) ? p.alibi[(i64)b * p.alibi_batch_stride + h] : 0.f;
        bias = p.bias;
        mask = p.mask;
        if (flags & CF_HAS_BIAS) {
            const int elem = (flags & CF_BIAS_IS_F32) ? 4 : 2;
            bias = static_cast<const char*>(p.bias) +
                   elem * ((i64)b * p.bias_batch_stride + (i64)h * p.bias_head_stride);
        }
        if (flags & CF_HAS_MASK) mask = p.mask + (i64)b * p.mask_batch_stride + (i64)h * p.mask_head_stride;
        bias_row_stride = p.bias_row_stride;
        bias_col_stride = p.bias_col_stride;
        mask_row_stride = p.mask_row_stride;
        mask_col_stride = p.mask_col_stride;
    }

    CF_DEVICE float bias_at(int i, int j) const {
        const i64 at = (i64)i * bias_row_stride + (i64)j * bias_col_stride;
        if (flags & CF_BIAS_IS_F32) return static_cast<const float*>(bias)[at];
        if (flags & CF_BIAS_IS_BF16) return to_float(static_cast<const bf16_t*>(bias)[at]);
        return to_float(static_cast<const half_t*>(bias)[at]);
    }

    // A warp's accumulator row block (NT n8 tiles along the keys) from raw products q.k to
    // scores in log2 units, -inf where (i, j) is disallowed. i0 is the block's row g (the
    // thread holds rows i0 and i0 + 8), j0 the key of tile 0's first element (2t).
    // Each modifier is one pass over the block behind one uniform test of its flag: a
    // per-element test of every flag would split the block into tiny basic blocks that
    // the scheduler cannot overlap. Bias and mask are read only where the index rules
    // allow (i, j), which also keeps the reads in bounds. With kKeepTanh, `tanh_out`
    // receives tanh(x / softcap) for the softcap gradient.
    template <int NT, bool kKeepTanh>
    CF_DEVICE void to_log2(float (&s)[NT][4], float (&tanh_out)[NT][4], int i0, int j0,
                           const IndexMask& index_mask) const {
        int lo[2], hi[2];
        bool row_in[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            index_mask.row_limits(i0 + 8 * r, lo[r], hi[r]);
            row_in[r] = i0 + 8 * r < index_mask.seqlen_q;
        }
        bool ok[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1, j = j0 + nt * 8 + (e & 1);
                ok[nt][e] = row_in[r] && j >= lo[r] && j <= hi[r];
                s[nt][e] = __fmul_rn(s[nt][e], scale);  // rounded alone, identically in forward and backward
            }
        if (flags & CF_HAS_SOFTCAP) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float t = tanhf(s[nt][e] * inv_softcap);
                    if constexpr (kKeepTanh) tanh_out[nt][e] = t;
                    s[nt][e] = softcap * t;
                }
        }
        if (flags & CF_HAS_ALIBI) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = i0 + 8 * (e >> 1), j = j0 + nt * 8 + (e & 1);
                    s[nt][e] -= slope * fabsf((float)(i + diag - j));
                }
        }
        if (flags & CF_HAS_BIAS) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (ok[nt][e]) s[nt][e] += bias_at(i0 + 8 * (e >> 1), j0 + nt * 8 + (e & 1));
        }
        if (flags & CF_HAS_MASK) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (ok[nt][e])
                        ok[nt][e] = mask[(i64)(i0 + 8 * (e >> 1)) * mask_row_stride +
                                         (i64)(j0 + nt * 8 + (e & 1)) * mask_col_stride] != 0;
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] = ok[nt][e] ? __fmul_rn(s[nt][e], CF_LOG2E) : -CF_INF;
    }

    // One element (the probabilities debugging kernel): the same rules as to_log2.
    CF_DEVICE float to_log2_one(float qk, int i, int j, bool index_ok) const {
        float x = __fmul_rn(qk, scale);
        if (flags & CF_HAS_SOFTCAP) x = softcap * tanhf(x * inv_softcap);
        if (!index_ok) return -CF_INF;
        if (flags & CF_HAS_ALIBI) x -= slope * fabsf((float)(i + diag - j));
        if (flags & CF_HAS_BIAS) x += bias_at(i, j);
        if ((flags & CF_HAS_MASK) && !mask[(i64)i * mask_row_stride + (i64)j * mask_col_stride]) return -CF_INF;
        return __fmul_rn(x, CF_LOG2E);
    }
};
