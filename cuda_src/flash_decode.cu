// Attention over a KV cache: decode, speculative decode, chunked prefill.
//
// Three kernels, launched in this order on one stream (cuflash/_kvcache.py):
//
//   cuflash_decode_append   writes the new keys/values (rotary applied to the keys) into the
//                           cache at rows cache_seqlens[b].., and the rotated queries into
//                           the q_rot workspace. Only when there is something to append.
//   cuflash_decode          split-KV attention (below).
//   cuflash_decode_combine  merges the splits' partial outputs by their LSE. Skipped when
//                           there is one split: cuflash_decode then writes out and lse.
//
// The attention is memory bound: every key and value of the cache is read once and used
// for a handful of query rows. So a thread block takes one (batch, kv head, 16-row query
// tile, key split), where the query rows are all query heads of that kv head times the
// query positions (GQA packing: K and V cross the memory bus once per kv head, not once
// per query head), and its warps split each key tile between them (warp w takes keys
// w * kWN .. w * kWN + kWN - 1 of every tile) rather than the query rows, which are too few
// to share. Each warp runs its own online softmax; the warps' (output, LSE) pairs merge at
// the end exactly as the splits' do in the combine kernel.
//
// Key tiles stream through a kStages-deep ring of cp.async buffers, so that
// (kStages - 1) tiles of K and V are in flight while one is being used: at 64 keys of
// d = 128 that is 32 KB per stage, 64 KB per block in flight at kStages = 3, two blocks
// per SM on Hopper.
//
// Compile-time configuration (set by cuflash/_decode_tiles.py):
//   CF_ELEM 0/1 = fp16/bf16, CF_HEAD_DIM (padded head dim, a multiple of 32),
//   CF_DEC_BLOCK_N (keys per tile), CF_DEC_WARPS, CF_DEC_STAGES, CF_DEC_SMEM (the dynamic
//   shared memory the host reserves; checked against the kernel's own count).
#include "common.cuh"
#include "decode_params.h"
#include "mma.cuh"
#include "softmax.cuh"
#include "tile_io.cuh"

// One sequence of the batch as the kernels see it. Lengths, batch indices and page
// numbers arrive in device memory that the host may not have checked (a CUDA graph
// replays with new values): each is clamped or tested here so that no read or write ever
// leaves the cache, whatever the values. Out-of-range values give wrong attention, never
// a stray access (the documentation says so).
struct DecodeSeq {
    int cache_len;  // rows before the append (absolute)
    int leftpad;    // first row of the sequence (absolute)
    int total;      // one past its last row (absolute), at most the capacity
    int seqlen_k;   // keys the queries see: total - leftpad
    int diag;       // local key aligned with query 0 (bottom-right)
    int cb;         // cache batch entry (contiguous caches)
    bool valid;

    CF_DEVICE DecodeSeq(const DecodeParams& p, int b) {
        const int len = p.cache_seqlens ? p.cache_seqlens[b] : p.seqlens_const;
        cache_len = min(max(len, 0), p.capacity);
        cb = p.cache_batch_idx ? p.cache_batch_idx[b] : b;
        valid = (p.flags & CFD_PAGED) || (cb >= 0 && cb < p.batch_cache);
        total = (int)min((i64)cache_len + p.seqlen_new, (i64)p.capacity);
        const int pad = p.cache_leftpad ? p.cache_leftpad[b] : 0;
        leftpad = min(max(pad, 0), total);
        seqlen_k = valid ? total - leftpad : 0;
        diag = seqlen_k - p.seqlen_q;
    }

    // Element offset of absolute row r of kv head hk in a cache with the given strides
    // (batch_stride: page stride of a paged cache); -1 when the row has no valid page.
    CF_DEVICE i64 row_offset(const DecodeParams& p, int b, int r, int hk, i64 batch_stride, i64 row_stride,
                             i64 head_stride) const {
        if (p.flags & CFD_PAGED) {
            const int page = p.block_table[(i64)b * p.block_table_batch_stride + r / p.page_size];
            if (page < 0 || page >= p.num_pages) return -1;
            return (i64)page * batch_stride + (i64)(r % p.page_size) * row_stride + (i64)hk * head_stride;
        }
        return (i64)cb * batch_stride + (i64)r * row_stride + (i64)hk * head_stride;
    }
};

