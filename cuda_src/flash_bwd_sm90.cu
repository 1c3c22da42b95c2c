// Attention backward for Hopper (sm_90a): the dK/dV kernel of flash_bwd.cu on warpgroup
// matrix products (wgmma), for 16-bit inputs without score modifiers. The preprocess, the
// dQ conversion and the deterministic dQ kernel come from flash_bwd.cu's module.
//
// One thread block owns kBlockN keys of one (batch, kv head), in key groups of 64; each
// group belongs to kSplit warpgroups. For every query head of the group and every query
// tile of kBlockM rows that can see these keys:
//
//   Sᵀ = K Qᵀ, dPᵀ = V dOᵀ   wgmma, both operands K-major in shared memory, as two
//                             groups: Pᵀ is computed while dPᵀ runs. The products are
//                             transposed (keys along the accumulator rows) so that Pᵀ and
//                             dSᵀ land in registers in the A layout of the next products.
//   Pᵀ = exp2(Sᵀ - lse), dSᵀ = Pᵀ (dPᵀ - Dsum)   lse and Dsum per column (query), read
//                             from shared memory
//   dV += Pᵀ dO, dK += dSᵀ Q  wgmma, A from registers, B = dO, Q MN-major
//   dQ += dS K                (atomic mode) dSᵀ goes to shared memory once; wgmma with both
//                             operands MN-major; each warpgroup owns 64 query rows (or 64
//                             or 128 head-dim columns) of the tile and adds them into the
//                             fp32 accumulator with vector reductions, while dK's product
//                             runs.
//
// kSplit = 1 (head dims up to 128): one warpgroup per key group, as above. kSplit = 2
// (head dim 256, where dK and dV of 64 keys would take 256 fp32 registers per thread): the
// two warpgroups of a key group split Sᵀ and dPᵀ by query columns and dK, dV and dQ by
// head-dim columns (128 each), so Pᵀ and dSᵀ both go through shared memory and dV, dK
// read them as a K-major A operand.
//
// Q, dO and their rows' lse and Dsum are double-buffered: the next query tile loads
// (cp.async) during this one's products. Two barriers per tile: one publishes the loaded
// tile, one publishes dSᵀ (and Pᵀ) to the other warpgroups.
//
// Compile-time configuration (cuflash/_tiles.py): CF_ELEM 0/1 = fp16/bf16, CF_HEAD_DIM
// (the head-dim bucket; padded to a multiple of 64 here), CF_BWD_BLOCK_M (query tile: 64
// or 128), CF_BWD_BLOCK_N (key tile: 64 x key groups), CF_BWD_WARPS (4 x warpgroups),
// CF_BLOCK_SPARSE (walk only the query blocks listed for the key block: KeyTileWalk).
#include "bwd_tile.cuh"
#include "common.cuh"
#include "mask.cuh"
#include "mma.cuh"
#include "sm90.cuh"
#include "tile_io.cuh"

