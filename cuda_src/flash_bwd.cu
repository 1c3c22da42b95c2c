// Attention backward (FlashAttention-2 algorithm on mma.sync tensor cores).
//
// Probabilities are recomputed from Q, K and the forward's LSE; nothing of size N^2 is
// stored (except the optional dense bias gradient). Four kernels:
//
//   cuflash_bwd_prep     Dsum = rowsum(dO * O), LSE in log2 units (+inf for rows with no
//                        allowed key, so exp2(s - lse) = 0 there), dQ accumulator zeroed.
//   cuflash_bwd_dkdv     one block per (batch, kv head, key tile): K, V stay in shared
//                        memory; for every query head of the group and every query tile
//                          S = Q Kᵀ, dP = dO Vᵀ, P = exp2(S - lse), dS = P (dP - Dsum)
//                          dV += Pᵀ dO, dK += dSᵀ Q, and (atomic mode) dQ += dS K into an
//                        fp32 accumulator with red.add.
//   cuflash_bwd_dq       deterministic mode: one block per (batch, head, query tile) walks
//                        the key tiles and accumulates dQ = dS K in registers (no atomics).
//   cuflash_bwd_dq_convert  atomic mode: dQ accumulator * scale -> dQ in the input dtype.
//
// Dropout multiplies P and dP by keep / (1 - p), with the keep mask regenerated from the
// same Philox counters as the forward. The softcap derivative (1 - tanh^2) and the bias
// gradient (dS itself) are applied in the general variant only.
//
// Compile-time configuration (cuflash/_tiles.py): CF_ELEM, CF_HEAD_DIM, CF_GENERAL,
// CF_BWD_BLOCK_M, CF_BWD_BLOCK_N, CF_BWD_WARPS, CF_BWD_STAGES (dK/dV kernel; 2 stages
// load the next query tile's Q and dO while this one computes), CF_BWD_WM_S, CF_BWD_WN_KV,
// CF_BWD_WM_Q (its warp layouts; 0 = rows first) and CF_DQ_BLOCK_M,
// CF_DQ_BLOCK_N, CF_DQ_WARPS (deterministic dQ kernel), CF_BLOCK_SPARSE (every kernel
// visits only the listed blocks: dQ a query tile's key blocks, dK/dV a key tile's query
// blocks from the transposed lists; TileRange in mask.cuh, KeyTileWalk in bwd_tile.cuh).
#include "bwd_tile.cuh"
#include "common.cuh"
#include "mask.cuh"
#include "mma.cuh"
#include "philox.cuh"
#include "tile_io.cuh"

#if CF_ELEM == 0
typedef half_t ElemT;
#elif CF_ELEM == 1
typedef bf16_t ElemT;
#else
typedef float ElemT;
#endif

// Recomputes P for the four accumulator elements of an m16n8 tile and combines them
// with dP into dS. On return `s` holds the probabilities that multiply dO in dV
// (dropped and rescaled) and `dp` holds dS (the score gradient, times the softcap
// derivative).
template <bool kGeneral>
struct GradElem {
    const Params& p;
    const IndexMask& index_mask;
    const ScoreMods& mods;
    const SeqInfo& seq;
    int b, h, bh;
    DropoutRng rng;

    // Key limits of rows i and i + 8 (see IndexMask::row_limits).
    CF_DEVICE void row_limits(int i, int (&lo)[2], int (&hi)[2]) const {
        index_mask.row_limits(i, lo[0], hi[0]);
        index_mask.row_limits(i + 8, lo[1], hi[1]);
    }