template <typename T>
CF_DEVICE float rotary_value(const DecodeParams& p, const void* table, int pos, int k) {
    const i64 at = (i64)pos * p.rotary_row_stride + k;
    if (p.flags & CFD_ROTARY_F32) return static_cast<const float*>(table)[at];
    return to_float(static_cast<const T*>(table)[at]);
}

// Element c of one head's row after the rotary embedding at position pos. Interleaved
// (GPT-J): pairs (2k, 2k + 1); otherwise (GPT-NeoX): pairs (k, k + rotary_dim / 2). Each
// pair (a, b) turns by the angle of its k: (a cos - b sin, a sin + b cos). Columns from
// rotary_dim on are unchanged.
template <typename T>
CF_DEVICE float rotated(const DecodeParams& p, const T* row, int c, int pos) {
    const float x = to_float(row[c]);
    if (c >= p.rotary_dim) return x;
    int k, partner;
    bool first;
    if (p.flags & CFD_ROTARY_INTERLEAVED) {
        k = c >> 1;
        first = (c & 1) == 0;
        partner = c ^ 1;
    } else {
        const int half = p.rotary_dim >> 1;
        first = c < half;
        k = first ? c : c - half;
        partner = first ? c + half : c - half;
    }
    pos = min(max(pos, 0), p.seqlen_ro - 1);
    const float cs = rotary_value<T>(p, p.rotary_cos, pos, k), sn = rotary_value<T>(p, p.rotary_sin, pos, k);
    const float y = to_float(row[partner]);
    return first ? x * cs - y * sn : y * sn + x * cs;
}

// Blocks [0, batch * seqlen_new): new row i of sequence b, every kv head, into both
// caches (keys rotated when CFD_ROTARY). Then, with CFD_ROTARY, blocks
// [.., + batch * seqlen_q): query row i of sequence b, every head, rotated into q_rot.
template <typename T>
CF_DEVICE void append_rows(const DecodeParams& p) {
    const i64 kv_blocks = (p.flags & CFD_APPEND) ? (i64)p.batch * p.seqlen_new : 0;
    const i64 blk = blockIdx.x;
    const bool rotary = p.flags & CFD_ROTARY;
    if (blk < kv_blocks) {
        const int b = (int)(blk / p.seqlen_new), i = (int)(blk % p.seqlen_new);
        const DecodeSeq seq(p, b);
        const int r = seq.cache_len + i;
        if (!seq.valid || r >= p.capacity) return;  // past the cache: dropped, never written
        const T* k_src = static_cast<const T*>(p.k_new) + (i64)b * p.kn_batch_stride + (i64)i * p.kn_row_stride;
        const T* v_src = static_cast<const T*>(p.v_new) + (i64)b * p.vn_batch_stride + (i64)i * p.vn_row_stride;
        for (int e = threadIdx.x; e < p.num_heads_kv * p.head_dim; e += blockDim.x) {
            const int hk = e / p.head_dim, c = e % p.head_dim;
            const i64 k_at = seq.row_offset(p, b, r, hk, p.kc_batch_stride, p.kc_row_stride, p.kc_head_stride);
            const i64 v_at = seq.row_offset(p, b, r, hk, p.vc_batch_stride, p.vc_row_stride, p.vc_head_stride);
            if (k_at < 0 || v_at < 0) continue;
            const T* k_row = k_src + (i64)hk * p.kn_head_stride;
            const T kv = rotary ? from_float<T>(rotated<T>(p, k_row, c, r)) : k_row[c];
            static_cast<T*>(p.k_cache)[k_at + c] = kv;
            static_cast<T*>(p.v_cache)[v_at + c] = v_src[(i64)hk * p.vn_head_stride + c];
        }
        return;
    }
    if (!rotary) return;
    const i64 q_blk = blk - kv_blocks;
    if (q_blk >= (i64)p.batch * p.seqlen_q) return;
    const int b = (int)(q_blk / p.seqlen_q), i = (int)(q_blk % p.seqlen_q);
    const DecodeSeq seq(p, b);
    // Causal or windowed: query i sits at position cache_len + i; otherwise every query
    // takes position cache_len (FlashAttention-2's convention).
    const int pos = seq.cache_len + ((p.flags & CFD_ROTARY_Q_SEQUENTIAL) ? i : 0);
    const T* q_src = static_cast<const T*>(p.q) + (i64)b * p.q_batch_stride + (i64)i * p.q_row_stride;
    T* q_dst = static_cast<T*>(p.q_rot) + (i64)b * p.qr_batch_stride + (i64)i * p.qr_row_stride;
    for (int e = threadIdx.x; e < p.num_heads * p.head_dim; e += blockDim.x) {
        const int h = e / p.head_dim, c = e % p.head_dim;
        q_dst[(i64)h * p.qr_head_stride + c] = from_float<T>(rotated<T>(p, q_src + (i64)h * p.q_head_stride, c, pos));
    }
}