template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kWG, bool kSparse>
struct BwdSm90 {
    static constexpr int kD = (kHeadDim + 63) / 64 * 64;
    static constexpr int kThreads = 128 * kWG;
    static constexpr int kSplit = kWG / (kBlockN / 64);  // warpgroups per key group
    static constexpr int kQs = kBlockM / kSplit;          // Sᵀ, dPᵀ query columns per warpgroup
    static constexpr int kDkv = kD / kSplit;              // dK, dV head-dim columns per warpgroup
    static constexpr int kNT = kQs / 8;                   // Sᵀ accumulator: n8 tiles along the queries
    static constexpr int kDT = kDkv / 8;
    // dQ split: kMq warpgroups along the query rows, kNq along the head dim.
    static constexpr int kMq = kBlockM / 64, kNq = kWG / kMq, kNdq = kD / kNq;
    static constexpr u32 kKVBytes = kBlockN * kD * 2, kQBytes = kBlockM * kD * 2, kSBytes = kBlockN * kBlockM * 2;
    static constexpr int kLdO = kD + SmemPad<T>::kElems;  // unswizzled staging of dK, dV
    static_assert(kBlockN % 64 == 0 && (kSplit == 1 || kSplit == 2) && kSplit * kBlockN == 64 * kWG,
                  "each key group of 64 belongs to one or two warpgroups");
    static_assert(kBlockM == 64 || kBlockM == 128, "query tiles with a wgmma_ss shape");
    static_assert(kSplit == 1 || (kQs == 32 && kDkv == 128), "the split shapes have wgmma_ss, wgmma_ss_bt wrappers");
    static_assert(kMq * kNq == kWG && kNdq % 64 == 0 && (kNdq == 64 || kNdq == 128), "dQ splits into wgmma_ss_t shapes");
    // Shared memory: K, V | 2 x Q | 2 x dO | dSᵀ | Pᵀ (kSplit = 2) | 2 x (lse, Dsum) rows.
    static constexpr u32 kOffV = kKVBytes, kOffQ = 2 * kKVBytes, kOffDo = kOffQ + 2 * kQBytes;
    static constexpr u32 kOffS = kOffDo + 2 * kQBytes, kOffP = kOffS + kSBytes;
    static constexpr u32 kOffRows = kOffP + (kSplit > 1 ? kSBytes : 0);
    static_assert(2 * kBlockN * kLdO * 2 <= (int)kOffRows, "dK, dV staging fits in the tiles");

    // Byte offset of k-step kk (16 query columns) of key group kg's rows in a swizzled
    // kBlockN x kBlockM tile read K-major (Pᵀ, dSᵀ as the A operand).
    static CF_DEVICE u32 a_col(int kg, int kk) { return kg * (64 * 128) + (kk & 3) * 32 + (kk >> 2) * (kBlockN * 128); }