    // Elements (i, j), (i, j+1), (i+8, j), (i+8, j+1) with i the tile's row g and j even.
    // s: raw products q.k (basic variant) or scores already in log2 units (general
    // variant: ScoreMods::to_log2, with `th` the tanh values for the softcap gradient).
    // `full`: the whole tile is allowed (no index masking needed).
    CF_DEVICE void tile4(float (&s)[4], float (&dp)[4], const float (&th)[4], int i, int j, bool full,
                         const int (&lo)[2], const int (&hi)[2], const float (&lse2)[2],
                         const float (&dsum)[2]) const {
        bool keep[4] = {true, true, true, true};
        const bool dropout = kGeneral && (p.flags & CF_HAS_DROPOUT);
        if (dropout) rng.keep4(bh, i, j, keep);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r = e >> 1, ii = i + 8 * r, jj = j + (e & 1);
            float x;
            if constexpr (kGeneral) {
                x = s[e];
            } else {
                const bool in_band = jj >= lo[r] && jj <= hi[r];
                x = (full || in_band) ? __fmul_rn(s[e], p.scale_log2) : -CF_INF;  // as the forward rounds it
            }
            // x <= lse in exact arithmetic; the LSE's round trip through natural log can
            // leave x - lse a few ulps of |x| above 0, which for huge scores would
            // overflow exp2. Clamp at 0 (a comparison, so NaN still propagates). lse2 is
            // +inf on padded rows: P = 0 there.
            float expo = x - lse2[r];
            expo = expo > 0.f ? 0.f : expo;
            const float prob = fast_exp2(expo);
            float dprob = dp[e];
            float pv = prob;
            if (dropout) {
                pv = keep[e] ? prob * p.dropout_scale : 0.f;
                dprob = keep[e] ? dprob * p.dropout_scale : 0.f;
            }
            float ds = prob * (dprob - dsum[r]);
            if constexpr (kGeneral) {
                if ((p.flags & CF_WANT_DBIAS) && ii < seq.seqlen_q && jj < seq.seqlen_k)
                    p.dbias_full[(i64)b * p.dbias_batch_stride + (i64)h * p.dbias_head_stride +
                                 (i64)ii * p.dbias_row_stride + jj] = ds;
                if (p.flags & CF_HAS_SOFTCAP) ds *= 1.f - th[e] * th[e];
            }
            s[e] = pv;
            dp[e] = ds;
        }
    }
};

// ---- preprocess --------------------------------------------------------------------------

// 16 bytes of two rows, elementwise product summed in element order (8 16-bit or 4 fp32
// elements).
template <typename T>
CF_DEVICE float dot16(const uint4& a, const uint4& b) {
    const u32 x[4] = {a.x, a.y, a.z, a.w}, y[4] = {b.x, b.y, b.z, b.w};
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
        if constexpr (ElemInfo<T>::kIsFloat) {
            sum += __uint_as_float(x[w]) * __uint_as_float(y[w]);
        } else {
            sum += to_float(T{(unsigned short)(x[w] & 0xffffu)}) * to_float(T{(unsigned short)(y[w] & 0xffffu)});
            sum += to_float(T{(unsigned short)(x[w] >> 16)}) * to_float(T{(unsigned short)(y[w] >> 16)});
        }
    }
    return sum;
}

// One warp per row at a time, kBatch rows in flight: a memory-bound pass over dO and O,
// with 16-byte loads where the rows allow them.
template <typename T, int kHeadDim>
CF_DEVICE void bwd_prep(const Params& p) {
    constexpr int kRows = 64, kWarps = 4, kBatch = 4, kVec = 16 / (int)sizeof(T);
    constexpr int kChunkSteps = (kHeadDim / kVec + 31) / 32;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int num_row_blocks = (p.seqlen_q + kRows - 1) / kRows;
    const i64 linear = blockIdx.x;
    const int row_block = (int)(linear % num_row_blocks);
    const int bh = (int)(linear / num_row_blocks);
    const int b = bh / p.num_heads, h = bh % p.num_heads;
    const SeqInfo seq(p, b);
    const T* dout = static_cast<const T*>(p.dout) + seq.q_offset(p.do_batch_stride, p.do_row_stride, p.do_head_stride, b, h);
    const T* out = static_cast<const T*>(p.out) + seq.q_offset(p.o_batch_stride, p.o_row_stride, p.o_head_stride, b, h);
    const float* lse = p.lse + seq.q_offset(p.lse_batch_stride, 1, p.lse_head_stride, b, h);
    const i64 ws = ws_offset(p, seq, b, h);
    const bool vec = (p.aligned & CF_ALIGN_DO) && (p.aligned & CF_ALIGN_O);
    const int chunks = p.head_dim / kVec;
    for (int r0 = warp * kBatch; r0 < kRows; r0 += kWarps * kBatch) {
        float sum[kBatch];
        if (vec) {
            uint4 x[kBatch][kChunkSteps], y[kBatch][kChunkSteps];
#pragma unroll
            for (int j = 0; j < kBatch; ++j) {
                const int i = row_block * kRows + r0 + j;
#pragma unroll
                for (int c = 0; c < kChunkSteps; ++c) {
                    const int chunk = lane + 32 * c;
                    x[j][c] = y[j][c] = make_uint4(0u, 0u, 0u, 0u);
                    if (i < seq.seqlen_q && chunk < chunks) {
                        x[j][c] = *reinterpret_cast<const uint4*>(dout + (i64)i * p.do_row_stride + chunk * kVec);
                        y[j][c] = *reinterpret_cast<const uint4*>(out + (i64)i * p.o_row_stride + chunk * kVec);
                    }
                }
            }
#pragma unroll
            for (int j = 0; j < kBatch; ++j) {
                sum[j] = 0.f;
#pragma unroll
                for (int c = 0; c < kChunkSteps; ++c) sum[j] += dot16<T>(x[j][c], y[j][c]);
            }
        } else {
            // Element loads, summed in the vector path's order (bit-identical Dsum for the
            // same values in memory of any alignment).
#pragma unroll
            for (int j = 0; j < kBatch; ++j) {
                const int i = row_block * kRows + r0 + j;
                sum[j] = 0.f;
#pragma unroll
                for (int c = 0; c < kChunkSteps; ++c) {
                    const int d0 = (lane + 32 * c) * kVec;
                    float part = 0.f;
                    if (i < seq.seqlen_q)
                        for (int d = d0; d < min(d0 + kVec, p.head_dim); ++d)
                            part += to_float(dout[(i64)i * p.do_row_stride + d]) * to_float(out[(i64)i * p.o_row_stride + d]);
                    sum[j] += part;
                }
            }
        }
#pragma unroll
        for (int j = 0; j < kBatch; ++j) {
            const int i = row_block * kRows + r0 + j;
            float total = sum[j];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) total += __shfl_xor_sync(0xffffffffu, total, off);
            if (i >= seq.seqlen_q) continue;
            if (lane == 0) {
                const float l = lse[i];
                p.dsum[ws + i] = total;
                p.lse_log2[ws + i] = l == -CF_INF ? CF_INF : l * CF_LOG2E;
            }
            if (p.flags & CF_DQ_ATOMIC) {
                float4* acc = reinterpret_cast<float4*>(p.dq_accum + (ws + i) * kHeadDim);  // rows of 128-byte multiples
#pragma unroll
                for (int d = lane; d < kHeadDim / 4; d += 32) acc[d] = make_float4(0.f, 0.f, 0.f, 0.f);
            }
        }
    }
}