template <typename T, int kHeadDim, int kBlockN, int kWarps, int kStages>
struct DecodeKernel {
    static constexpr int kThreads = 32 * kWarps;
    static constexpr int kRows = 16;  // query rows per block: one m16 tile
    static constexpr int kLd = kHeadDim + SmemPad<T>::kElems;
    static constexpr int kWN = kBlockN / kWarps;  // keys per warp per tile
    static constexpr int kNT = kWN / 8;
    static constexpr int kDT = kHeadDim / 8;
    static constexpr int kChunksPerRow = kHeadDim * (int)sizeof(T) / 16;
    static constexpr int kTileChunks = kBlockN * kChunksPerRow;
    // Q fragments stay in registers up to d = 128 (32 registers); at d = 256 the output
    // alone takes 128 per thread, and Q is re-read from shared memory for each tile.
    static constexpr bool kQInRegs = kHeadDim <= 128;
    static constexpr int kQFrags = kQInRegs ? kHeadDim / 16 : 1;
    static constexpr int kOLd = kHeadDim + 4;  // fp32 rows of the warps' merge, 16 bytes apart in banks
    static constexpr int kQBytes = kRows * kLd * (int)sizeof(T);
    static constexpr int kStageBytes = 2 * kBlockN * kLd * (int)sizeof(T);
    static constexpr int kMergeBytes = kWarps * kRows * kOLd * 4;
    static constexpr int kSmemBytes = kQBytes + (kStages * kStageBytes > kMergeBytes ? kStages * kStageBytes : kMergeBytes);
    static_assert(kHeadDim % 32 == 0 && kWN % 16 == 0 && kStages >= 2, "tile shapes");
    static_assert(kTileChunks % kThreads == 0, "every thread moves the same number of 16-byte chunks per tile");

    // One tile of K and V (absolute rows n0 .. n0 + kBlockN - 1) into ring slot `slot`.
    // Rows outside the sequence, behind an invalid page, and the padded head-dim columns
    // are zero-filled without reading memory: a masked key's probability is exactly 0,
    // and 0 * (NaN left in an unwritten slot) would still be NaN.
    static CF_DEVICE void load_kv(const DecodeParams& p, const DecodeSeq& seq, int b, int hk, int n0, T* sK, T* sV,
                                  int tid) {
        const T* kc = static_cast<const T*>(p.k_cache);
        const T* vc = static_cast<const T*>(p.v_cache);
#pragma unroll
        for (int it = 0; it < kTileChunks / kThreads; ++it) {
            const int chunk = tid + it * kThreads;
            const int row = chunk / kChunksPerRow, col = (chunk % kChunksPerRow) * (16 / (int)sizeof(T));
            const int r = n0 + row;
            bool in = r >= seq.leftpad && r < seq.total && col < p.head_dim;
            i64 k_at = 0, v_at = 0;
            if (in) {
                k_at = seq.row_offset(p, b, r, hk, p.kc_batch_stride, p.kc_row_stride, p.kc_head_stride);
                v_at = seq.row_offset(p, b, r, hk, p.vc_batch_stride, p.vc_row_stride, p.vc_head_stride);
                in = k_at >= 0 && v_at >= 0;
            }
            cp_async_16(smem_addr(sK + row * kLd + col), in ? kc + k_at + col : kc, in);
            cp_async_16(smem_addr(sV + row * kLd + col), in ? vc + v_at + col : vc, in);
        }
    }

