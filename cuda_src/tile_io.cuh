// Moving tiles between global and shared memory, and accumulators into shared memory.
//
// Every load is bounded by the tile's valid rows and columns and zero-fills the rest, so
// whatever lies past the logical end of an input (padding, a neighbouring slice, NaN) is
// never read: padded head-dim columns contribute 0 to every product, and padded rows are
// masked by index. Rows move as 16-byte cp.async vectors when the tensor allows it
// (Params::aligned), element by element otherwise.
#pragma once
#include "common.cuh"

// Before sm_80 there is no cp.async: the same calls copy through registers and complete
// at once (commit and wait become no-ops), so every kernel's barrier structure, which
// publishes a tile after waiting for its copies, stays correct unchanged. Other warps and
// resident blocks hide the load latency that cp.async would have overlapped.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define CF_SYNC_COPIES 1
#endif

CF_DEVICE void cp_async_16(u32 dst, const void* src, bool pred) {
#ifdef CF_SYNC_COPIES
    u32 a = 0, b = 0, c = 0, d = 0;
    if (pred) asm volatile("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(a), "=r"(b), "=r"(c), "=r"(d) : "l"(src));
    asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};\n" ::"r"(dst), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
#else
    // src-size 0 reads nothing and writes 16 zero bytes.
    const int src_size = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_size));
#endif
}
CF_DEVICE void cp_async_4(void* dst, const void* src) {
#ifdef CF_SYNC_COPIES
    *static_cast<u32*>(dst) = *static_cast<const u32*>(src);
#else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(dst)), "l"(src));
#endif
}
CF_DEVICE void cp_async_commit() {
#ifndef CF_SYNC_COPIES
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
CF_DEVICE void cp_async_wait() {
#ifndef CF_SYNC_COPIES
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// tile[r][c] = src[r * row_stride + c] for r < rows, c < cols; 0 elsewhere in kRows x kCols.
template <typename T, int kRows, int kCols, int kLd, int kThreads>
CF_DEVICE void load_tile(T* tile, const T* src, i64 row_stride, int rows, int cols, bool vec, int tid) {
    constexpr int kChunk = 16 / sizeof(T);
    static_assert(kCols % kChunk == 0, "tile width must be a whole number of 16-byte chunks");
    if (vec) {
        constexpr int kChunksPerRow = kCols / kChunk;
        constexpr int kChunks = kRows * kChunksPerRow;
#pragma unroll
        for (int i = 0; i < (kChunks + kThreads - 1) / kThreads; ++i) {
            const int c = tid + i * kThreads;
            if (kChunks % kThreads == 0 || c < kChunks) {
                const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * kChunk;
                const bool pred = r < rows && col < cols;
                const T* from = pred ? src + r * row_stride + col : src;
                cp_async_16(smem_addr(tile + r * kLd + col), from, pred);
            }
        }
    } else {
        constexpr int kElems = kRows * kCols;
        for (int c = tid; c < kElems; c += kThreads) {
            const int r = c / kCols, col = c % kCols;
            T value;
            if (r < rows && col < cols) {
                value = src[r * row_stride + col];
            } else {
                value = from_float<T>(0.f);
            }
            tile[r * kLd + col] = value;
        }
    }
}

// dst[r * row_stride + c] = tile[r][c] for r < rows, c < cols.
template <typename T, int kRows, int kCols, int kLd, int kThreads>
CF_DEVICE void store_tile(T* dst, i64 row_stride, const T* tile, int rows, int cols, bool vec, int tid) {
    constexpr int kChunk = 16 / sizeof(T);
    if (vec) {
        constexpr int kChunksPerRow = kCols / kChunk;
        constexpr int kChunks = kRows * kChunksPerRow;
#pragma unroll
        for (int i = 0; i < (kChunks + kThreads - 1) / kThreads; ++i) {
            const int c = tid + i * kThreads;
            if (kChunks % kThreads == 0 || c < kChunks) {
                const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * kChunk;
                if (r < rows && col < cols) {
                    *reinterpret_cast<uint4*>(dst + r * row_stride + col) =
                        *reinterpret_cast<const uint4*>(tile + r * kLd + col);
                }
            }
        }
    } else {
        constexpr int kElems = kRows * kCols;
        for (int c = tid; c < kElems; c += kThreads) {
            const int r = c / kCols, col = c % kCols;
            if (r < rows && col < cols) dst[r * row_stride + col] = tile[r * kLd + col];
        }
    }
}

// Write a warp's fp32 accumulator block acc[n8 tile][4] (rows r0.., cols c0..) into a
// shared tile as T, multiplied by `scale`.
template <typename T, int kLd, int NT>
CF_DEVICE void store_acc(T* tile, const float (&acc)[NT][4], int r0, int c0, int lane, float scale) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int col = c0 + nt * 8 + 2 * t;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = r0 + g + 8 * h;
            const float a = acc[nt][2 * h] * scale, b = acc[nt][2 * h + 1] * scale;
            if constexpr (ElemInfo<T>::kIsFloat) {
                *reinterpret_cast<float2*>(tile + row * kLd + col) = make_float2(a, b);
            } else {
                *reinterpret_cast<u32*>(tile + row * kLd + col) = pack2<T>(a, b);
            }
        }
    }
}
