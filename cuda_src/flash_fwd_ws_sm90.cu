// Attention forward for Hopper (sm_90a), warp-specialised: TMA loads, a ring of K/V stages
// guarded by mbarriers, and two consumer warpgroups that take turns on the tensor cores.
// 16-bit inputs; with CF_GENERAL the score modifiers (softcap, ALiBi, float bias, boolean
// mask) and dropout are compiled in.
//
// A query tile is kBlockM = 128 rows of one (batch, head); a thread block takes one tile,
// or, launched persistent (one block per SM), every gridDim.x-th tile (query_block_index).
// Three warpgroups:
//
//   producer (warpgroup 0)   one thread issues every copy: per query tile Q once (into a
//                            slot freed by a "Q empty" barrier: it doubles as O's staging),
//                            then K(n) and V(n) for each key tile into the next slot of two
//                            rings of kStages, each slot with a "full" barrier (armed with
//                            the tile's bytes) and an "empty" barrier (the consumers release
//                            it); ring positions run on across query tiles, so the next
//                            tile's loads overlap this one's last products. The warpgroup
//                            keeps 24 registers per thread (setmaxnreg).
//   consumers (1 and 2)      64 query rows each, 240 registers per thread. Per key tile,
//                            walked from the last to the first:
//                              S(n) = Q K(n)ᵀ      wgmma, both operands in shared memory
//                              O += P(n+1) V(n+1)  wgmma, P from registers (RS)
//                              softmax of S(n)     in registers, under P(n+1)·V(n+1)
//                            so a warpgroup's softmax overlaps its own P·V product; the two
//                            warpgroups also issue their products in turn (named barriers),
//                            so one's softmax runs while the other's products occupy the
//                            tensor cores.
//
// Masks come from mask.cuh (IndexMask on the 128-row tile, SeqInfo per sequence), exactly
// as in the other forward kernels. The accumulator layout is mma.sync's, so softmax.cuh's
// OnlineSoftmax and mma.cuh's register conversion apply unchanged: a wgmma m64nN
// accumulator gives warp w of a warpgroup rows 16w + g and 16w + g + 8 and, in its n8 tile
// nt, columns 8nt + 2t and 8nt + 2t + 1, the four elements of one m16n8 tile of mma.sync.
// So the general variant calls mask.cuh's ScoreMods::to_log2 and philox.cuh's
// DropoutRng::keep4 with the same (i0, j0) as the portable kernel does for those rows and
// keys (i0 = the row of g, with i0 & 8 == 0 since tiles start at multiples of 128; j0 =
// the tile's first key + 2t): the same scores, and the same keep mask bit for bit, which
// the backward regenerates from the same global coordinates. Bias and mask are read from
// global memory element by element, where the index rules allow, as the portable kernel
// reads them (not yet tile by tile through shared memory). O is normalised, staged in the
// consumer's own rows of the Q tile (swizzled) and stored once; LSE as the other forward
// kernels write it.
//
// Compile-time configuration (cuflash/_tiles.py): CF_ELEM 0/1 = fp16/bf16, CF_HEAD_DIM
// (64, 128 or 256: the padded head dim), CF_FWD_BLOCK_N (key tile: 64 or 128),
// CF_FWD_STAGES (K/V ring depth), CF_FWD_SMEM (the bytes the host provides), CF_GENERAL
// (score modifiers and dropout compiled in).
#include "common.cuh"
#include "mask.cuh"
#include "mbarrier.cuh"
#include "mma.cuh"
#include "philox.cuh"
#include "sm90.cuh"
#include "softmax.cuh"
#include "tma.cuh"

// Named barrier ids (0 is __syncthreads).
enum WsBarrier : int {
    kTurnFirst = 1,  // + consumer index: that consumer's turn to issue products
    kVZeroed = 3,    // both consumers: the tail rows of a packed sequence's last V tile are zero
    kOStaged = 4,    // + consumer index: its O rows are staged in shared memory
};