    static CF_DEVICE void run(const DecodeParams& p, char* smem) {
        const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
        const int g = lane >> 2, t = lane & 3;

        i64 linear = blockIdx.x;
        const int split = (int)(linear % p.num_splits);
        linear /= p.num_splits;
        const int m_block = (int)(linear % p.num_m_blocks);
        linear /= p.num_m_blocks;
        const int hk = (int)(linear % p.num_heads_kv), b = (int)(linear / p.num_heads_kv);
        const DecodeSeq seq(p, b);
        const int M = p.rows_per_head, m0 = m_block * kRows;
        const int rows = min(kRows, M - m0);

        // The tile's local key range [lo, hi) under causal/window limits, then this
        // split's share of the key tiles it covers (tiles in absolute rows, so a tile
        // never straddles a page: page sizes are multiples of 16 and tiles of kBlockN).
        const int i_first = m0 / p.group, i_last = (m0 + rows - 1) / p.group;
        i64 lo = 0, hi = seq.seqlen_k;
        if (p.window_right >= 0) hi = min(hi, (i64)i_last + seq.diag + p.window_right + 1);
        if (p.window_left >= 0) lo = max(lo, (i64)i_first + seq.diag - p.window_left);
        int t_lo = 0, t_hi = 0;
        if (hi > lo) {
            t_lo = (int)((seq.leftpad + lo) / kBlockN);
            t_hi = (int)((seq.leftpad + hi + kBlockN - 1) / kBlockN);
        }
        const int per_split = (t_hi - t_lo + p.num_splits - 1) / p.num_splits;
        const int my_lo = t_lo + split * per_split;
        const int n_tiles = max(0, min(t_hi, my_lo + per_split) - my_lo);

        // Each thread holds rows g and g + 8 of the tile: their allowed absolute key rows
        // [row_lo, row_hi], their ALiBi slope and the key row they are aligned with.
        int row_lo[2], row_hi[2];
        float slope[2], aligned_row[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int m = m0 + g + 8 * r;
            const int i = m / p.group, h = hk * p.group + m % p.group;
            i64 l = 0, u = (i64)seq.seqlen_k - 1;
            const i64 d = (i64)i + seq.diag;
            if (p.window_right >= 0) u = min(u, d + p.window_right);
            if (p.window_left >= 0) l = max(l, d - p.window_left);
            if (m >= M) u = -1;
            row_lo[r] = (int)(l + seq.leftpad);
            row_hi[r] = (int)max(u + seq.leftpad, (i64)-1);
            slope[r] = ((p.flags & CFD_ALIBI) && m < M) ? p.alibi[(i64)b * p.alibi_batch_stride + h] : 0.f;
            aligned_row[r] = (float)(d + seq.leftpad);
        }

        T* sQ = reinterpret_cast<T*>(smem);
        T* sKV = sQ + kRows * kLd;  // stage s: K at sKV + 2 s kBlockN kLd, V after it

        // Query rows (b, i, head hk * group + m % group): scattered rows, 16-byte chunks.
        const bool rotary = p.flags & CFD_ROTARY;
        const T* q = static_cast<const T*>(rotary ? p.q_rot : p.q);
        const i64 qbs = rotary ? p.qr_batch_stride : p.q_batch_stride;
        const i64 qrs = rotary ? p.qr_row_stride : p.q_row_stride;
        const i64 qhs = rotary ? p.qr_head_stride : p.q_head_stride;
        for (int chunk = tid; chunk < kRows * kChunksPerRow; chunk += kThreads) {
            const int row = chunk / kChunksPerRow, col = (chunk % kChunksPerRow) * (16 / (int)sizeof(T));
            const int m = m0 + row;
            const bool in = row < rows && col < p.head_dim && n_tiles > 0;
            const i64 at = in ? (i64)b * qbs + (i64)(m / p.group) * qrs + (i64)(hk * p.group + m % p.group) * qhs + col : 0;
            cp_async_16(smem_addr(sQ + row * kLd + col), q + at, in);
        }
#pragma unroll
        for (int s = 0; s < kStages - 1; ++s) {
            if (s < n_tiles) {
                T* sK = sKV + s * 2 * kBlockN * kLd;
                load_kv(p, seq, b, hk, (my_lo + s) * kBlockN, sK, sK + kBlockN * kLd, tid);
            }
            cp_async_commit();  // empty groups too: the wait counts below assume one per stage
        }

        float acc[kDT][4];
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;
        OnlineSoftmax<kNT> softmax;
        FragA<T> q_frags[kQFrags];
        const bool general = p.flags & (CFD_SOFTCAP | CFD_ALIBI);
        const float inv_softcap = p.softcap > 0.f ? 1.f / p.softcap : 0.f;

        for (int it = 0; it < n_tiles; ++it) {
            cp_async_wait<kStages - 2>();
            __syncthreads();  // tile `it` landed for every thread; every warp is done with tile it - 1
            if (kQInRegs && it == 0) {
#pragma unroll
                for (int kk = 0; kk < kQFrags; ++kk) load_a<T, kLd>(q_frags[kk], sQ, 0, kk * 16, lane);
            }
            {
                // Refill the slot tile it - 1 used.
                const int next = it + kStages - 1;
                if (next < n_tiles) {
                    T* sK = sKV + (next % kStages) * 2 * kBlockN * kLd;
                    load_kv(p, seq, b, hk, (my_lo + next) * kBlockN, sK, sK + kBlockN * kLd, tid);
                }
                cp_async_commit();
            }
            const T* sK = sKV + (it % kStages) * 2 * kBlockN * kLd;
            const T* sV = sK + kBlockN * kLd;
            const int n0 = (my_lo + it) * kBlockN;
            const int key0 = warp * kWN;  // this warp's keys within the tile

            float s[kNT][4];
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < kHeadDim / 16; ++kk) {
                FragA<T> a;
                if constexpr (kQInRegs) {
                    a = q_frags[kk];
                } else {
                    load_a<T, kLd>(a, sQ, 0, kk * 16, lane);
                }
#pragma unroll
                for (int np = 0; np < kNT / 2; ++np) {
                    FragB<T> b0, b1;
                    load_b2<T, kLd>(b0, b1, sK, key0 + np * 16, kk * 16, lane);
                    mma(s[2 * np], a, b0);
                    mma(s[2 * np + 1], a, b1);
                }
            }

            // Scores to log2 units; keys outside a row's allowed range to -inf (never a
            // finite sentinel: a row with no allowed key must come out as exactly 0).
            // Softcap and ALiBi follow cuflash.reference: softcap * tanh(x / softcap),
            // then - slope * |i + diag - j| in the sequence's local coordinates.
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = e >> 1, key = n0 + key0 + nt * 8 + 2 * t + (e & 1);
                    const bool ok = key >= row_lo[r] && key <= row_hi[r];
                    float x;
                    if (general) {
                        x = __fmul_rn(s[nt][e], p.softmax_scale);
                        if (p.flags & CFD_SOFTCAP) x = p.softcap * tanhf(x * inv_softcap);
                        if (p.flags & CFD_ALIBI) x -= slope[r] * fabsf(aligned_row[r] - (float)key);
                        x = __fmul_rn(x, CF_LOG2E);
                    } else {
                        x = __fmul_rn(s[nt][e], p.scale_log2);
                    }
                    s[nt][e] = ok ? x : -CF_INF;
                }