// ---- dK, dV (and atomic dQ) --------------------------------------------------------------

template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kNWarps, bool kGeneral, int kStages, int kWarpsMS,
          int kWarpsNKV, int kWarpsMQ, bool kSparse>
struct BwdKernel {
    static constexpr int kThreads = kNWarps * 32;
    static constexpr int kLd = kHeadDim + SmemPad<T>::kElems;   // Q, dO, K, V tiles
    static constexpr int kLdS = kBlockN + SmemPad<T>::kElems;   // P, dS tiles [kBlockM][kBlockN]
    // Warp layouts of the three products, as a grid (warps along the first dimension) x
    // (the rest). A warp reads its A rows and B columns from shared memory once per k-step,
    // so squarer sub-tiles read less: shared-memory bandwidth, not the tensor cores, bounds
    // this kernel. 0 selects rows first.
    // S and dP (kBlockM x kBlockN).
    static constexpr int kWmS = kWarpsMS ? kWarpsMS : (kNWarps < kBlockM / 16 ? kNWarps : kBlockM / 16);
    static constexpr int kWnS = kNWarps / kWmS;
    static constexpr int kMTs = kBlockM / kWmS / 16, kNTs = kBlockN / kWnS / 8;
    // dK, dV (kBlockN x kHeadDim).
    static constexpr int kWnKV = kWarpsNKV ? kWarpsNKV : (kNWarps < kBlockN / 16 ? kNWarps : kBlockN / 16);
    static constexpr int kWdKV = kNWarps / kWnKV;
    static constexpr int kMTkv = kBlockN / kWnKV / 16, kDTkv = kHeadDim / kWdKV / 8;
    // dQ (kBlockM x kHeadDim).
    static constexpr int kWmQ = kWarpsMQ ? kWarpsMQ : kWmS, kWdQ = kNWarps / kWmQ;
    static constexpr int kMTq = kBlockM / kWmQ / 16, kDTq = kHeadDim / kWdQ / 8;
    static_assert(kWmS * kWnS == kNWarps && kWnKV * kWdKV == kNWarps && kWmQ * kWdQ == kNWarps, "warp layout");
    static_assert(kMTs * kWmS * 16 == kBlockM && kNTs * kWnS * 8 == kBlockN, "S tiles split evenly");
    static_assert(kMTkv * kWnKV * 16 == kBlockN && kDTkv * kWdKV * 8 == kHeadDim, "dK/dV tiles split evenly");
    static_assert(kMTq * kWmQ * 16 == kBlockM && kDTq * kWdQ * 8 == kHeadDim, "dQ tiles split evenly");
    static_assert(kNTs % 2 == 0 && kDTkv % 2 == 0 && kDTq % 2 == 0, "B fragments load in pairs of n8 tiles");
    static_assert(kStages == 1 || kStages == 2, "Q/dO buffering");

