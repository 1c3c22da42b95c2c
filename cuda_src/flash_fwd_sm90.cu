// Attention forward for Hopper (sm_90a): the FlashAttention-2 algorithm on warpgroup
// matrix products (wgmma), for 16-bit inputs without score modifiers.
//
// One thread block owns kBlockM = 64 x kWG query rows of one (batch, head); each
// warpgroup (4 warps) owns 64 of them. Per key tile, walked from the last to the first:
//
//   S = Q Kᵀ     wgmma, A = Q and B = K from shared memory (both K-major)
//   softmax      in registers; the accumulator layout is mma.sync's, so the mma.sync
//                kernel's masking and online softmax apply unchanged
//   O += P V     wgmma, A = P from registers, B = V from shared memory (MN-major)
//
// K and V are double-buffered: tile n-1 loads (cp.async) while tile n computes, with one
// barrier per tile. Shared tiles use the 128-byte swizzle of sm90.cuh. Head dims are padded
// to a multiple of 64 with zeros (they add nothing to S, and O's padding is not stored).
//
// Compile-time configuration (cuflash/_tiles.py): CF_ELEM 0/1 = fp16/bf16, CF_HEAD_DIM
// (the head-dim bucket), CF_FWD_BLOCK_N (key tile: 32, 64 or 128), CF_FWD_WARPS (4 x the
// warpgroups), CF_FWD_MIN_BLOCKS (resident blocks per SM the registers must allow),
// CF_FWD_OVERLAP (software-pipeline P·V of one key tile with the softmax of the next),
// CF_BLOCK_SPARSE (visit only the listed key blocks; TileRange in mask.cuh).
#include "common.cuh"
#include "mask.cuh"
#include "mma.cuh"
#include "sm90.cuh"
#include "softmax.cuh"
#include "tile_io.cuh"

template <typename T, int kHeadDim, int kBlockN, int kWG, bool kOverlap, bool kSparse>
struct FwdSm90 {
    static constexpr int kD = (kHeadDim + 63) / 64 * 64;
    static constexpr int kBlockM = 64 * kWG, kThreads = 128 * kWG;
    static constexpr int kNT = kBlockN / 8, kDT = kD / 8;
    static constexpr u32 kQBytes = kBlockM * kD * 2, kKVBytes = kBlockN * kD * 2;
    static constexpr int kLdO = kD + SmemPad<T>::kElems;  // unswizzled staging of O
    static_assert(kBlockN == 32 || kBlockN == 64 || kBlockN == 128, "key tiles with a wgmma_ss shape");