            softmax.step(s, acc);

#pragma unroll
            for (int kk = 0; kk < kWN / 16; ++kk) {
                FragA<T> a;
                acc_to_a<T>(a, s, kk);
#pragma unroll
                for (int dp = 0; dp < kDT / 2; ++dp) {
                    FragB<T> b0, b1;
                    load_b2_t<T, kLd>(b0, b1, sV, dp * 16, key0 + kk * 16, lane);
                    mma(acc[2 * dp], a, b0);
                    mma(acc[2 * dp + 1], a, b1);
                }
            }
        }

        // Merge the warps: each has a normalised output O_w and an LSE_w per row (-inf for
        // a row that saw no allowed key). With L = max_w LSE_w,
        //   O = sum_w exp(LSE_w - L) O_w / sum_w exp(LSE_w - L),  LSE = L + log(sum ...).
        float inv_sum[2], lse_w[2];
        softmax.finish(inv_sum, lse_w);
        cp_async_wait<0>();
        __syncthreads();  // every warp is done with the K/V ring: it becomes the merge area
        float* sO = reinterpret_cast<float*>(smem + kQBytes);
        __shared__ float s_lse[kWarps][kRows];
        __shared__ float s_weight[kWarps][kRows];
        __shared__ float s_lse_out[kRows];
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int row = g + 8 * r, col = dt * 8 + 2 * t;
                *reinterpret_cast<float2*>(sO + (warp * kRows + row) * kOLd + col) =
                    make_float2(acc[dt][2 * r] * inv_sum[r], acc[dt][2 * r + 1] * inv_sum[r]);
            }
        if (t == 0) {
            s_lse[warp][g] = lse_w[0];
            s_lse[warp][g + 8] = lse_w[1];
        }
        __syncthreads();
        if (tid < kRows) {
            float mx = -CF_INF;
#pragma unroll
            for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, s_lse[w][tid]);
            float sum = 0.f;
            float weight[kWarps];