    static CF_DEVICE void run(const Params& p, char* smem) {
        const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
        const int g = lane >> 2, t = lane & 3;
        const KeyBlock blk(p, kBlockN);
        const int b = blk.b, hk = blk.hk, n0 = blk.n0;
        const SeqInfo seq(p, b);
        if (n0 >= seq.seqlen_k) return;
        const int rows_k = min(kBlockN, seq.seqlen_k - n0);
        const IndexMask index_mask(p, seq);
        const KeyTileWalk<T, kSparse> walk(p, seq, index_mask, b, hk, n0, kBlockN, kBlockM);
        const int iterations = walk.iterations;

        // Shared memory: K, V | kStages x (Q, dO) | P, dS | kStages x (lse, Dsum) rows.
        T* sK = reinterpret_cast<T*>(smem);
        T* sV = sK + kBlockN * kLd;
        T* sQ0 = sV + kBlockN * kLd;
        T* sdO0 = sQ0 + kStages * kBlockM * kLd;
        T* sP = sdO0 + kStages * kBlockM * kLd;
        T* sdS = sP + kBlockM * kLdS;
        float* sLse0 = reinterpret_cast<float*>(sdS + kBlockM * kLdS);
        float* sDsum0 = sLse0 + kStages * kBlockM;

        load_tile<T, kBlockN, kHeadDim, kLd, kThreads>(sK, walk.k(n0), p.k_row_stride, rows_k, p.head_dim,
                                                       p.aligned & CF_ALIGN_K, tid);
        load_tile<T, kBlockN, kHeadDim, kLd, kThreads>(sV, walk.v(n0), p.v_row_stride, rows_k, p.head_dim,
                                                       p.aligned & CF_ALIGN_V, tid);

        // Loads of iteration `it` into buffer `stage`, all by cp.async so that no thread
        // waits on them before the iteration that uses them: Q, dO and the rows' lse and
        // Dsum (+inf and 0 on padded rows, stored directly: P = 0 there).
        auto issue = [&](int it, int stage) {
            const QueryTile qt = walk.at(it);
            const int rows_q = qt.rows_q;
            load_tile<T, kBlockM, kHeadDim, kLd, kThreads>(sQ0 + stage * kBlockM * kLd, walk.q(qt), p.q_row_stride, rows_q,
                                                           p.head_dim, p.aligned & CF_ALIGN_Q, tid);
            load_tile<T, kBlockM, kHeadDim, kLd, kThreads>(sdO0 + stage * kBlockM * kLd, walk.dout(qt), p.do_row_stride,
                                                           rows_q, p.head_dim, p.aligned & CF_ALIGN_DO, tid);
            for (int r = tid; r < kBlockM; r += kThreads) {
                if (r < rows_q) {
                    cp_async_4(sLse0 + stage * kBlockM + r, p.lse_log2 + qt.ws + r);
                    cp_async_4(sDsum0 + stage * kBlockM + r, p.dsum + qt.ws + r);
                } else {
                    sLse0[stage * kBlockM + r] = CF_INF;
                    sDsum0[stage * kBlockM + r] = 0.f;
                }
            }
        };
        if (kStages == 2 && iterations > 0) issue(0, 0);
        cp_async_commit();

        // This warp's sub-tiles.
        const int s_r0 = (warp % kWmS) * (kBlockM / kWmS), s_c0 = (warp / kWmS) * (kBlockN / kWnS);
        const int kv_r0 = (warp % kWnKV) * (kBlockN / kWnKV), kv_d0 = (warp / kWnKV) * (kHeadDim / kWdKV);
        const int q_r0 = (warp % kWmQ) * (kBlockM / kWmQ), q_d0 = (warp / kWmQ) * (kHeadDim / kWdQ);

        float acc_dk[kMTkv][kDTkv][4], acc_dv[kMTkv][kDTkv][4];
#pragma unroll
        for (int mt = 0; mt < kMTkv; ++mt)
#pragma unroll
            for (int dt = 0; dt < kDTkv; ++dt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc_dk[mt][dt][e] = acc_dv[mt][dt][e] = 0.f;

        const DropoutRng rng(p);
        for (int it = 0; it < iterations; ++it) {
            const int stage = kStages == 2 ? (it & 1) : 0;
            if (kStages == 1) {
                __syncthreads();  // the previous iteration's readers of sQ, sdO, sP, sdS are done
                issue(it, 0);
                cp_async_commit();
            }
            cp_async_wait<0>();
            __syncthreads();  // this iteration's tiles landed; the other buffer is free
            if (kStages == 2 && it + 1 < iterations) {
                issue(it + 1, stage ^ 1);  // overlaps with this iteration's compute
                cp_async_commit();
            }
            const QueryTile qt = walk.at(it);
            const int h = qt.h, m0 = qt.m0, rows_q = qt.rows_q;
            const ScoreMods mods(p, seq, b, h);
            const GradElem<kGeneral> grad{p, index_mask, mods, seq, b, h, b * p.num_heads + h, rng};
            const T* sQ = sQ0 + stage * kBlockM * kLd;
            const T* sdO = sdO0 + stage * kBlockM * kLd;
            const float* sLse = sLse0 + stage * kBlockM;
            const float* sDsum = sDsum0 + stage * kBlockM;

            // S = Q Kᵀ and dP = dO Vᵀ for this warp's sub-tile.
            float s[kMTs][kNTs][4], dp[kMTs][kNTs][4];
#pragma unroll
            for (int mt = 0; mt < kMTs; ++mt)
#pragma unroll
                for (int nt = 0; nt < kNTs; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[mt][nt][e] = dp[mt][nt][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < kHeadDim / 16; ++kk) {
                FragA<T> aq[kMTs], ado[kMTs];
#pragma unroll
                for (int mt = 0; mt < kMTs; ++mt) {
                    load_a<T, kLd>(aq[mt], sQ, s_r0 + mt * 16, kk * 16, lane);
                    load_a<T, kLd>(ado[mt], sdO, s_r0 + mt * 16, kk * 16, lane);
                }
#pragma unroll
                for (int np = 0; np < kNTs / 2; ++np) {
                    FragB<T> b0, b1;
                    load_b2<T, kLd>(b0, b1, sK, s_c0 + np * 16, kk * 16, lane);
#pragma unroll
                    for (int mt = 0; mt < kMTs; ++mt) {
                        mma(s[mt][2 * np], aq[mt], b0);
                        mma(s[mt][2 * np + 1], aq[mt], b1);
                    }
                    load_b2<T, kLd>(b0, b1, sV, s_c0 + np * 16, kk * 16, lane);
#pragma unroll
                    for (int mt = 0; mt < kMTs; ++mt) {
                        mma(dp[mt][2 * np], ado[mt], b0);
                        mma(dp[mt][2 * np + 1], ado[mt], b1);
                    }
                }
            }

            // P and dS, then both to shared memory for the transposed products.
            const bool full = index_mask.tile_is_full(m0, kBlockM, n0, kBlockN);
#pragma unroll
            for (int mt = 0; mt < kMTs; ++mt) {
                const int r = s_r0 + mt * 16 + g;
                const float lse2[2] = {sLse[r], sLse[r + 8]};
                const float dsum[2] = {sDsum[r], sDsum[r + 8]};
                int lo[2], hi[2];
                grad.row_limits(m0 + r, lo, hi);
                float th[kNTs][4];
                if constexpr (kGeneral) mods.to_log2<kNTs, true>(s[mt], th, m0 + r, n0 + s_c0 + 2 * t, index_mask);
#pragma unroll
                for (int nt = 0; nt < kNTs; ++nt)
                    grad.tile4(s[mt][nt], dp[mt][nt], th[nt], m0 + r, n0 + s_c0 + nt * 8 + 2 * t, full, lo, hi,
                               lse2, dsum);
                store_acc<T, kLdS>(sP, s[mt], s_r0 + mt * 16, s_c0, lane, 1.f);
                store_acc<T, kLdS>(sdS, dp[mt], s_r0 + mt * 16, s_c0, lane, 1.f);
            }
            __syncthreads();

            // dV += Pᵀ dO and dK += dSᵀ Q (contraction over the tile's queries).
#pragma unroll
            for (int kk = 0; kk < kBlockM / 16; ++kk) {
                FragA<T> ap[kMTkv], ads[kMTkv];
#pragma unroll
                for (int mt = 0; mt < kMTkv; ++mt) {
                    load_a_t<T, kLdS>(ap[mt], sP, kv_r0 + mt * 16, kk * 16, lane);
                    load_a_t<T, kLdS>(ads[mt], sdS, kv_r0 + mt * 16, kk * 16, lane);
                }
#pragma unroll
                for (int dp2 = 0; dp2 < kDTkv / 2; ++dp2) {
                    FragB<T> b0, b1;
                    load_b2_t<T, kLd>(b0, b1, sdO, kv_d0 + dp2 * 16, kk * 16, lane);
#pragma unroll
                    for (int mt = 0; mt < kMTkv; ++mt) {
                        mma(acc_dv[mt][2 * dp2], ap[mt], b0);
                        mma(acc_dv[mt][2 * dp2 + 1], ap[mt], b1);
                    }
                    load_b2_t<T, kLd>(b0, b1, sQ, kv_d0 + dp2 * 16, kk * 16, lane);
#pragma unroll
                    for (int mt = 0; mt < kMTkv; ++mt) {
                        mma(acc_dk[mt][2 * dp2], ads[mt], b0);
                        mma(acc_dk[mt][2 * dp2 + 1], ads[mt], b1);
                    }
                }
            }

            if (p.flags & CF_DQ_ATOMIC) {
                // dQ += dS K (contraction over the tile's keys), added into fp32.
                float acc_dq[kMTq][kDTq][4];
#pragma unroll
                for (int mt = 0; mt < kMTq; ++mt)
#pragma unroll
                    for (int dt = 0; dt < kDTq; ++dt)
#pragma unroll
                        for (int e = 0; e < 4; ++e) acc_dq[mt][dt][e] = 0.f;
#pragma unroll
                for (int kk = 0; kk < kBlockN / 16; ++kk) {
                    FragA<T> a[kMTq];
#pragma unroll
                    for (int mt = 0; mt < kMTq; ++mt) load_a<T, kLdS>(a[mt], sdS, q_r0 + mt * 16, kk * 16, lane);
#pragma unroll
                    for (int dp2 = 0; dp2 < kDTq / 2; ++dp2) {
                        FragB<T> b0, b1;
                        load_b2_t<T, kLd>(b0, b1, sK, q_d0 + dp2 * 16, kk * 16, lane);
#pragma unroll
                        for (int mt = 0; mt < kMTq; ++mt) {
                            mma(acc_dq[mt][2 * dp2], a[mt], b0);
                            mma(acc_dq[mt][2 * dp2 + 1], a[mt], b1);
                        }
                    }
                }
#pragma unroll
                for (int mt = 0; mt < kMTq; ++mt)
                    add_dq_rows<kHeadDim, false>(p, qt.ws, q_r0 + mt * 16 + g, rows_q, q_d0 + 2 * t, acc_dq[mt]);
            }
        }

        // Epilogue: dK (times the softmax scale) and dV through shared memory.
        cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (int mt = 0; mt < kMTkv; ++mt) {
            store_acc<T, kLd>(sK, acc_dk[mt], kv_r0 + mt * 16, kv_d0, lane, p.softmax_scale);
            store_acc<T, kLd>(sV, acc_dv[mt], kv_r0 + mt * 16, kv_d0, lane, 1.f);
        }
        __syncthreads();
        store_tile<T, kBlockN, kHeadDim, kLd, kThreads>(walk.dk(n0), p.dk_row_stride, sK, rows_k, p.head_dim,
                                                        p.aligned & CF_ALIGN_DK, tid);
        store_tile<T, kBlockN, kHeadDim, kLd, kThreads>(walk.dv(n0), p.dv_row_stride, sV, rows_k, p.head_dim,
                                                        p.aligned & CF_ALIGN_DV, tid);
    }
};

// ---- deterministic dQ ----------------------------------------------------------------------

template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kNWarps, bool kGeneral, bool kSparse>
struct DqKernel {
    static constexpr int kThreads = kNWarps * 32;
    static constexpr int kLd = kHeadDim + SmemPad<T>::kElems;
    static constexpr int kDT = kHeadDim / 8, kNT = kBlockN / 8;
    static_assert(kBlockM == 16 * kNWarps, "each warp owns 16 query rows");
    static constexpr int kSmemBytes = (2 * kBlockM + 2 * kBlockN) * kLd * (int)sizeof(T);

    static CF_DEVICE void run(const Params& p, char* smem) {
        const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
        const int g = lane >> 2, t = lane & 3;
        const QueryBlock blk(p, kBlockM);
        const int bh = blk.bh, b = blk.b, h = blk.h, hk = blk.hk, m0 = blk.m0;
        const SeqInfo seq(p, b);
        if (m0 >= seq.seqlen_q) return;
        const int rows_q = min(kBlockM, seq.seqlen_q - m0);
        const IndexMask index_mask(p, seq);
        const ScoreMods mods(p, seq, b, h);
        const GradElem<kGeneral> grad{p, index_mask, mods, seq, b, h, bh, DropoutRng(p)};

        T* sQ = reinterpret_cast<T*>(smem);
        T* sdO = sQ + kBlockM * kLd;
        T* sK = sdO + kBlockM * kLd;
        T* sV = sK + kBlockN * kLd;
        const T* q = static_cast<const T*>(p.q) + seq.q_offset(p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, h) +
                     (i64)m0 * p.q_row_stride;
        const T* dout = static_cast<const T*>(p.dout) + seq.q_offset(p.do_batch_stride, p.do_row_stride, p.do_head_stride, b, h) +
                        (i64)m0 * p.do_row_stride;
        const T* k = static_cast<const T*>(p.k) + seq.k_offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, hk);
        const T* v = static_cast<const T*>(p.v) + seq.k_offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, hk);
        load_tile<T, kBlockM, kHeadDim, kLd, kThreads>(sQ, q, p.q_row_stride, rows_q, p.head_dim, p.aligned & CF_ALIGN_Q, tid);
        load_tile<T, kBlockM, kHeadDim, kLd, kThreads>(sdO, dout, p.do_row_stride, rows_q, p.head_dim, p.aligned & CF_ALIGN_DO, tid);
        cp_async_commit();

        const i64 ws = ws_offset(p, seq, b, h);
        const int row_g = warp * 16 + g;  // local rows row_g and row_g + 8
        float lse2[2], dsum[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = row_g + 8 * r;
            lse2[r] = row < rows_q ? p.lse_log2[ws + m0 + row] : CF_INF;
            dsum[r] = row < rows_q ? p.dsum[ws + m0 + row] : 0.f;
        }

        int lo[2], hi[2];
        grad.row_limits(m0 + row_g, lo, hi);
        float acc_dq[kDT][4];
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) acc_dq[dt][0] = acc_dq[dt][1] = acc_dq[dt][2] = acc_dq[dt][3] = 0.f;