    static CF_DEVICE void run(const Params& p, char* smem_raw) {
        const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
        const int wg = warp >> 2, g = lane >> 2, t = lane & 3;

        const QueryBlock blk(p, kBlockM);
        const int b = blk.b, h = blk.h, hk = blk.hk, m0 = blk.m0;
        const SeqInfo seq(p, b);
        if (m0 >= seq.seqlen_q) return;
        const IndexMask index_mask(p, seq);

        // Swizzle atoms are 1024 bytes; the host adds 1 KB so the tiles can be aligned.
        const u32 raw = smem_addr(smem_raw);
        const u32 sbase = (raw + 1023u) & ~1023u;
        char* smem = smem_raw + (sbase - raw);
        const u32 sQ = sbase;
        const u32 sK0 = sQ + kQBytes;
        const u32 sV0 = sK0 + 2 * kKVBytes;

        const T* q = static_cast<const T*>(p.q) + seq.q_offset(p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, h) +
                     (i64)m0 * p.q_row_stride;
        const T* k = static_cast<const T*>(p.k) + seq.k_offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, hk);
        const T* v = static_cast<const T*>(p.v) + seq.k_offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, hk);
        const int rows_q = min(kBlockM, seq.seqlen_q - m0);
        const bool vec_k = p.aligned & CF_ALIGN_K, vec_v = p.aligned & CF_ALIGN_V;

        // The key tiles to visit, walked from the last position to the first.
        const auto tiles = index_mask.key_tiles<kSparse>(p, b, h, m0, kBlockM, kBlockN);

        float acc_o[kDT][4];
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) acc_o[dt][0] = acc_o[dt][1] = acc_o[dt][2] = acc_o[dt][3] = 0.f;
        OnlineSoftmax<kNT> softmax;
        const int row0 = m0 + wg * 64 + (warp & 3) * 16 + g;  // this thread's rows: row0, row0 + 8

        auto load_k = [&](int n_block, int stage) {
            const int n0 = n_block * kBlockN;
            const u32 off = stage * kKVBytes;
            load_swizzled<T, kBlockN, kD, kThreads>(sK0 + off, smem + (sK0 - sbase) + off, k + (i64)n0 * p.k_row_stride,
                                                    p.k_row_stride, min(kBlockN, seq.seqlen_k - n0), p.head_dim, vec_k, tid);
        };
        auto load_v = [&](int n_block, int stage) {
            const int n0 = n_block * kBlockN;
            const u32 off = stage * kKVBytes;
            load_swizzled<T, kBlockN, kD, kThreads>(sV0 + off, smem + (sV0 - sbase) + off, v + (i64)n0 * p.v_row_stride,
                                                    p.v_row_stride, min(kBlockN, seq.seqlen_k - n0), p.head_dim, vec_v, tid);
        };
        // S = Q Kᵀ for this warpgroup's 64 rows (issued, not waited for).
        auto issue_s = [&](float (&s)[kNT][4], int stage) {
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
            pin(s);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < kD / 16; ++kk) {
                const u32 col = (kk & 3) * 32;  // byte offset of k-step kk inside a 128-byte row
                const u64 da = smem_desc(sQ + (kk >> 2) * (kBlockM * 128) + wg * (64 * 128) + col, 16, 1024);
                const u64 db = smem_desc(sK0 + stage * kKVBytes + (kk >> 2) * (kBlockN * 128) + col, 16, 1024);
                wgmma_ss<T, kBlockN>(s, da, db);
            }
            wgmma_commit();
        };
        // O += P V, P from registers (issued, not waited for).
        auto issue_pv = [&](const FragA<T> (&pa)[kBlockN / 16], int stage) {
            pin(acc_o);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < kBlockN / 16; ++kk) {
                const u64 db = smem_desc(sV0 + stage * kKVBytes + kk * (16 * 128), kBlockN * 128, 1024);
                wgmma_rs<T, kD>(acc_o, pa[kk].x, db);
            }
            wgmma_commit();
        };
        // Scores to log2 units (rounded alone, as the backward rounds them), masked.
        auto to_log2 = [&](float (&s)[kNT][4], int n0) {
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[nt][e] = __fmul_rn(s[nt][e], p.scale_log2);
            if (!index_mask.tile_is_full(m0, kBlockM, n0, kBlockN)) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    int lo, hi;
                    index_mask.row_limits(row0 + 8 * r, lo, hi);
#pragma unroll
                    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                        for (int c = 0; c < 2; ++c) {
                            const int j = n0 + nt * 8 + 2 * t + c;
                            if (j < lo || j > hi) s[nt][2 * r + c] = -CF_INF;
                        }
                }
            }
        };

        if (tiles.lo < tiles.hi && !kOverlap) {
            // K(n) and V(n) load together, one tile ahead of the products.
            load_swizzled<T, kBlockM, kD, kThreads>(sQ, smem, q, p.q_row_stride, rows_q, p.head_dim,
                                                    p.aligned & CF_ALIGN_Q, tid);
            load_k(tiles.at(tiles.hi - 1), 0);
            load_v(tiles.at(tiles.hi - 1), 0);
            cp_async_commit();
            for (int i = tiles.hi - 1, it = 0; i >= tiles.lo; --i, ++it) {
                const int n_block = tiles.at(i);
                const int stage = it & 1;
                cp_async_wait<0>();
                fence_proxy_async();
                __syncthreads();  // tile n landed; every warpgroup is done with the other buffers
                if (i > tiles.lo) {
                    const int n_next = tiles.at(i - 1);
                    load_k(n_next, stage ^ 1);
                    load_v(n_next, stage ^ 1);
                    cp_async_commit();
                }
                float s[kNT][4];
                issue_s(s, stage);
                wgmma_wait_all();
                pin(s);
                to_log2(s, n_block * kBlockN);
                softmax.step(s, acc_o);
                FragA<T> pa[kBlockN / 16];
#pragma unroll
                for (int kk = 0; kk < kBlockN / 16; ++kk) acc_to_a<T>(pa[kk], s, kk);
                issue_pv(pa, stage);
                wgmma_wait_all();
                pin(acc_o);
            }
        }
        if (tiles.lo < tiles.hi && kOverlap) {
            // Software pipeline across key tiles: while the softmax of tile n runs on the
            // CUDA cores, the tensor cores work on P(n+1)·V(n+1), issued just before. K
            // loads lead V loads by one tile: iteration n needs K(n) and V(n+1).
            load_swizzled<T, kBlockM, kD, kThreads>(sQ, smem, q, p.q_row_stride, rows_q, p.head_dim,
                                                    p.aligned & CF_ALIGN_Q, tid);
            load_k(tiles.at(tiles.hi - 1), 0);
            cp_async_commit();
            FragA<T> pa[kBlockN / 16];  // P of the previous tile, until its product is issued
            for (int i = tiles.hi - 1, it = 0; i >= tiles.lo; --i, ++it) {
                const int n_block = tiles.at(i);
                const int stage = it & 1;
                cp_async_wait<0>();
                fence_proxy_async();
                __syncthreads();  // K(n) and V(n+1) landed; the other buffers are free
                if (i > tiles.lo) load_k(tiles.at(i - 1), stage ^ 1);
                load_v(n_block, stage);
                cp_async_commit();
                float s[kNT][4];
                issue_s(s, stage);
                if (it > 0) {
                    issue_pv(pa, stage ^ 1);
                    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");  // S(n) done
                } else {
                    wgmma_wait_all();
                }
                pin(s);
                to_log2(s, n_block * kBlockN);
                float alpha[2];
                softmax.update(s, alpha);
                wgmma_wait_all();  // P(n+1)·V(n+1) done: O may be rescaled, pa reused
                pin(acc_o);
                OnlineSoftmax<kNT>::rescale(acc_o, alpha);
#pragma unroll
                for (int kk = 0; kk < kBlockN / 16; ++kk) acc_to_a<T>(pa[kk], s, kk);
            }
            cp_async_wait<0>();
            fence_proxy_async();
            __syncthreads();  // V of the last tile landed
            issue_pv(pa, (tiles.hi - tiles.lo - 1) & 1);
            wgmma_wait_all();
            pin(acc_o);
        }

        // Epilogue: normalise, stage O unswizzled (every warpgroup is past its last
        // product once the barrier passes), store.
        float inv_sum[2], lse[2];
        softmax.finish(inv_sum, lse);
        OnlineSoftmax<kNT>::rescale(acc_o, inv_sum);
        cp_async_wait<0>();
        __syncthreads();
        T* staging = reinterpret_cast<T*>(smem);
        store_acc<T, kLdO>(staging, acc_o, wg * 64 + (warp & 3) * 16, 0, lane, 1.f);
        __syncthreads();
        T* o = static_cast<T*>(p.out) + seq.q_offset(p.o_batch_stride, p.o_row_stride, p.o_head_stride, b, h) +
               (i64)m0 * p.o_row_stride;
        store_tile<T, kBlockM, kD, kLdO, kThreads>(o, p.o_row_stride, staging, rows_q, p.head_dim,
                                                   p.aligned & CF_ALIGN_O, tid);
        if (t == 0) {
            float* lse_row = p.lse + seq.q_offset(p.lse_batch_stride, 1, p.lse_head_stride, b, h);
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int i = row0 + 8 * r;
                if (i < seq.seqlen_q) lse_row[i] = lse[r];
            }
        }
    }

    // The host provides kQBytes + 4 kKVBytes + 1 KB of dynamic shared memory (_tiles.fwd_smem).
    static_assert(kBlockM * kLdO * 2 <= (int)(kQBytes + 4 * kKVBytes), "O staging fits in the tiles");
};

#if CF_ELEM == 0
typedef half_t ElemT;
#elif CF_ELEM == 1
typedef bf16_t ElemT;
#else
#error "the Hopper forward takes 16-bit inputs"
#endif

extern "C" __global__ void __launch_bounds__(CF_FWD_WARPS * 32, CF_FWD_MIN_BLOCKS) cuflash_fwd(const __grid_constant__ Params p) {
    extern __shared__ __align__(1024) char smem[];
    FwdSm90<ElemT, CF_HEAD_DIM, CF_FWD_BLOCK_N, CF_FWD_WARPS / 4, CF_FWD_OVERLAP != 0, CF_BLOCK_SPARSE != 0>::run(p, smem);
}