#pragma unroll
            for (int w = 0; w < kWarps; ++w) {
                weight[w] = mx == -CF_INF ? 0.f : fast_exp2((s_lse[w][tid] - mx) * CF_LOG2E);
                sum += weight[w];
            }
#pragma unroll
            for (int w = 0; w < kWarps; ++w) s_weight[w][tid] = sum > 0.f ? weight[w] / sum : 0.f;
            s_lse_out[tid] = sum > 0.f ? mx + logf(sum) : -CF_INF;
        }
        __syncthreads();

        const bool direct = p.num_splits == 1;
        const i64 row_base = ((i64)split * p.batch + b) * p.num_heads_kv * M + (i64)hk * M;  // (split, b, hk, m = 0)
        for (int chunk = tid; chunk < kRows * (kHeadDim / 4); chunk += kThreads) {
            const int row = chunk / (kHeadDim / 4), col = (chunk % (kHeadDim / 4)) * 4;
            if (row >= rows || col >= p.head_dim) continue;
            float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int w = 0; w < kWarps; ++w) {
                const float wt = s_weight[w][row];
                const float4 x = *reinterpret_cast<const float4*>(sO + (w * kRows + row) * kOLd + col);
                o.x += wt * x.x;
                o.y += wt * x.y;
                o.z += wt * x.z;
                o.w += wt * x.w;
            }
            const int m = m0 + row;
            if (direct) {
                T* dst = static_cast<T*>(p.out) + (i64)b * p.o_batch_stride + (i64)(m / p.group) * p.o_row_stride +
                         (i64)(hk * p.group + m % p.group) * p.o_head_stride + col;
                uint2 packed;
                packed.x = pack2<T>(o.x, o.y);
                packed.y = pack2<T>(o.z, o.w);
                *reinterpret_cast<uint2*>(dst) = packed;
            } else {
                *reinterpret_cast<float4*>(p.o_accum + (row_base + m) * p.head_dim + col) = o;
            }
        }
        if (tid < rows) {
            const int m = m0 + tid;
            if (direct) {
                p.lse[(i64)b * p.lse_batch_stride + (i64)(hk * p.group + m % p.group) * p.lse_head_stride + m / p.group] =
                    s_lse_out[tid];
            } else {
                p.lse_accum[row_base + m] = s_lse_out[tid];
            }
        }
    }
};

