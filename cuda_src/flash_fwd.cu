// Attention forward (FlashAttention-2 algorithm on mma.sync tensor cores).
//
// One thread block owns kBlockM query rows of one (batch, head); each warp owns
// kMT tiles of 16 of them (more rows per warp: each K/V fragment read from shared memory
// feeds more products). The block walks the key/value tiles its rows may attend, from the last to the
// first (so the diagonal tile, the one that needs masking under causal, comes first):
//
//   S = Q Kᵀ (fp32)  →  scores in log2 units, masked  →  online softmax  →  O += P V
//
// P never leaves registers: an fp32 accumulator pair of n8 tiles is an A fragment.
// Loads overlap compute with one K and one V buffer: V(n) is fetched while S(n) is
// computed, K(n-1) while softmax and P·V(n) run. O and the LSE are written once.
//
// Compile-time configuration (set by cuflash/_tiles.py):
//   CF_ELEM 0/1/2 = fp16/bf16/fp32, CF_HEAD_DIM (padded head dim, a multiple of 32),
//   CF_FWD_BLOCK_M, CF_FWD_BLOCK_N, CF_FWD_WARPS, CF_FWD_Q_REGS (Q fragments kept in
//   registers), CF_GENERAL (score modifiers compiled in), CF_BLOCK_SPARSE (visit only the
//   key blocks listed for the tile's query block; see TileRange in mask.cuh).
#include "common.cuh"
#include "mask.cuh"
#include "mma.cuh"
#include "philox.cuh"
#include "softmax.cuh"
#include "tile_io.cuh"

template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kNWarps, bool kGeneral, bool kQRegs, bool kSparse>
struct FwdKernel {
    static constexpr int kThreads = kNWarps * 32;
    static constexpr int kLd = kHeadDim + SmemPad<T>::kElems;
    static constexpr int kDT = kHeadDim / 8;  // n8 tiles across the head dim
    static constexpr int kNT = kBlockN / 8;   // n8 tiles across a key tile
    static constexpr int kMT = kBlockM / (16 * kNWarps);  // m16 tiles per warp
    static constexpr int kWarpRows = 16 * kMT;
    static_assert(kBlockM == kWarpRows * kNWarps, "warps split the query rows evenly");
    // With kQRegs a warp's Q fragments stay in registers for the whole key loop (16-bit,
    // one m16 tile, d <= 128: at most 32 registers); otherwise they are re-read from
    // shared memory for every key tile. More registers can mean fewer resident blocks,
    // so the tile table chooses, by measurement.
    static constexpr bool kQInRegs = kQRegs && !ElemInfo<T>::kIsFloat && kMT == 1 && kHeadDim <= 128;
    static constexpr int kQFrags = kQInRegs ? kHeadDim / 16 : 1;
    static_assert(kHeadDim % 32 == 0 && kBlockN % 16 == 0, "tile shapes");

