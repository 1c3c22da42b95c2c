// Hopper (sm_90a) building blocks shared by the warpgroup-MMA kernels: wgmma fences and
// groups, shared-memory matrix descriptors, and tiles in the 128-byte swizzle they read.
//
// A swizzled tile of R rows and D columns (16-bit elements, D a multiple of 64) is stored
// as D/64 column blocks of R rows of 128 bytes; 16-byte chunk c of row r sits at chunk
// c ^ (r % 8). Read K-major (the contraction runs along the rows' 128 bytes), a k-step of
// 16 columns starts 32 bytes into the rows: leading offset 16, stride 1024 (8 rows).
// Read MN-major (the contraction runs down the rows), a k-step of 16 rows starts 16 x 128
// bytes further: leading offset R x 128 (the next 64 columns), stride 1024.
#pragma once
#include "common.cuh"
#include "tile_io.cuh"
#include "wgmma.cuh"

CF_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
CF_DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
CF_DEVICE void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Waits until at most N of this warpgroup's committed groups are pending (groups finish in
// order).
template <int N>
CF_DEVICE void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// cp.async and st.shared write through the generic proxy; wgmma reads through the async
// proxy. Each writer fences before the barrier that publishes its writes.
CF_DEVICE void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Pins accumulator registers at a point of the program: the compiler must not move
// their reads or writes across it (wgmma reads and writes them asynchronously).
template <int N>
CF_DEVICE void pin(float (&d)[N][4]) {
#pragma unroll
    for (int j = 0; j < N; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
}

// Shared-memory matrix descriptor: start address, leading and stride byte offsets (all
// in 16-byte units), 128-byte swizzle.
CF_DEVICE u64 smem_desc(u32 addr, u32 lead_bytes, u32 stride_bytes) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)((lead_bytes >> 4) & 0x3FFF) << 16) |
           ((u64)((stride_bytes >> 4) & 0x3FFF) << 32) | ((u64)1 << 62);
}

// Byte offset of 16-byte chunk `c` (counted across the whole row) of row r in a swizzled
// tile of kRows rows.
template <int kRows>
CF_DEVICE u32 swizzled(int r, int c) {
    return (u32)((c >> 3) * (kRows * 128) + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// tile = src[r * row_stride + c] for r < rows, c < cols; zeros elsewhere in kRows x kD.
template <typename T, int kRows, int kD, int kThreads>
CF_DEVICE void load_swizzled(u32 tile, char* tile_ptr, const T* src, i64 row_stride, int rows, int cols, bool vec,
                             int tid) {
    constexpr int kChunksPerRow = kD / 8;
    if (vec) {
        constexpr int kChunks = kRows * kChunksPerRow;
#pragma unroll
        for (int i = 0; i < (kChunks + kThreads - 1) / kThreads; ++i) {
            const int c = tid + i * kThreads;
            if (kChunks % kThreads == 0 || c < kChunks) {
                const int r = c / kChunksPerRow, ch = c % kChunksPerRow;
                const bool pred = r < rows && ch * 8 < cols;
                const T* from = pred ? src + r * row_stride + ch * 8 : src;
                cp_async_16(tile + swizzled<kRows>(r, ch), from, pred);
            }
        }
    } else {
        for (int e = tid; e < kRows * kD; e += kThreads) {
            const int r = e / kD, col = e % kD;
            T value = (r < rows && col < cols) ? src[r * row_stride + col] : from_float<T>(0.f);
            *reinterpret_cast<T*>(tile_ptr + swizzled<kRows>(r, col >> 3) + (col & 7) * 2) = value;
        }
    }
}