// Merge the splits of one output row per warp: O = sum_s w_s O_s, w_s = exp(LSE_s - L) /
// sum_s exp(LSE_s - L) with L = max_s LSE_s; LSE = L + log(sum_s exp(LSE_s - L)). Splits
// that saw no key have LSE_s = -inf and weight 0; a row no split saw gets 0 and -inf.
template <typename T>
CF_DEVICE void combine_row(const DecodeParams& p) {
    const int lane = threadIdx.x & 31;
    const int M = p.rows_per_head;
    const i64 row = (i64)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    const i64 split_rows = (i64)p.batch * p.num_heads_kv * M;
    if (row >= split_rows) return;
    const int m = (int)(row % M);
    const i64 bh = row / M;
    const int hk = (int)(bh % p.num_heads_kv), b = (int)(bh / p.num_heads_kv);
    float mx = -CF_INF;
    for (int s = lane; s < p.num_splits; s += 32) mx = fmaxf(mx, p.lse_accum[s * split_rows + row]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.f;
    if (mx != -CF_INF)
        for (int s = lane; s < p.num_splits; s += 32) sum += fast_exp2((p.lse_accum[s * split_rows + row] - mx) * CF_LOG2E);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const int i = m / p.group, h = hk * p.group + m % p.group;
    T* dst = static_cast<T*>(p.out) + (i64)b * p.o_batch_stride + (i64)i * p.o_row_stride + (i64)h * p.o_head_stride;
    for (int col = lane * 4; col < p.head_dim; col += 128) {
        float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
        if (sum > 0.f) {
            for (int s = 0; s < p.num_splits; ++s) {
                const float l = p.lse_accum[s * split_rows + row];
                if (l == -CF_INF) continue;
                const float w = fast_exp2((l - mx) * CF_LOG2E) * inv;
                const float4 x = *reinterpret_cast<const float4*>(p.o_accum + (s * split_rows + row) * p.head_dim + col);
                o.x += w * x.x;
                o.y += w * x.y;
                o.z += w * x.z;
                o.w += w * x.w;
            }
        }
        uint2 packed;
        packed.x = pack2<T>(o.x, o.y);
        packed.y = pack2<T>(o.z, o.w);
        *reinterpret_cast<uint2*>(dst + col) = packed;
    }
    if (lane == 0) p.lse[(i64)b * p.lse_batch_stride + (i64)h * p.lse_head_stride + i] = sum > 0.f ? mx + logf(sum) : -CF_INF;
}

#if CF_ELEM == 0
typedef half_t ElemT;
#else
typedef bf16_t ElemT;
#endif

typedef DecodeKernel<ElemT, CF_HEAD_DIM, CF_DEC_BLOCK_N, CF_DEC_WARPS, CF_DEC_STAGES> DecodeConfig;
static_assert(DecodeConfig::kSmemBytes == CF_DEC_SMEM, "cuflash/_decode_tiles.py reserves a different shared-memory size");

extern "C" __global__ void __launch_bounds__(CF_DEC_WARPS * 32) cuflash_decode(const __grid_constant__ DecodeParams p) {
    extern __shared__ __align__(128) char smem[];
    DecodeConfig::run(p, smem);
}

extern "C" __global__ void __launch_bounds__(128) cuflash_decode_append(const __grid_constant__ DecodeParams p) {
    append_rows<ElemT>(p);
}

extern "C" __global__ void __launch_bounds__(128) cuflash_decode_combine(const __grid_constant__ DecodeParams p) {
    combine_row<ElemT>(p);
}