        const auto tiles = index_mask.key_tiles<kSparse>(p, b, h, m0, kBlockM, kBlockN);
        for (int i = tiles.lo; i < tiles.hi; ++i) {
            const int n0 = tiles.at(i) * kBlockN;
            const int rows_k = min(kBlockN, seq.seqlen_k - n0);
            __syncthreads();  // every warp is done with the previous K, V
            load_tile<T, kBlockN, kHeadDim, kLd, kThreads>(sK, k + (i64)n0 * p.k_row_stride, p.k_row_stride, rows_k,
                                                           p.head_dim, p.aligned & CF_ALIGN_K, tid);
            load_tile<T, kBlockN, kHeadDim, kLd, kThreads>(sV, v + (i64)n0 * p.v_row_stride, p.v_row_stride, rows_k,
                                                           p.head_dim, p.aligned & CF_ALIGN_V, tid);
            cp_async_commit();
            cp_async_wait<0>();
            __syncthreads();

            float s[kNT][4], dp[kNT][4];
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < kHeadDim / 16; ++kk) {
                FragA<T> aq, ado;
                load_a<T, kLd>(aq, sQ, warp * 16, kk * 16, lane);
                load_a<T, kLd>(ado, sdO, warp * 16, kk * 16, lane);
#pragma unroll
                for (int np = 0; np < kNT / 2; ++np) {
                    FragB<T> b0, b1;
                    load_b2<T, kLd>(b0, b1, sK, np * 16, kk * 16, lane);
                    mma(s[2 * np], aq, b0);
                    mma(s[2 * np + 1], aq, b1);
                    load_b2<T, kLd>(b0, b1, sV, np * 16, kk * 16, lane);
                    mma(dp[2 * np], ado, b0);
                    mma(dp[2 * np + 1], ado, b1);
                }
            }
            const bool full = index_mask.tile_is_full(m0, kBlockM, n0, kBlockN);
            float th[kNT][4];
            if constexpr (kGeneral) mods.to_log2<kNT, true>(s, th, m0 + row_g, n0 + 2 * t, index_mask);
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt)
                grad.tile4(s[nt], dp[nt], th[nt], m0 + row_g, n0 + nt * 8 + 2 * t, full, lo, hi, lse2, dsum);
            // dQ += dS K, dS straight from registers.
