// Tensor-core matrix products: mma.sync m16n8k16 fragments and their loads.
//
// Register layout of m16n8k16 (g = lane / 4, t = lane % 4), used throughout:
//   A (16x16, row-major): x[0] = (g, 2t..2t+1)   x[1] = (g+8, 2t..)   x[2] = (g, 2t+8..)   x[3] = (g+8, 2t+8..)
//   B (16x8, "col"):      x[0] = (k 2t..2t+1, n g)   x[1] = (k 2t+8.., n g)
//   C (16x8, fp32):       c[0], c[1] = (g, 2t..2t+1)   c[2], c[3] = (g+8, 2t..2t+1)
// An accumulator pair of n8 tiles is therefore exactly an A fragment: P and dS go from one
// product into the next without leaving registers.
//
// fp32 inputs run on the same bf16 tensor cores: each value is split into three bf16 terms
// (hi + mid + lo carry 24 significant bits) and a product takes the six partial products
// whose magnitude reaches 2^-24 of the result. The dropped terms are below 2^-26
// relative, so the result has fp32 accuracy (accumulation is fp32 in every case).
#pragma once
#include "common.cuh"

// Shared-memory tiles are row-major with rows padded by 16 bytes (32 for fp32): a row
// stride that is an odd multiple of 16 bytes puts the 8 rows of an ldmatrix (or the 4
// rows of a float2 quarter-warp load) in distinct banks.
template <typename T>
struct SmemPad {
    static constexpr int kElems = 8;  // 16 bytes of fp16/bf16, 32 bytes of fp32
};

template <typename T>
struct FragA {
    u32 x[4];
};
template <>
struct FragA<float> {
    u32 hi[4], mid[4], lo[4];
};
template <typename T>
struct FragB {
    u32 x[2];
};
template <>
struct FragB<float> {
    u32 hi[2], mid[2], lo[2];
};

// ---- the m16n8k16 product by architecture -----------------------------------------------
// sm_80+: one mma.sync m16n8k16 (fp16 or bf16). sm_75 (Turing): two m16n8k8 halves of the
// contraction, fp16 only (Turing's tensor cores have no bf16). sm_70 (Volta): on the FMA
// units (mma_emulated; Volta's quad-pair m8n8k4 tensor-core path is not written yet).
// Before sm_80 the bf16 product (the fp32 path's split terms) runs on the FMA units too.

// The m16n8k16 product on the FMA units, in the fragment layout of the header comment:
// row g of A sits in quad g (each thread holds 4 of its 16 k values), column n of B in quad
// n, so each thread gathers its row of A from its own quad and its two columns of B from
// quads 2t and 2t + 1. Exact products, fp32 sums: the tensor cores' result within rounding.
// Each fragment register is given as its two values: a[i][0] the lower k (or column).
// Not inlined: the kernels call it at dozens of unrolled sites, and inlining each copy of
// its 48 shuffles makes ptxas take minutes per variant for no speed worth having here.
__device__ __noinline__ void mma_fma(float (&c)[4], const float (&a)[4][2], const float (&b)[2][2]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int src = 0; src < 4; ++src) {  // the quad-mate holding k = 2src, 2src+1, 2src+8, 2src+9
        float ra[4][2], rb[2][2][2];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int e = 0; e < 2; ++e) ra[i][e] = __shfl_sync(0xffffffffu, a[i][e], 4 * g + src);
#pragma unroll
        for (int col = 0; col < 2; ++col)  // output columns 2t and 2t + 1
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int e = 0; e < 2; ++e) rb[col][i][e] = __shfl_sync(0xffffffffu, b[i][e], 4 * (2 * t + col) + src);
#pragma unroll
        for (int col = 0; col < 2; ++col) {
            // ra[0], ra[2]: row g at k (2src..) and (2src+8..); ra[1], ra[3]: row g + 8.
            c[col] += ra[0][0] * rb[col][0][0] + ra[0][1] * rb[col][0][1] + ra[2][0] * rb[col][1][0] +
                      ra[2][1] * rb[col][1][1];
            c[2 + col] += ra[1][0] * rb[col][0][0] + ra[1][1] * rb[col][0][1] + ra[3][0] * rb[col][1][0] +
                          ra[3][1] * rb[col][1][1];
        }
    }
}

