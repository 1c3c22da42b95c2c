// Element types, conversions and small device helpers.
//
// The sources include no CUDA header at all: 16-bit types are plain storage structs and
// every conversion is one PTX instruction. That keeps NVRTC independent of where (or
// whether) the CUDA toolkit headers are installed on the user's machine.
#pragma once
#include "params.h"

typedef cf_i64 i64;
typedef cf_u64 u64;
typedef cf_u32 u32;

#ifdef CF_BUILD_NONCE
// Set only by the compile checks: the value lands in the PTX, so a compile cache keyed on
// PTX (some drivers keep one below NVRTC) cannot answer, and ptxas really runs.
__device__ __attribute__((used)) int cf_build_nonce = CF_BUILD_NONCE;
#endif

struct half_t {
    unsigned short bits;
};
struct bf16_t {
    unsigned short bits;
};

#define CF_DEVICE __device__ __forceinline__
#define CF_INF __int_as_float(0x7f800000)
#define CF_LOG2E 1.4426950408889634f
#define CF_LN2 0.6931471805599453f

template <typename T>
struct ElemInfo;
template <>
struct ElemInfo<half_t> {
    static constexpr bool kIsFloat = false;
};
template <>
struct ElemInfo<bf16_t> {
    static constexpr bool kIsFloat = false;
};
template <>
struct ElemInfo<float> {
    static constexpr bool kIsFloat = true;
};

// ---- conversions ------------------------------------------------------------------------

CF_DEVICE float to_float(half_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}
CF_DEVICE float to_float(bf16_t x) { return __uint_as_float(((u32)x.bits) << 16); }
CF_DEVICE float to_float(float x) { return x; }

template <typename T>
CF_DEVICE T from_float(float f);
template <>
CF_DEVICE half_t from_float<half_t>(float f) {
    half_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
    return h;
}
// Round-to-nearest-even to bf16 in integer arithmetic (before sm_80, whose cvt has no bf16
// form; pre-Ampere families take no bf16 inputs, but their fp32 products split values into
// bf16 terms, see mma.cuh). NaN stays a (quiet) NaN.
CF_DEVICE unsigned short bf16_bits_rn(float f) {
    const u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x40u);
    return (unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

template <>
CF_DEVICE bf16_t from_float<bf16_t>(float f) {
    bf16_t h;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    h.bits = bf16_bits_rn(f);
#else
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
#endif
    return h;
}
template <>
CF_DEVICE float from_float<float>(float f) {
    return f;
}

// Two floats to one packed register of two 16-bit values, `lo` in the low half (the
// element with the smaller column index in an mma fragment).
template <typename T>
CF_DEVICE u32 pack2(float lo, float hi);
// (The packed two-value cvt forms are sm_80 instructions; before that, two conversions.)
template <>
CF_DEVICE u32 pack2<half_t>(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    return (u32)from_float<half_t>(lo).bits | ((u32)from_float<half_t>(hi).bits << 16);
#else
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#endif
}
template <>
CF_DEVICE u32 pack2<bf16_t>(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    return (u32)bf16_bits_rn(lo) | ((u32)bf16_bits_rn(hi) << 16);
#else
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#endif
}

CF_DEVICE float bf16_round(float x) {
    bf16_t h = from_float<bf16_t>(x);
    return to_float(h);
}

// ---- fast math --------------------------------------------------------------------------

// 2^x with the hardware approximation (relative error ~2^-22); exp2(-inf) = 0.
CF_DEVICE float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// max(a, b) that returns NaN when either is NaN (fmaxf returns the other operand). The
// softmax's running max goes through it, so a NaN score reaches its row's output and LSE
// as it does in softmax(QKᵀ)V computed plainly, instead of being skipped.
CF_DEVICE float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    float d;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
    return d;
#else
    return (a != a || b != b) ? __int_as_float(0x7fffffff) : fmaxf(a, b);
#endif
}

CF_DEVICE float warp_max_quad(float x) {
    // The four threads of a quad (lanes 4g..4g+3) hold one accumulator row between them.
    x = max_nan(x, __shfl_xor_sync(0xffffffffu, x, 1));
    x = max_nan(x, __shfl_xor_sync(0xffffffffu, x, 2));
    return x;
}
CF_DEVICE float warp_sum_quad(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    return x;
}

// Floor division for possibly negative numerators (diagonal offsets can be negative).
CF_DEVICE i64 floor_div(i64 a, i64 b) {
    i64 q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

CF_DEVICE u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// Adds (a, b) to two adjacent floats of global memory (8-byte aligned). Hopper reduces a
// pair with one vector instruction, halving the reductions the dQ accumulation issues.
CF_DEVICE void atomic_add2(float* addr, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(addr), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(addr, a);
    atomicAdd(addr + 1, b);
#endif
}