#pragma unroll
            for (int kk = 0; kk < kBlockN / 16; ++kk) {
                FragA<T> a;
                acc_to_a<T>(a, dp, kk);
#pragma unroll
                for (int dp2 = 0; dp2 < kDT / 2; ++dp2) {
                    FragB<T> b0, b1;
                    load_b2_t<T, kLd>(b0, b1, sK, dp2 * 16, kk * 16, lane);
                    mma(acc_dq[2 * dp2], a, b0);
                    mma(acc_dq[2 * dp2 + 1], a, b1);
                }
            }
        }

        cp_async_wait<0>();
        __syncthreads();
        store_acc<T, kLd>(sQ, acc_dq, warp * 16, 0, lane, p.softmax_scale);
        __syncthreads();
        T* dq = static_cast<T*>(p.dq) + seq.q_offset(p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, b, h) +
                (i64)m0 * p.dq_row_stride;
        store_tile<T, kBlockM, kHeadDim, kLd, kThreads>(dq, p.dq_row_stride, sQ, rows_q, p.head_dim, p.aligned & CF_ALIGN_DQ, tid);
    }
};

// ---- dQ accumulator to dQ ------------------------------------------------------------------

template <typename T, int kHeadDim>
CF_DEVICE void dq_convert(const Params& p) {
    constexpr int kRows = 32, kVec = 16 / (int)sizeof(T);
    const int num_row_blocks = (p.seqlen_q + kRows - 1) / kRows;
    const i64 linear = blockIdx.x;
    const int row_block = (int)(linear % num_row_blocks);
    const int bh = (int)(linear / num_row_blocks);
    const int b = bh / p.num_heads, h = bh % p.num_heads;
    const SeqInfo seq(p, b);
    const i64 ws = ws_offset(p, seq, b, h);
    T* dq = static_cast<T*>(p.dq) + seq.q_offset(p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, b, h);
    if (p.aligned & CF_ALIGN_DQ) {
        // 16 bytes of dQ per thread and step: kVec accumulator floats in, one vector out.
        const int chunks = p.head_dim / kVec;
        for (int idx = threadIdx.x; idx < kRows * chunks; idx += blockDim.x) {
            const int i = row_block * kRows + idx / chunks, c = (idx % chunks) * kVec;
            if (i >= seq.seqlen_q) break;
            const float4* acc = reinterpret_cast<const float4*>(p.dq_accum + (ws + i) * kHeadDim + c);
            float f[kVec];
#pragma unroll
            for (int v = 0; v < kVec / 4; ++v) {
                const float4 a = acc[v];
                f[4 * v] = a.x * p.softmax_scale;
                f[4 * v + 1] = a.y * p.softmax_scale;
                f[4 * v + 2] = a.z * p.softmax_scale;
                f[4 * v + 3] = a.w * p.softmax_scale;
            }
            uint4 packed;
            if constexpr (ElemInfo<T>::kIsFloat) {
                packed = make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
            } else {
                packed = make_uint4(pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]), pack2<T>(f[4], f[5]), pack2<T>(f[6], f[7]));
            }
            *reinterpret_cast<uint4*>(dq + (i64)i * p.dq_row_stride + c) = packed;
        }
        return;
    }
    for (int idx = threadIdx.x; idx < kRows * p.head_dim; idx += blockDim.x) {
        const int i = row_block * kRows + idx / p.head_dim, d = idx % p.head_dim;
        if (i < seq.seqlen_q) dq[(i64)i * p.dq_row_stride + d] = from_float<T>(p.dq_accum[(ws + i) * kHeadDim + d] * p.softmax_scale);
    }
}