    static CF_DEVICE void run(const Params& p, char* smem) {
        const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
        const int g = lane >> 2, t = lane & 3;

        const QueryBlock blk(p, kBlockM);
        const int bh = blk.bh, b = blk.b, h = blk.h, hk = blk.hk, m0 = blk.m0;
        const SeqInfo seq(p, b);
        if (m0 >= seq.seqlen_q) return;  // a shorter sequence of a packed batch
        const IndexMask index_mask(p, seq);

        T* sQ = reinterpret_cast<T*>(smem);
        T* sK = sQ + kBlockM * kLd;
        T* sV = sK + kBlockN * kLd;

        const T* q = static_cast<const T*>(p.q) + seq.q_offset(p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, h) +
                     (i64)m0 * p.q_row_stride;
        const T* k = static_cast<const T*>(p.k) + seq.k_offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, hk);
        const T* v = static_cast<const T*>(p.v) + seq.k_offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, hk);
        const int rows_q = min(kBlockM, seq.seqlen_q - m0);
        const bool vec_k = p.aligned & CF_ALIGN_K, vec_v = p.aligned & CF_ALIGN_V;

        // The key tiles to visit, walked from the last position to the first.
        const auto tiles = index_mask.key_tiles<kSparse>(p, b, h, m0, kBlockM, kBlockN);

        float acc_o[kMT][kDT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int dt = 0; dt < kDT; ++dt) acc_o[mt][dt][0] = acc_o[mt][dt][1] = acc_o[mt][dt][2] = acc_o[mt][dt][3] = 0.f;
        OnlineSoftmax<kNT> softmax[kMT];
        const bool dropout = kGeneral && (p.flags & CF_HAS_DROPOUT);
        const DropoutRng rng(p);

        if (tiles.lo < tiles.hi) {
            load_tile<T, kBlockM, kHeadDim, kLd, kThreads>(sQ, q, p.q_row_stride, rows_q, p.head_dim,
                                                           p.aligned & CF_ALIGN_Q, tid);
            {
                const int n0 = tiles.at(tiles.hi - 1) * kBlockN;
                load_tile<T, kBlockN, kHeadDim, kLd, kThreads>(sK, k + (i64)n0 * p.k_row_stride, p.k_row_stride,
                                                               min(kBlockN, seq.seqlen_k - n0), p.head_dim, vec_k, tid);
            }
            cp_async_commit();
            FragA<T> q_frags[kQFrags];
            if constexpr (kQInRegs) {
                cp_async_wait<0>();
                __syncthreads();
#pragma unroll
                for (int kk = 0; kk < kQFrags; ++kk) load_a<T, kLd>(q_frags[kk], sQ, warp * 16, kk * 16, lane);
            }
            const ScoreMods mods(p, seq, b, h);
            const int warp_row0 = m0 + warp * kWarpRows;  // rows of m16 tile mt: warp_row0 + 16 mt + {g, g + 8}

            for (int i = tiles.hi - 1; i >= tiles.lo; --i) {
                const int n0 = tiles.at(i) * kBlockN;
                cp_async_wait<0>();
                __syncthreads();  // K(n) (and Q) landed; every warp is done with V(n+1)
                load_tile<T, kBlockN, kHeadDim, kLd, kThreads>(sV, v + (i64)n0 * p.v_row_stride, p.v_row_stride,
                                                               min(kBlockN, seq.seqlen_k - n0), p.head_dim, vec_v, tid);
                cp_async_commit();

                float s[kMT][kNT][4];
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
                    for (int nt = 0; nt < kNT; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
                for (int kk = 0; kk < kHeadDim / 16; ++kk) {
                    FragA<T> a[kMT];
                    if constexpr (kQInRegs) {
                        a[0] = q_frags[kk];
                    } else {
#pragma unroll
                        for (int mt = 0; mt < kMT; ++mt) load_a<T, kLd>(a[mt], sQ, warp * kWarpRows + mt * 16, kk * 16, lane);
                    }
#pragma unroll
                    for (int np = 0; np < kNT / 2; ++np) {
                        FragB<T> b0, b1;
                        load_b2<T, kLd>(b0, b1, sK, np * 16, kk * 16, lane);
#pragma unroll
                        for (int mt = 0; mt < kMT; ++mt) {
                            mma(s[mt][2 * np], a[mt], b0);
                            mma(s[mt][2 * np + 1], a[mt], b1);
                        }
                    }
                }

                // Scores to log2 units; disallowed ones to -inf. The product is rounded on
                // its own (__fmul_rn is never contracted into an FMA): the backward rounds
                // it the same way, so both see the same scores even where one ulp of a
                // huge score is larger than the whole softmax range.
                if constexpr (kGeneral) {
#pragma unroll
                    for (int mt = 0; mt < kMT; ++mt) {
                        float unused[kNT][4];
                        mods.to_log2<kNT, false>(s[mt], unused, warp_row0 + mt * 16 + g, n0 + 2 * t, index_mask);
                    }
                } else {
#pragma unroll
                    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
                        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                            for (int e = 0; e < 4; ++e) s[mt][nt][e] = __fmul_rn(s[mt][nt][e], p.scale_log2);
                    if (!index_mask.tile_is_full(m0, kBlockM, n0, kBlockN)) {
#pragma unroll
                        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
                            for (int r = 0; r < 2; ++r) {
                                int lo, hi;
                                index_mask.row_limits(warp_row0 + mt * 16 + g + 8 * r, lo, hi);
#pragma unroll
                                for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                                    for (int c = 0; c < 2; ++c) {
                                        const int j = n0 + nt * 8 + 2 * t + c;
                                        if (j < lo || j > hi) s[mt][nt][2 * r + c] = -CF_INF;
                                    }
                            }
                    }
                }

                cp_async_wait<0>();
                __syncthreads();  // V(n) landed; every warp is done with K(n)
                if (i > tiles.lo) {
                    const int n0_next = tiles.at(i - 1) * kBlockN;
                    load_tile<T, kBlockN, kHeadDim, kLd, kThreads>(sK, k + (i64)n0_next * p.k_row_stride, p.k_row_stride,
                                                                   min(kBlockN, seq.seqlen_k - n0_next), p.head_dim,
                                                                   vec_k, tid);
                    cp_async_commit();
                }

#pragma unroll
                for (int mt = 0; mt < kMT; ++mt) softmax[mt].step(s[mt], acc_o[mt]);
                if (dropout) {
                    // The row sums keep every probability; dropout only thins what P·V sees.
#pragma unroll
                    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
                        for (int nt = 0; nt < kNT; ++nt) {
                            bool keep[4];
                            rng.keep4(bh, warp_row0 + mt * 16 + g, n0 + nt * 8 + 2 * t, keep);
#pragma unroll
                            for (int e = 0; e < 4; ++e)
                                if (!keep[e]) s[mt][nt][e] = 0.f;
                        }
                }

#pragma unroll
                for (int kk = 0; kk < kBlockN / 16; ++kk) {
                    FragA<T> a[kMT];
#pragma unroll
                    for (int mt = 0; mt < kMT; ++mt) acc_to_a<T>(a[mt], s[mt], kk);
#pragma unroll
                    for (int dp = 0; dp < kDT / 2; ++dp) {
                        FragB<T> b0, b1;
                        load_b2_t<T, kLd>(b0, b1, sV, dp * 16, kk * 16, lane);
#pragma unroll
                        for (int mt = 0; mt < kMT; ++mt) {
                            mma(acc_o[mt][2 * dp], a[mt], b0);
                            mma(acc_o[mt][2 * dp + 1], a[mt], b1);
                        }
                    }
                }
            }
        }

        // Epilogue: normalise, stage O through this warp's own rows of sQ, store.
        const float keep_scale = dropout ? p.dropout_scale : 1.f;
        float lse[kMT][2];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
            float inv_sum[2];
            softmax[mt].finish(inv_sum, lse[mt]);
#pragma unroll
            for (int dt = 0; dt < kDT; ++dt) {
                acc_o[mt][dt][0] *= inv_sum[0] * keep_scale;
                acc_o[mt][dt][1] *= inv_sum[0] * keep_scale;
                acc_o[mt][dt][2] *= inv_sum[1] * keep_scale;
                acc_o[mt][dt][3] *= inv_sum[1] * keep_scale;
            }
            store_acc<T, kLd>(sQ, acc_o[mt], warp * kWarpRows + mt * 16, 0, lane, 1.f);
        }
        __syncthreads();
        T* o = static_cast<T*>(p.out) + seq.q_offset(p.o_batch_stride, p.o_row_stride, p.o_head_stride, b, h) +
               (i64)m0 * p.o_row_stride;
        store_tile<T, kBlockM, kHeadDim, kLd, kThreads>(o, p.o_row_stride, sQ, rows_q, p.head_dim,
                                                        p.aligned & CF_ALIGN_O, tid);
        if (t == 0) {
            float* lse_row = p.lse + seq.q_offset(p.lse_batch_stride, 1, p.lse_head_stride, b, h);
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int i = m0 + warp * kWarpRows + mt * 16 + g + 8 * r;
                    if (i < seq.seqlen_q) lse_row[i] = lse[mt][r];
                }
        }
    }
};