// Shared-memory accesses by 32-bit shared-window address: the consumers keep no 64-bit
// generic pointer into shared memory live beside their accumulators.
CF_DEVICE void st_shared_u32(u32 addr, u32 x) { asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(x) : "memory"); }
CF_DEVICE void st_shared_zero16(u32 addr) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0u) : "memory");
}
CF_DEVICE uint4 ld_shared_16(u32 addr) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(addr)
                 : "memory");
    return v;
}

template <typename T, int kD, int kBlockN, int kStages, bool kGeneral>
struct FwdWs {
    static constexpr int kConsumers = 2, kBlockM = 64 * kConsumers, kThreads = 128 * (kConsumers + 1);
    static constexpr int kNT = kBlockN / 8, kDT = kD / 8, kColBlocks = kD / 64;
    static constexpr u32 kQBytes = kBlockM * kD * 2, kKVBytes = kBlockN * kD * 2;
    // Shared memory from a 1024-byte aligned base (swizzle atoms): Q, the K ring, the V
    // ring, then the barriers. The host allocates kSmemBytes + 1 KB (_tiles.ws_fwd_smem).
    static constexpr u32 kOffK = kQBytes, kOffV = kOffK + kStages * kKVBytes, kOffBar = kOffV + kStages * kKVBytes;
    static constexpr int kBarriers = 2 + 4 * kStages;  // Q full, Q empty; K full, K empty, V full, V empty per stage
    static constexpr u32 kSmemBytes = kOffBar + 8 * kBarriers;
    static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
    // General: to_log2 takes the key tile in this many parts (its allowed flags are as many
    // registers as the scores). The smallest count without spills (ptxas -v, sm_90a): 64
    // keys at d=64, 32 at d=128 (64: 92 B spilled), 16 at d=256 (32: 16 B).
    static constexpr int kScoreParts = kD == 64 ? kBlockN / 64 : kD == 128 ? kBlockN / 32 : kBlockN / 16;
    static_assert(kD == 64 || kD == 128 || kD == 256, "head dims padded to 64, 128 or 256");
    static_assert(kBlockN == 64 || kBlockN == 128, "key tiles with a wgmma_ss shape and a TMA box of <= 256 rows");
    static_assert(kProducerRegs * 128 + kConsumerRegs * 128 * kConsumers <= 65536, "register file");

    // QueryBlock's linear index of the block's linear-th tile. One tile per block: the
    // same order (blocks start in index order, heaviest query tile of each (batch, head)
    // first). Persistent (fewer blocks than tiles, each taking every gridDim.x-th tile):
    // (batch, head) rows in sections whose K and V fit in L2 together (about 24 MB, from
    // the longest key sequence), each section walked heaviest query tile first across its
    // rows, so every block's causal work runs from long to short and the blocks running
    // at once share K and V in L2.
    static CF_DEVICE int query_block_index(const Params& p, int linear, int num_tiles) {
        if ((int)gridDim.x >= num_tiles) return linear;
        const int rows = p.batch * p.num_heads, num_m = p.num_m_blocks;
        const i64 kv_bytes = 4ll * max(p.seqlen_k, 1) * kD;
        const int section = (int)min((i64)rows, max((i64)1, (i64)(24 << 20) / kv_bytes));
        const int s_idx = linear / (section * num_m), within = linear % (section * num_m);
        const int rows_here = min(section, rows - s_idx * section);
        const int m_rev = within / rows_here, bh = s_idx * section + within % rows_here;
        return bh * num_m + m_rev;  // QueryBlock: m_block = num_m - 1 - m_rev
    }

    // One query tile's rows, lengths and key tiles, as producer and consumers both see it.
    struct Tile {
        QueryBlock blk;
        SeqInfo seq;
        IndexMask index_mask;
        int n_lo, n_hi, tiles;  // key blocks [n_lo, n_hi), walked from the last
        bool valid;             // the tile holds query rows of its sequence