extern "C" __global__ void __launch_bounds__(128) cuflash_bwd_prep(const __grid_constant__ Params p) {
    bwd_prep<ElemT, CF_HEAD_DIM>(p);
}

extern "C" __global__ void __launch_bounds__(CF_BWD_WARPS * 32) cuflash_bwd_dkdv(const __grid_constant__ Params p) {
    extern __shared__ __align__(128) char smem[];
    BwdKernel<ElemT, CF_HEAD_DIM, CF_BWD_BLOCK_M, CF_BWD_BLOCK_N, CF_BWD_WARPS, CF_GENERAL != 0, CF_BWD_STAGES, CF_BWD_WM_S,
              CF_BWD_WN_KV, CF_BWD_WM_Q, CF_BLOCK_SPARSE != 0>::run(p, smem);
}

extern "C" __global__ void __launch_bounds__(CF_DQ_WARPS * 32) cuflash_bwd_dq(const __grid_constant__ Params p) {
    extern __shared__ __align__(128) char smem[];
    DqKernel<ElemT, CF_HEAD_DIM, CF_DQ_BLOCK_M, CF_DQ_BLOCK_N, CF_DQ_WARPS, CF_GENERAL != 0, CF_BLOCK_SPARSE != 0>::run(p, smem);
}

extern "C" __global__ void __launch_bounds__(128) cuflash_bwd_dq_convert(const __grid_constant__ Params p) {
    dq_convert<ElemT, CF_HEAD_DIM>(p);
}
