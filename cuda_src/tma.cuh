// Hopper (sm_90a) tensor memory access: tiles copied from global to shared memory by the
// TMA unit, described by a tensor map the host encodes (cuflash/_tma.py,
// cuTensorMapEncodeTiled) and passes by value as a __grid_constant__ kernel argument.
//
// The maps cuflash builds are 4-D, innermost first: (head dim, rows, heads, batch), with
// the caller's byte strides, a box of 64 columns (128 bytes: the swizzle span) by a tile
// of rows, and the 128-byte swizzle, so one copy lands a column block in exactly the
// layout sm90.cuh's wgmma descriptors read (16-byte chunk c of row r at c ^ (r % 8), the
// destination 1024-byte aligned). Elements outside the tensor (rows past the end,
// columns past head_dim) arrive as zeros, and the copy still counts the whole box's bytes
// toward the barrier's transaction count.
#pragma once
#include "common.cuh"

// The driver's 128-byte CUtensorMap, opaque here (no <cuda.h> needed).
struct __align__(64) TmaDesc {
    u64 opaque[16];
};

CF_DEVICE void tma_prefetch_desc(const TmaDesc* desc) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<u64>(desc)) : "memory");
}

// Copies the box at coordinates (c0, c1, c2, c3) (elements, innermost first) into shared
// memory at `dst`, completing `bytes` of the transaction count of barrier `bar`.
CF_DEVICE void tma_load_4d(u32 dst, const TmaDesc* desc, int c0, int c1, int c2, int c3, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes "
        "[%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
        "l"(reinterpret_cast<u64>(desc)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
}
