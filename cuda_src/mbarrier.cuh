// Hopper (sm_90a) synchronisation primitives of the warp-specialised kernels: shared-memory
// transaction barriers (mbarrier) and named barriers.
//
// An mbarrier completes a phase when its expected arrivals have arrived and, for a
// barrier armed with expect_tx, when the bulk copies (TMA) have delivered every byte
// announced. Waiters name the phase by its parity; a barrier just initialised is in phase
// 0, and a wait for parity 1 on it returns at once (the phase "before" it counts as
// complete), which lets a producer pass its first round of empty-slot waits.
#pragma once
#include "common.cuh"

CF_DEVICE void mbar_init(u32 bar, u32 arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}
// Makes the initialisations visible to the async proxy (TMA) before any copy signals them.
CF_DEVICE void mbar_fence_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

// One arrival that also announces `bytes` of bulk-copy traffic for the current phase.
CF_DEVICE void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
CF_DEVICE void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Blocks until the phase of the given parity has completed.
CF_DEVICE void mbar_wait(u32 bar, u32 parity) {
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n"
        "}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

// Named barriers (ids 1..15; 0 is __syncthreads). `threads` counts every thread that
// syncs or arrives, a multiple of 32. bar.arrive does not wait: the producer side of an
// ordering between warpgroups.
CF_DEVICE void named_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
CF_DEVICE void named_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Register budgets of warp-specialised warpgroups (every warp of the warpgroup executes
// it): a producer gives registers back, consumers take them.
template <int N>
CF_DEVICE void regs_dealloc() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
CF_DEVICE void regs_alloc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