    // Sᵀ to Pᵀ in place; kMasked: the tile has disallowed (key, query) pairs, outside
    // [q_lo, q_hi] of the thread's two keys.
    template <bool kMasked>
    static CF_DEVICE void probabilities(float (&s)[kNT][4], const float* sLse, int m0, int t, const int (&q_lo)[2],
                                        const int (&q_hi)[2], float scale_log2) {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
            const int c = nt * 8 + 2 * t;
            const float2 lse2 = *reinterpret_cast<const float2*>(sLse + c);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1, i = m0 + c + (e & 1);
                float x = __fmul_rn(s[nt][e], scale_log2);
                if (kMasked && (i < q_lo[r] || i > q_hi[r])) x = -CF_INF;
                float expo = x - ((e & 1) ? lse2.y : lse2.x);
                expo = expo > 0.f ? 0.f : expo;
                s[nt][e] = fast_exp2(expo);
            }
        }
    }

    // Writes this thread's part of a transposed tile held as A fragments (keys key0 and
    // key0 + 8, query columns q0 + 8nt + 2t, +1) to `tile`, swizzled, keys along the rows.
    static CF_DEVICE void store_transposed(char* tile, const FragA<T> (&f)[kQs / 16], int key0, int q0, int t) {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int key = key0 + 8 * r, q = q0 + nt * 8 + 2 * t;
                *reinterpret_cast<u32*>(tile + swizzled<kBlockN>(key, q >> 3) + (q & 7) * 2) =
                    f[nt / 2].x[(nt & 1) * 2 + r];  // (key, q..q+1)
            }
    }

    static CF_DEVICE void run(const Params& p, char* smem_raw) {
        const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
        const int wg = warp >> 2, g = lane >> 2, t = lane & 3;
        const KeyBlock blk(p, kBlockN);
        const int b = blk.b, hk = blk.hk, n0 = blk.n0;
        const SeqInfo seq(p, b);
        if (n0 >= seq.seqlen_k) return;
        const int rows_k = min(kBlockN, seq.seqlen_k - n0);
        const IndexMask index_mask(p, seq);
        const KeyTileWalk<T, kSparse> walk(p, seq, index_mask, b, hk, n0, kBlockN, kBlockM);
        const int iterations = walk.iterations;

        // Swizzle atoms are 1024 bytes; the host adds 1 KB so the tiles can be aligned.
        const u32 raw = smem_addr(smem_raw);
        const u32 sbase = (raw + 1023u) & ~1023u;
        char* smem = smem_raw + (sbase - raw);
        const u32 sK = sbase, sV = sbase + kOffV, sQ0 = sbase + kOffQ, sdO0 = sbase + kOffDo, sS = sbase + kOffS;
        const u32 sP = sbase + kOffP;
        float* sLse0 = reinterpret_cast<float*>(smem + kOffRows);
        float* sDsum0 = sLse0 + 2 * kBlockM;

        load_swizzled<T, kBlockN, kD, kThreads>(sK, smem, walk.k(n0), p.k_row_stride, rows_k, p.head_dim,
                                                p.aligned & CF_ALIGN_K, tid);
        load_swizzled<T, kBlockN, kD, kThreads>(sV, smem + kOffV, walk.v(n0), p.v_row_stride, rows_k, p.head_dim,
                                                p.aligned & CF_ALIGN_V, tid);

        // Q, dO, lse and Dsum of iteration `it` into buffer `stage` (+inf and 0 on padded
        // rows: P = 0 there).
        auto issue = [&](int it, int stage) {
            const QueryTile qt = walk.at(it);
            load_swizzled<T, kBlockM, kD, kThreads>(sQ0 + stage * kQBytes, smem + kOffQ + stage * kQBytes, walk.q(qt),
                                                    p.q_row_stride, qt.rows_q, p.head_dim, p.aligned & CF_ALIGN_Q, tid);
            load_swizzled<T, kBlockM, kD, kThreads>(sdO0 + stage * kQBytes, smem + kOffDo + stage * kQBytes, walk.dout(qt),
                                                    p.do_row_stride, qt.rows_q, p.head_dim, p.aligned & CF_ALIGN_DO, tid);
            for (int r = tid; r < kBlockM; r += kThreads) {
                if (r < qt.rows_q) {
                    cp_async_4(sLse0 + stage * kBlockM + r, p.lse_log2 + qt.ws + r);
                    cp_async_4(sDsum0 + stage * kBlockM + r, p.dsum + qt.ws + r);
                } else {
                    sLse0[stage * kBlockM + r] = CF_INF;
                    sDsum0[stage * kBlockM + r] = 0.f;
                }
            }
        };
        if (iterations > 0) issue(0, 0);
        cp_async_commit();

        // This warpgroup's key group and its part in it: Sᵀ, dPᵀ query columns q_off..q_off
        // + kQs - 1, dK and dV head-dim columns kv_d0..kv_d0 + kDkv - 1.
        const int kg = wg / kSplit, part = wg % kSplit, q_off = part * kQs, kv_d0 = part * kDkv;
        // This thread's keys (accumulator rows) and their allowed query ranges.
        const int key0 = kg * 64 + (warp & 3) * 16 + g;  // local keys key0, key0 + 8
        int q_lo[2], q_hi[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) index_mask.col_limits(n0 + key0 + 8 * r, q_lo[r], q_hi[r]);
        // This warpgroup's part of dQ: query rows dq_m0.., head-dim columns dq_d0..
        const int dq_m0 = (wg % kMq) * 64, dq_d0 = (wg / kMq) * kNdq;

        float acc_dk[kDT][4], acc_dv[kDT][4];
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_dk[dt][e] = acc_dv[dt][e] = 0.f;

        float acc_dq[kNdq / 8][4];
        const bool atomic = p.flags & CF_DQ_ATOMIC;

        for (int it = 0; it < iterations; ++it) {
            const int stage = it & 1;
            cp_async_wait<0>();
            fence_proxy_async();
            __syncthreads();  // tile `it` landed; every warpgroup is done with the other buffers
            if (it + 1 < iterations) issue(it + 1, stage ^ 1);
            cp_async_commit();
            const QueryTile qt = walk.at(it);
            const int m0 = qt.m0;
            const u32 sQ = sQ0 + stage * kQBytes, sdO = sdO0 + stage * kQBytes;
            const float* sLse = sLse0 + stage * kBlockM;
            const float* sDsum = sDsum0 + stage * kBlockM;

            // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ for this warpgroup's 64 keys and kQs queries, as two
            // groups.
            float s[kNT][4], dp[kNT][4];
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
            pin(s);
            pin(dp);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < kD / 16; ++kk) {
                const u32 col = (kk & 3) * 32 + (kk >> 2) * (kBlockN * 128);
                const u32 qcol = (kk & 3) * 32 + (kk >> 2) * (kBlockM * 128);
                wgmma_ss<T, kQs>(s, smem_desc(sK + col + kg * (64 * 128), 16, 1024), smem_desc(sQ + qcol + q_off * 128, 16, 1024));
            }
            wgmma_commit();
#pragma unroll
            for (int kk = 0; kk < kD / 16; ++kk) {
                const u32 col = (kk & 3) * 32 + (kk >> 2) * (kBlockN * 128);
                const u32 qcol = (kk & 3) * 32 + (kk >> 2) * (kBlockM * 128);
                wgmma_ss<T, kQs>(dp, smem_desc(sV + col + kg * (64 * 128), 16, 1024),
                                 smem_desc(sdO + qcol + q_off * 128, 16, 1024));
            }
            wgmma_commit();

            // Pᵀ (while dPᵀ runs), element (key, query) = (row, column). Scores are rounded
            // alone, as the forward rounds them; x <= lse in exact arithmetic, and the clamp
            // at 0 (a comparison: NaN still propagates) absorbs the LSE's round trip.
            wgmma_wait<1>();
            pin(s);
            if (index_mask.tile_is_full(m0, kBlockM, n0, kBlockN))
                probabilities<false>(s, sLse + q_off, m0 + q_off, t, q_lo, q_hi, p.scale_log2);
            else
                probabilities<true>(s, sLse + q_off, m0 + q_off, t, q_lo, q_hi, p.scale_log2);
            FragA<T> pa[kQs / 16], dsa[kQs / 16];
#pragma unroll
            for (int kk = 0; kk < kQs / 16; ++kk) acc_to_a<T>(pa[kk], s, kk);
            // dSᵀ = Pᵀ (dPᵀ - Dsum).
            wgmma_wait<0>();
            pin(dp);
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt) {
                const float2 dsum = *reinterpret_cast<const float2*>(sDsum + q_off + nt * 8 + 2 * t);
#pragma unroll
                for (int e = 0; e < 4; ++e) dp[nt][e] = s[nt][e] * (dp[nt][e] - ((e & 1) ? dsum.y : dsum.x));
            }