template <typename T>
CF_DEVICE void unpack2(u32 packed, float (&out)[2]) {
    out[0] = to_float(T{(unsigned short)(packed & 0xffffu)});
    out[1] = to_float(T{(unsigned short)(packed >> 16)});
}

template <typename T>
CF_DEVICE void mma_emulated(float (&c)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    float fa[4][2], fb[2][2];
#pragma unroll
    for (int i = 0; i < 4; ++i) unpack2<T>(a[i], fa[i]);
#pragma unroll
    for (int i = 0; i < 2; ++i) unpack2<T>(b[i], fb[i]);
    mma_fma(c, fa, fb);
}

CF_DEVICE void mma_f16(float (&c)[4], const u32 (&a)[4], const u32 (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 750
    mma_emulated<half_t>(c, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(b[0]));
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[2]), "r"(a[3]), "r"(b[1]));
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
CF_DEVICE void mma_bf16(float (&c)[4], const u32 (&a)[4], const u32 (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    mma_emulated<bf16_t>(c, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

CF_DEVICE void mma(float (&c)[4], const FragA<half_t>& a, const FragB<half_t>& b) { mma_f16(c, a.x, b.x); }
CF_DEVICE void mma(float (&c)[4], const FragA<bf16_t>& a, const FragB<bf16_t>& b) { mma_bf16(c, a.x, b.x); }
CF_DEVICE void mma(float (&c)[4], const FragA<float>& a, const FragB<float>& b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    // Before sm_80 an fp32 fragment holds its values as they are (set_a/set_b): hi[i] the
    // lower, mid[i] the upper of register i's pair; one product on the FMA units.
    float fa[4][2], fb[2][2];
#pragma unroll
    for (int i = 0; i < 4; ++i) fa[i][0] = __uint_as_float(a.hi[i]), fa[i][1] = __uint_as_float(a.mid[i]);
#pragma unroll
    for (int i = 0; i < 2; ++i) fb[i][0] = __uint_as_float(b.hi[i]), fb[i][1] = __uint_as_float(b.mid[i]);
    mma_fma(c, fa, fb);
#else
    // The tensor cores' fp32 accumulation truncates each sum to the precision of its
    // largest operand. Adding six partial products straight into a long-running
    // accumulator would lose up to an ulp of the running sum per instruction, all in the
    // same direction; summing one k-step into a fresh register and adding that with a
    // correctly rounded FADD keeps the error at the scale of the step. Smallest terms go
    // first so they are not truncated against the large ones.
    float t[4] = {0.f, 0.f, 0.f, 0.f};
    mma_bf16(t, a.lo, b.hi);
    mma_bf16(t, a.mid, b.mid);
    mma_bf16(t, a.hi, b.lo);
    mma_bf16(t, a.mid, b.hi);
    mma_bf16(t, a.hi, b.mid);
    mma_bf16(t, a.hi, b.hi);
#pragma unroll
    for (int i = 0; i < 4; ++i) c[i] += t[i];
#endif
}

// Split two floats into three packed bf16 pairs: x = hi + mid + lo (to ~2^-27). An
// infinite input makes every product it enters NaN (inf - inf in its own terms, 0 * inf
// against the other operand's zero terms): fp32 attention turns inf in q or k into NaN
// in every row it touches, even where the exact score would be -inf.
CF_DEVICE void split3(float x0, float x1, u32& hi, u32& mid, u32& lo) {
    float h0 = bf16_round(x0), h1 = bf16_round(x1);
    float r0 = x0 - h0, r1 = x1 - h1;
    float m0 = bf16_round(r0), m1 = bf16_round(r1);
    hi = pack2<bf16_t>(h0, h1);
    mid = pack2<bf16_t>(m0, m1);
    lo = pack2<bf16_t>(r0 - m0, r1 - m1);
}

// ---- building fragments from fp32 values (accumulators, fp32 shared memory) -------------

template <typename T>
CF_DEVICE void set_a(FragA<T>& a, int i, float lo, float hi) {
    a.x[i] = pack2<T>(lo, hi);
}
template <>
CF_DEVICE void set_a<float>(FragA<float>& a, int i, float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    a.hi[i] = __float_as_uint(lo), a.mid[i] = __float_as_uint(hi);  // see mma(float)
#else
    split3(lo, hi, a.hi[i], a.mid[i], a.lo[i]);
#endif
}
template <typename T>
CF_DEVICE void set_b(FragB<T>& b, int i, float lo, float hi) {
    b.x[i] = pack2<T>(lo, hi);
}
template <>
CF_DEVICE void set_b<float>(FragB<float>& b, int i, float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    b.hi[i] = __float_as_uint(lo), b.mid[i] = __float_as_uint(hi);  // see mma(float)
#else
    split3(lo, hi, b.hi[i], b.mid[i], b.lo[i]);
#endif
}

// A fragment for k-step kk from an fp32 accumulator laid out as acc[n8 tile][4].
template <typename T, int N>
CF_DEVICE void acc_to_a(FragA<T>& a, const float (&acc)[N][4], int kk) {
    set_a<T>(a, 0, acc[2 * kk][0], acc[2 * kk][1]);
    set_a<T>(a, 1, acc[2 * kk][2], acc[2 * kk][3]);
    set_a<T>(a, 2, acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
    set_a<T>(a, 3, acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

// ---- ldmatrix ---------------------------------------------------------------------------

// ldmatrix .x4: lane l gives the address of row l % 8 of matrix l / 8; register i of lane l
// receives matrix i's row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1 (.trans: column l / 4,
// rows 2 (l % 4) and 2 (l % 4) + 1). Volta (sm_70) has no ldmatrix: each lane fetches the
// row addresses it needs from the lanes that hold them and reads shared memory itself.
CF_DEVICE void ldsm_x4(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 750
    const int lane = threadIdx.x & 31;
    u32 r[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u32 row = __shfl_sync(0xffffffffu, addr, 8 * i + (lane >> 2));
        asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(r[i]) : "r"(row + 4 * (lane & 3)));
    }
    r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
#endif
}
CF_DEVICE void ldsm_x4_trans(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 750
    const int lane = threadIdx.x & 31;
    u32 r[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u32 row0 = __shfl_sync(0xffffffffu, addr, 8 * i + 2 * (lane & 3));
        const u32 row1 = __shfl_sync(0xffffffffu, addr, 8 * i + 2 * (lane & 3) + 1);
        unsigned short lo, hi;
        asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(lo) : "r"(row0 + 2 * (lane >> 2)));
        asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(hi) : "r"(row1 + 2 * (lane >> 2)));
        r[i] = (u32)lo | ((u32)hi << 16);
    }
    r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
#endif
}

// ---- fragment loads from a row-major shared tile with row stride kLd (elements) ---------
// Naming: the logical operand is what the mma sees; "_t" loads read it transposed, i.e.
// the tile stores the operand's k index along rows.

// A[r][c] = tile[r0 + r][c0 + c], 16x16.
template <typename T, int kLd>
CF_DEVICE void load_a(FragA<T>& a, const T* tile, int r0, int c0, int lane) {
    if constexpr (ElemInfo<T>::kIsFloat) {
        const int g = lane >> 2, t = lane & 3;
        const float* p = reinterpret_cast<const float*>(tile);
        float2 v0 = *reinterpret_cast<const float2*>(p + (r0 + g) * kLd + c0 + 2 * t);
        float2 v1 = *reinterpret_cast<const float2*>(p + (r0 + g + 8) * kLd + c0 + 2 * t);
        float2 v2 = *reinterpret_cast<const float2*>(p + (r0 + g) * kLd + c0 + 8 + 2 * t);
        float2 v3 = *reinterpret_cast<const float2*>(p + (r0 + g + 8) * kLd + c0 + 8 + 2 * t);
        set_a<T>(a, 0, v0.x, v0.y);
        set_a<T>(a, 1, v1.x, v1.y);
        set_a<T>(a, 2, v2.x, v2.y);
        set_a<T>(a, 3, v3.x, v3.y);
    } else {
        const int row = r0 + (lane & 15), col = c0 + (lane >> 4) * 8;
        ldsm_x4(a.x[0], a.x[1], a.x[2], a.x[3], smem_addr(tile + row * kLd + col));
    }
}

// A[r][c] = tile[c0 + c][r0 + r], 16x16 (A stored transposed: e.g. P^T from P).
template <typename T, int kLd>
CF_DEVICE void load_a_t(FragA<T>& a, const T* tile, int r0, int c0, int lane) {
    if constexpr (ElemInfo<T>::kIsFloat) {
        const int g = lane >> 2, t = lane & 3;
        const float* p = reinterpret_cast<const float*>(tile);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = r0 + g + (i & 1) * 8, c = c0 + 2 * t + (i >> 1) * 8;
            set_a<T>(a, i, p[c * kLd + r], p[(c + 1) * kLd + r]);
        }
    } else {
        const int row = c0 + (lane & 7) + (lane >> 4) * 8, col = r0 + ((lane >> 3) & 1) * 8;
        ldsm_x4_trans(a.x[0], a.x[1], a.x[2], a.x[3], smem_addr(tile + row * kLd + col));
    }
}

// Two B fragments (n tiles n0..n0+7 and n0+8..n0+15, k 16) with B[k][n] = tile[n][k]
// (the tile stores rows along n, as K does for S = Q K^T).
template <typename T, int kLd>
CF_DEVICE void load_b2(FragB<T>& b0, FragB<T>& b1, const T* tile, int n0, int k0, int lane) {
    if constexpr (ElemInfo<T>::kIsFloat) {
        const int g = lane >> 2, t = lane & 3;
        const float* p = reinterpret_cast<const float*>(tile);
        float2 v0 = *reinterpret_cast<const float2*>(p + (n0 + g) * kLd + k0 + 2 * t);
        float2 v1 = *reinterpret_cast<const float2*>(p + (n0 + g) * kLd + k0 + 8 + 2 * t);
        float2 v2 = *reinterpret_cast<const float2*>(p + (n0 + 8 + g) * kLd + k0 + 2 * t);
        float2 v3 = *reinterpret_cast<const float2*>(p + (n0 + 8 + g) * kLd + k0 + 8 + 2 * t);
        set_b<T>(b0, 0, v0.x, v0.y);
        set_b<T>(b0, 1, v1.x, v1.y);
        set_b<T>(b1, 0, v2.x, v2.y);
        set_b<T>(b1, 1, v3.x, v3.y);
    } else {
        const int row = n0 + (lane & 7) + (lane >> 4) * 8, col = k0 + ((lane >> 3) & 1) * 8;
        ldsm_x4(b0.x[0], b0.x[1], b1.x[0], b1.x[1], smem_addr(tile + row * kLd + col));
    }
}

// Two B fragments with B[k][n] = tile[k][n] (the tile stores rows along k, as V does
// for O = P V).
template <typename T, int kLd>
CF_DEVICE void load_b2_t(FragB<T>& b0, FragB<T>& b1, const T* tile, int n0, int k0, int lane) {
    if constexpr (ElemInfo<T>::kIsFloat) {
        const int g = lane >> 2, t = lane & 3;
        const float* p = reinterpret_cast<const float*>(tile);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            FragB<T>& b = j ? b1 : b0;
            const int n = n0 + j * 8 + g;
            set_b<T>(b, 0, p[(k0 + 2 * t) * kLd + n], p[(k0 + 2 * t + 1) * kLd + n]);
            set_b<T>(b, 1, p[(k0 + 8 + 2 * t) * kLd + n], p[(k0 + 9 + 2 * t) * kLd + n]);
        }
    } else {
        const int row = k0 + (lane & 7) + ((lane >> 3) & 1) * 8, col = n0 + (lane >> 4) * 8;
        ldsm_x4_trans(b0.x[0], b0.x[1], b1.x[0], b1.x[1], smem_addr(tile + row * kLd + col));
    }
}