        CF_DEVICE Tile(const Params& p, int linear, int num_tiles)
            : blk(p, kBlockM, query_block_index(p, linear, num_tiles)), seq(p, blk.b), index_mask(p, seq) {
            valid = blk.m0 < seq.seqlen_q;
            index_mask.key_blocks(blk.m0, kBlockM, kBlockN, n_lo, n_hi);
            tiles = valid ? max(n_hi - n_lo, 0) : 0;
        }
    };

    static CF_DEVICE void run(const Params& p, const TmaDesc* tq, const TmaDesc* tk, const TmaDesc* tv,
                              char* smem_raw) {
        const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
        const int role = warp >> 2;  // 0: producer, 1..kConsumers: consumers
        // Query tiles in QueryBlock's order; a block takes blockIdx.x, then every
        // gridDim.x-th (the host launches one block per tile, or one per SM: persistent).
        const int num_tiles = p.num_m_blocks * p.batch * p.num_heads;  // <= the grid limit (host-checked)

        const u32 raw = smem_addr(smem_raw);
        const u32 sbase = (raw + 1023u) & ~1023u;
        const u32 sQ = sbase, sK = sbase + kOffK, sV = sbase + kOffV;
        const u32 q_full = sbase + kOffBar, q_empty = q_full + 8u;
        auto k_full = [&](int s) { return q_full + 8u * (2 + s); };
        auto k_empty = [&](int s) { return q_full + 8u * (2 + kStages + s); };
        auto v_full = [&](int s) { return q_full + 8u * (2 + 2 * kStages + s); };
        auto v_empty = [&](int s) { return q_full + 8u * (2 + 3 * kStages + s); };

        if (tid == 0) {
            mbar_init(q_full, 1);
            // The Q tile doubles as the O staging area: it is free again once every
            // consumer warp has stored its O rows.
            mbar_init(q_empty, 4 * kConsumers);
            for (int s = 0; s < kStages; ++s) {
                mbar_init(k_full(s), 1);
                mbar_init(v_full(s), 1);
                // Every consumer warp releases a slot once its products have read it.
                mbar_init(k_empty(s), 4 * kConsumers);
                mbar_init(v_empty(s), 4 * kConsumers);
            }
            mbar_fence_init();
        }
        __syncthreads();

        // TMA coordinates: a packed (varlen) batch is one sequence of rows (batch index 0)
        // and each sequence starts at its first packed row.
        const bool varlen = p.flags & CF_IS_VARLEN;

        if (role == 0) {
            regs_dealloc<kProducerRegs>();
            if (warp == 0 && lane == 0) {
                tma_prefetch_desc(tq);
                tma_prefetch_desc(tk);
                tma_prefetch_desc(tv);
                // Ring position (K/V copies issued) and Q tiles loaded, over every tile of
                // this block: the consumers count the same way.
                int ring = 0, q_loads = 0;
                for (int linear = blockIdx.x; linear < num_tiles; linear += gridDim.x) {
                    const Tile tile(p, linear, num_tiles);
                    if (tile.tiles == 0) continue;  // nothing to load: the consumers write zeros
                    const int batch_coord = varlen ? 0 : tile.blk.b;
                    for (int it = 0; it < tile.tiles; ++it, ++ring) {
                        const int stage = ring % kStages;
                        const u32 phase = (ring / kStages) & 1;
                        const int k_row = (int)tile.seq.k_row0 + (tile.n_hi - 1 - it) * kBlockN;
                        mbar_wait(k_empty(stage), phase ^ 1);
                        mbar_arrive_expect_tx(k_full(stage), kKVBytes);
#pragma unroll
                        for (int cb = 0; cb < kColBlocks; ++cb)
                            tma_load_4d(sK + stage * kKVBytes + cb * (kBlockN * 128), tk, cb * 64, k_row, tile.blk.hk,
                                        batch_coord, k_full(stage));
                        if (it == 0) {
                            // Q's slot holds the previous tile's staged O until the consumers
                            // stored it; the first K copy goes ahead of that wait. (Waiting
                            // first on a K or V slot the new tile itself must free would
                            // deadlock: the consumers need this Q to free it.)
                            if (q_loads > 0) mbar_wait(q_empty, (q_loads - 1) & 1);
                            mbar_arrive_expect_tx(q_full, kQBytes);
#pragma unroll
                            for (int cb = 0; cb < kColBlocks; ++cb)
                                tma_load_4d(sQ + cb * (kBlockM * 128), tq, cb * 64,
                                            (int)tile.seq.q_row0 + tile.blk.m0, tile.blk.h, batch_coord, q_full);
                            ++q_loads;
                        }
                        mbar_wait(v_empty(stage), phase ^ 1);
                        mbar_arrive_expect_tx(v_full(stage), kKVBytes);
#pragma unroll
                        for (int cb = 0; cb < kColBlocks; ++cb)
                            tma_load_4d(sV + stage * kKVBytes + cb * (kBlockN * 128), tv, cb * 64, k_row, tile.blk.hk,
                                        batch_coord, v_full(stage));
                    }
                }
            }
            return;  // the copies in flight complete on their barriers; consumers keep the block alive
        }

        regs_alloc<kConsumerRegs>();
        const int wg = role - 1, ctid = tid - 128, wtid = tid & 127;
        const int g = lane >> 2, t = lane & 3;
        const int r_local = wg * 64 + (warp & 3) * 16 + g;  // this thread's rows of the tile: +0, +8

        // The consumers issue their products in turn: wait for ours, then pass it on. Both
        // take the same number of turns per tile (one more than its key tiles), so the
        // order carries over from tile to tile; consumer 0 goes first.
        auto turn_begin = [&]() { named_sync(kTurnFirst + wg, 256); };
        auto turn_end = [&]() { named_arrive(kTurnFirst + (wg ^ 1), 256); };
        auto release = [&](u32 bar) {
            if (lane == 0) mbar_arrive(bar);
        };
        if (wg == 1) named_arrive(kTurnFirst, 256);

        int ring = 0, q_loads = 0;
        for (int linear = blockIdx.x; linear < num_tiles; linear += gridDim.x) {
            const Tile tile(p, linear, num_tiles);
            if (!tile.valid) continue;
            const SeqInfo& seq = tile.seq;
            const IndexMask& index_mask = tile.index_mask;
            const int b = tile.blk.b, h = tile.blk.h, m0 = tile.blk.m0, n_hi = tile.n_hi, tiles = tile.tiles;
            const int row0 = m0 + r_local;
            const bool dropout = kGeneral && (p.flags & CF_HAS_DROPOUT);

            float acc_o[kDT][4];
#pragma unroll
            for (int dt = 0; dt < kDT; ++dt) acc_o[dt][0] = acc_o[dt][1] = acc_o[dt][2] = acc_o[dt][3] = 0.f;
            OnlineSoftmax<kNT> softmax;

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
                    const u64 db = smem_desc(sK + stage * kKVBytes + (kk >> 2) * (kBlockN * 128) + col, 16, 1024);
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
                    const u64 db = smem_desc(sV + stage * kKVBytes + kk * (16 * 128), kBlockN * 128, 1024);
                    wgmma_rs<T, kD>(acc_o, pa[kk].x, db);
                }
                wgmma_commit();
            };
            // Scores to log2 units (rounded alone, as the backward rounds them), masked by
            // index only on tiles that straddle a limit. General: ScoreMods on every tile, in
            // kScoreParts column parts.
            auto to_log2 = [&](float (&s)[kNT][4], int n0) {
                if constexpr (kGeneral) {
                    const ScoreMods mods(p, seq, b, h);
                    constexpr int kPart = kNT / kScoreParts;
#pragma unroll
                    for (int part = 0; part < kScoreParts; ++part) {
                        float(&sp)[kPart][4] = *reinterpret_cast<float(*)[kPart][4]>(&s[part * kPart][0]);
                        float unused[kPart][4];
                        mods.to_log2<kPart, false>(sp, unused, row0, n0 + part * kPart * 8 + 2 * t, index_mask);
                    }
                } else {
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
                }
            };
            // Dropout thins P for P·V only: the row sums (taken by `update`) keep every
            // probability, and the epilogue scales O by 1 / (1 - p).
            auto drop = [&](float (&s)[kNT][4], int n0) {
                if constexpr (kGeneral) {
                    const DropoutRng rng(p);
#pragma unroll
                    for (int nt = 0; nt < kNT; ++nt) {
                        bool keep[4];
                        rng.keep4(tile.blk.bh, row0, n0 + nt * 8 + 2 * t, keep);
#pragma unroll
                        for (int e = 0; e < 4; ++e)
                            if (!keep[e]) s[nt][e] = 0.f;
                    }
                }
            };
            // Ring slot and phase of this tile's it-th key tile.
            auto slot = [&](int it) { return (ring + it) % kStages; };
            auto parity = [&](int it) { return (u32)(((ring + it) / kStages) & 1); };