#pragma unroll
            for (int kk = 0; kk < kQs / 16; ++kk) acc_to_a<T>(dsa[kk], dp, kk);
            char* tile = smem + kOffS;

            // dV += Pᵀ dO and dK += dSᵀ Q (contraction over the tile's queries). In atomic
            // mode dK is issued after dQ, so that dQ's reductions overlap dK's product.
            auto issue_dk = [&] {
                if constexpr (kSplit == 1) {
#pragma unroll
                    for (int kk = 0; kk < kBlockM / 16; ++kk)
                        wgmma_rs<T, kD>(acc_dk, dsa[kk].x, smem_desc(sQ + kk * (16 * 128), kBlockM * 128, 1024));
                } else {
#pragma unroll
                    for (int kk = 0; kk < kBlockM / 16; ++kk)
                        wgmma_ss_bt<T, kDkv>(acc_dk, smem_desc(sS + a_col(kg, kk), 16, 1024),
                                             smem_desc(sQ + (kv_d0 / 64) * (kBlockM * 128) + kk * (16 * 128), kBlockM * 128, 1024));
                }
            };
            if constexpr (kSplit > 1) {
                // Both halves of Pᵀ and dSᵀ to shared memory, published to the key group.
                store_transposed(smem + kOffP, pa, key0, q_off, t);
                store_transposed(tile, dsa, key0, q_off, t);
                fence_proxy_async();
                __syncthreads();
            }
            pin(acc_dv);
            pin(acc_dk);
            wgmma_fence();
            if constexpr (kSplit == 1) {
#pragma unroll
                for (int kk = 0; kk < kBlockM / 16; ++kk)
                    wgmma_rs<T, kD>(acc_dv, pa[kk].x, smem_desc(sdO + kk * (16 * 128), kBlockM * 128, 1024));
            } else {
#pragma unroll
                for (int kk = 0; kk < kBlockM / 16; ++kk)
                    wgmma_ss_bt<T, kDkv>(acc_dv, smem_desc(sP + a_col(kg, kk), 16, 1024),
                                         smem_desc(sdO + (kv_d0 / 64) * (kBlockM * 128) + kk * (16 * 128), kBlockM * 128, 1024));
            }
            if (!atomic) issue_dk();
            wgmma_commit();
            if (!atomic) {
                wgmma_wait_all();
                pin(acc_dv);
                pin(acc_dk);
                continue;
            }

            // dQ = dS K, both read MN-major from shared memory. With kSplit = 1, dSᵀ goes
            // there now (while dV's product runs) and is published to every warpgroup.
            if constexpr (kSplit == 1) {
                store_transposed(tile, dsa, key0, 0, t);
                fence_proxy_async();
                __syncthreads();
            }