#if CF_ELEM == 0
typedef half_t ElemT;
#elif CF_ELEM == 1
typedef bf16_t ElemT;
#else
typedef float ElemT;
#endif

extern "C" __global__ void __launch_bounds__(CF_FWD_WARPS * 32) cuflash_fwd(const __grid_constant__ Params p) {
    extern __shared__ __align__(128) char smem[];
    FwdKernel<ElemT, CF_HEAD_DIM, CF_FWD_BLOCK_M, CF_FWD_BLOCK_N, CF_FWD_WARPS, CF_GENERAL != 0, CF_FWD_Q_REGS != 0,
              CF_BLOCK_SPARSE != 0>::run(p, smem);
}

// Debugging aid, for small problems: the probabilities P = exp(s - lse) of every
// (batch, head, query, key), before dropout, from the forward's LSE, with the same
// masks and score modifiers. One thread per element, fp32 dot products; written densely
// as fp32 [batch][head][seqlen_q][seqlen_k] through the dbias_full pointer and strides.
extern "C" __global__ void __launch_bounds__(128) cuflash_probs(const __grid_constant__ Params p) {
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 per_head = (i64)p.seqlen_q * p.seqlen_k;
    if (idx >= per_head * p.batch * p.num_heads) return;
    const int j = (int)(idx % p.seqlen_k), i = (int)((idx / p.seqlen_k) % p.seqlen_q);
    const int bh = (int)(idx / per_head), b = bh / p.num_heads, h = bh % p.num_heads;
    const SeqInfo seq(p, b);
    float* out = p.dbias_full + (i64)b * p.dbias_batch_stride + (i64)h * p.dbias_head_stride +
                 (i64)i * p.dbias_row_stride + j;
    if (i >= seq.seqlen_q || j >= seq.seqlen_k) {
        *out = 0.f;
        return;
    }
    const int hk = h / (p.num_heads / p.num_heads_kv);
    const ElemT* q = static_cast<const ElemT*>(p.q) + seq.q_offset(p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, h) +
                     (i64)i * p.q_row_stride;
    const ElemT* k = static_cast<const ElemT*>(p.k) + seq.k_offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, hk) +
                     (i64)j * p.k_row_stride;
    float qk = 0.f;
    for (int d = 0; d < p.head_dim; ++d) qk += to_float(q[d]) * to_float(k[d]);
    const IndexMask index_mask(p, seq);
    int lo, hi;
    index_mask.row_limits(i, lo, hi);
    const bool ok = j >= lo && j <= hi && (!CF_BLOCK_SPARSE || block_allows(p, b, h, i, j));
    float x;
    if (CF_GENERAL) {
        const ScoreMods mods(p, seq, b, h);
        x = mods.to_log2_one(qk, i, j, ok);
    } else {
        x = ok ? __fmul_rn(qk, p.scale_log2) : -CF_INF;
    }
    const float lse = p.lse[seq.q_offset(p.lse_batch_stride, 1, p.lse_head_stride, b, h) + i];
    *out = lse == -CF_INF ? 0.f : exp2f(x - lse * CF_LOG2E);
}