            if (tiles > 0) {
                mbar_wait(q_full, q_loads & 1);
                // A packed sequence's last key tile runs into the next sequence's rows (TMA
                // zero-fills only past the whole tensor). Their scores are masked to -inf, so
                // P is 0 there, but 0 x (inf or NaN) in V would still reach O: zero those V
                // rows. Only the first key tile walked can be partial.
                const int tail = seq.seqlen_k - (n_hi - 1) * kBlockN;
                if (varlen && tail < kBlockN) {
                    mbar_wait(v_full(slot(0)), parity(0));
                    const int chunks = (kBlockN - tail) * 8;  // 16-byte chunks of the tail rows, per column block
                    for (int c = ctid; c < chunks * kColBlocks; c += 128 * kConsumers) {
                        const int cb = c / chunks, r = tail + (c % chunks) / 8, ch = c % 8;
                        st_shared_zero16(sV + slot(0) * kKVBytes + cb * (kBlockN * 128) + r * 128 + ch * 16);
                    }
                    fence_proxy_async();  // st.shared before the async proxy (wgmma) reads
                    named_sync(kVZeroed, 128 * kConsumers);
                }

                FragA<T> pa[kBlockN / 16];  // P of the previous key tile, until its product is issued
                float s[kNT][4];
                float alpha[2];
                mbar_wait(k_full(slot(0)), parity(0));
                turn_begin();
                issue_s(s, slot(0));
                turn_end();
                wgmma_wait_all();
                pin(s);
                release(k_empty(slot(0)));
                to_log2(s, (n_hi - 1) * kBlockN);
                softmax.update(s, alpha);  // O is still 0: nothing to rescale
                if (dropout) drop(s, (n_hi - 1) * kBlockN);
#pragma unroll
                for (int kk = 0; kk < kBlockN / 16; ++kk) acc_to_a<T>(pa[kk], s, kk);

                for (int it = 1; it < tiles; ++it) {
                    const int stage = slot(it), prev = slot(it - 1);
                    mbar_wait(k_full(stage), parity(it));
                    mbar_wait(v_full(prev), parity(it - 1));
                    turn_begin();
                    issue_s(s, stage);
                    issue_pv(pa, prev);
                    turn_end();
                    wgmma_wait<1>();  // S(n) done (groups complete in order); P·V still running
                    pin(s);
                    release(k_empty(stage));
                    to_log2(s, (n_hi - 1 - it) * kBlockN);
                    softmax.update(s, alpha);
                    if (dropout) drop(s, (n_hi - 1 - it) * kBlockN);  // under P·V, like the softmax
                    wgmma_wait_all();  // P·V done: O may be rescaled, pa reused, V released
                    pin(acc_o);
                    release(v_empty(prev));
                    OnlineSoftmax<kNT>::rescale(acc_o, alpha);
#pragma unroll
                    for (int kk = 0; kk < kBlockN / 16; ++kk) acc_to_a<T>(pa[kk], s, kk);
                }
                mbar_wait(v_full(slot(tiles - 1)), parity(tiles - 1));
                turn_begin();
                issue_pv(pa, slot(tiles - 1));
                turn_end();
                wgmma_wait_all();
                pin(acc_o);
                release(v_empty(slot(tiles - 1)));
                ring += tiles;
            }