#pragma unroll
            for (int j = 0; j < kNdq / 8; ++j) acc_dq[j][0] = acc_dq[j][1] = acc_dq[j][2] = acc_dq[j][3] = 0.f;
            pin(acc_dq);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < kBlockN / 16; ++kk) {
                const u64 da = smem_desc(sS + (dq_m0 / 64) * (kBlockN * 128) + kk * (16 * 128), kBlockN * 128, 1024);
                const u64 db = smem_desc(sK + (dq_d0 / 64) * (kBlockN * 128) + kk * (16 * 128), kBlockN * 128, 1024);
                wgmma_ss_t<T, kNdq>(acc_dq, da, db);
            }
            wgmma_commit();
            wgmma_fence();
            issue_dk();
            wgmma_commit();
            wgmma_wait<1>();  // dV and dQ done, dK in flight
            pin(acc_dq);
            add_dq_rows<kHeadDim, kD != kHeadDim>(p, qt.ws, dq_m0 + (warp & 3) * 16 + g, qt.rows_q, dq_d0 + 2 * t, acc_dq);
            wgmma_wait_all();
            pin(acc_dv);
            pin(acc_dk);
        }

        // Epilogue: dK (times the softmax scale) and dV staged unswizzled, then stored.
        cp_async_wait<0>();
        __syncthreads();
        T* stage_k = reinterpret_cast<T*>(smem);
        T* stage_v = stage_k + kBlockN * kLdO;
        store_acc<T, kLdO>(stage_k, acc_dk, kg * 64 + (warp & 3) * 16, kv_d0, lane, p.softmax_scale);
        store_acc<T, kLdO>(stage_v, acc_dv, kg * 64 + (warp & 3) * 16, kv_d0, lane, 1.f);
        __syncthreads();
        store_tile<T, kBlockN, kD, kLdO, kThreads>(walk.dk(n0), p.dk_row_stride, stage_k, rows_k, p.head_dim,
                                                   p.aligned & CF_ALIGN_DK, tid);
        store_tile<T, kBlockN, kD, kLdO, kThreads>(walk.dv(n0), p.dv_row_stride, stage_v, rows_k, p.head_dim,
                                                   p.aligned & CF_ALIGN_DV, tid);
    }
};

#if CF_ELEM == 0
typedef half_t ElemT;
#elif CF_ELEM == 1
typedef bf16_t ElemT;
#else
#error "the Hopper backward takes 16-bit inputs"
#endif

extern "C" __global__ void __launch_bounds__(CF_BWD_WARPS * 32, CF_BWD_MIN_BLOCKS) cuflash_bwd_dkdv(const __grid_constant__ Params p) {
    extern __shared__ __align__(1024) char smem[];
    BwdSm90<ElemT, CF_HEAD_DIM, CF_BWD_BLOCK_M, CF_BWD_BLOCK_N, CF_BWD_WARPS / 4, CF_BLOCK_SPARSE != 0>::run(p, smem);
}