            // Epilogue: normalise, then store O. With key tiles, O is staged in this
            // warpgroup's own rows of the Q tile (its products are complete, and the other
            // warpgroup reads only its own rows) for whole 16-byte rows; without, the rows
            // are zeros and Q's slot may hold another tile's data: store them directly.
            float inv_sum[2], lse[2];
            softmax.finish(inv_sum, lse);
            if (dropout) {
                inv_sum[0] *= p.dropout_scale;
                inv_sum[1] *= p.dropout_scale;
            }
            OnlineSoftmax<kNT>::rescale(acc_o, inv_sum);
            T* o = static_cast<T*>(p.out) + seq.q_offset(p.o_batch_stride, p.o_row_stride, p.o_head_stride, b, h);
            const bool vec_o = p.aligned & CF_ALIGN_O;
            constexpr int kChunksPerRow = kD / 8;
            if (tiles > 0) {
#pragma unroll
                for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
                        const u32 at = swizzled<kBlockM>(r_local + 8 * hh, dt) + 4 * t;
                        st_shared_u32(sQ + at, pack2<T>(acc_o[dt][2 * hh], acc_o[dt][2 * hh + 1]));
                    }
                named_sync(kOStaged + wg, 128);
            }
            for (int c = wtid; c < 64 * kChunksPerRow; c += 128) {
                const int r = wg * 64 + c / kChunksPerRow, ch = c % kChunksPerRow;
                const int row = m0 + r, col = ch * 8;
                if (row >= seq.seqlen_q || col >= p.head_dim) continue;
                uint4 chunk = make_uint4(0u, 0u, 0u, 0u);
                if (tiles > 0) chunk = ld_shared_16(sQ + swizzled<kBlockM>(r, ch));
                T* to = o + (i64)row * p.o_row_stride + col;
                if (vec_o) {
                    *reinterpret_cast<uint4*>(to) = chunk;
                } else {
                    const T* from = reinterpret_cast<const T*>(&chunk);
                    for (int e = 0; e < 8 && col + e < p.head_dim; ++e) to[e] = from[e];
                }
            }
            if (tiles > 0) {
                named_sync(kOStaged + wg, 128);  // every thread read its staged rows
                fence_proxy_async();              // st.shared staging before the next Q's TMA writes
                release(q_empty);
                ++q_loads;
            }
            if (t == 0) {
                float* lse_row = p.lse + seq.q_offset(p.lse_batch_stride, 1, p.lse_head_stride, b, h);
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int i = row0 + 8 * r;
                    if (i < seq.seqlen_q) lse_row[i] = lse[r];
                }
            }
        }
    }
};

#if CF_ELEM == 0
typedef half_t ElemT;
#elif CF_ELEM == 1
typedef bf16_t ElemT;
#else
#error "the warp-specialised forward takes 16-bit inputs"
#endif

typedef FwdWs<ElemT, CF_HEAD_DIM, CF_FWD_BLOCK_N, CF_FWD_STAGES, CF_GENERAL != 0> Kernel;
// The host's dynamic shared memory (_tiles.ws_fwd_smem): the layout plus 1 KB of alignment.
static_assert(Kernel::kSmemBytes + 1024 == CF_FWD_SMEM, "host and kernel agree on shared memory");

extern "C" __global__ void __launch_bounds__(Kernel::kThreads, 1)
    cuflash_fwd(const __grid_constant__ Params p, const __grid_constant__ TmaDesc tq, const __grid_constant__ TmaDesc tk,
                const __grid_constant__ TmaDesc tv) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(1024) char smem[];
    Kernel::run(p, &tq, &tk, &tv, smem);
#endif
}
