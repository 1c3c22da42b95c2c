"""Compile-time specialisation: one table from (kernel, dtype, head dim, GPU) to tiles.

Head dims are padded up to a multiple of 32 (the kernels zero-fill the padding), so eight
buckets cover 1..256. For each kernel the first row whose tiles fit the GPU's shared
memory wins. Shared memory per tile is (rows) x (padded head dim + 8 elements) x bytes;
the kernels compute the same sizes (kSmemBytes).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from ._build import Variant
from ._interop import BFLOAT16

HEAD_DIM_BUCKETS = (32, 64, 96, 128, 160, 192, 224, 256)

# Opt-in shared memory per block by architecture (bytes), for planning without a GPU.
SMEM_LIMIT = {"sm_80": 166912, "sm_86": 101376, "sm_87": 166912, "sm_89": 101376, "sm_90": 232448,
              # Volta (V100: 96 KB per block opted in) and Turing (T4, RTX 20xx: 64 KB).
              "sm_70": 98304, "sm_72": 98304, "sm_75": 65536}
ARCHES = ("sm_80", "sm_90")  # what the CPU compile check builds for
# Pre-Ampere families: the portable kernels over the primitives mma.cuh and tile_io.cuh
# select for __CUDA_ARCH__ < 800 (no cp.async; Turing's m16n8k8 halves; Volta on the FMA
# units without ldmatrix). fp16 and fp32 only: these tensor cores have no bf16.
PRE_AMPERE_ARCHES = ("sm_70", "sm_75")


def arch_number(arch: str) -> int:
    """70 for "sm_70" or "compute_70" (the PTX target that stands for it in tests)."""
    return int(arch.split("_")[1].rstrip("a"))


def limit_for(arch: str) -> int:
    """Shared memory per block the tile tables may plan for `arch` (sm_XX or compute_XX)."""
    return SMEM_LIMIT[f"sm_{arch_number(arch)}"]


def bf16_supported(arch: str | None) -> bool:
    return arch is None or arch_number(arch) >= 80

ELEM_CODE = {np.dtype(np.float16): 0, BFLOAT16: 1, np.dtype(np.float32): 2}
_PAD = 8  # elements of padding per shared-memory row (SmemPad)


def head_dim_bucket(head_dim: int) -> int:
    for bucket in HEAD_DIM_BUCKETS:
        if head_dim <= bucket:
            return bucket
    raise ValueError(f"head_dim={head_dim} exceeds {HEAD_DIM_BUCKETS[-1]}")


@dataclasses.dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    warps: int
    stages: int = 1  # backward: Q/dO buffers (2 = load the next query tile during compute)
    q_regs: bool = False  # forward: keep Q fragments in registers across the key loop
    # Backward dK/dV warp layouts (0: rows first): warps along the query rows of S and dP,
    # along the keys of dK and dV, along the query rows of dQ; the rest split the columns.
    wm_s: int = 0
    wn_kv: int = 0
    wm_q: int = 0
    # Hopper (sm_90a) warpgroup MMA kernels (flash_fwd_sm90.cu: 4 warps per 64 query rows;
    # flash_bwd_sm90.cu: 4 or 8 warps per 64 keys); min_blocks = resident blocks per SM the
    # registers must allow.
    wgmma: bool = False
    min_blocks: int = 1
    overlap: bool = False  # Hopper forward: P·V of one key tile runs during the next's softmax

    @property
    def threads(self) -> int:
        return 32 * self.warps


def fwd_smem(t: Tiles, head_dim: int, elem_bytes: int) -> int:
    if t.wgmma:
        # Q and two stages of K and V, head dim padded to whole 128-byte swizzle rows, plus
        # 1 KB to align the swizzle atoms (FwdSm90 assumes the same).
        d64 = -(-head_dim // 64) * 64
        return (t.block_m + 4 * t.block_n) * d64 * elem_bytes + 1024
    return (t.block_m + 2 * t.block_n) * (head_dim + _PAD) * elem_bytes


def bwd_smem(t: Tiles, head_dim: int, elem_bytes: int) -> int:
    ld, lds = head_dim + _PAD, t.block_n + _PAD
    tiles = 2 * t.block_n * ld + 2 * t.stages * t.block_m * ld + 2 * t.block_m * lds
    return tiles * elem_bytes + 8 * t.stages * t.block_m


def bwd_sm90_split(t: Tiles) -> int:
    """Warpgroups per 64-key group of the Hopper dK/dV kernel (BwdSm90::kSplit)."""
    return t.warps // 4 // (t.block_n // 64)


def bwd_sm90_smem(t: Tiles, head_dim: int) -> int:
    """Hopper dK/dV kernel (BwdSm90): K, V, two stages of Q and dO, dSᵀ and, split, Pᵀ
    (16-bit, head dim padded to whole 128-byte swizzle rows), two stages of lse and Dsum
    rows, 1 KB to align the swizzle atoms."""
    d64 = -(-head_dim // 64) * 64
    transposed = (1 + (bwd_sm90_split(t) > 1)) * t.block_n * t.block_m
    return (2 * t.block_n * d64 + 4 * t.block_m * d64 + transposed) * 2 + 16 * t.block_m + 1024


def dq_smem(t: Tiles, head_dim: int, elem_bytes: int) -> int:
    return (2 * t.block_m + 2 * t.block_n) * (head_dim + _PAD) * elem_bytes


# Variants with score modifiers (CF_GENERAL) hold more live values per element: these
# rows come first for them. (kernel, fp32?, largest head dim, tiles, reason).
_GENERAL_TABLE = (
    ("fwd", False, 128, Tiles(64, 64, 4), "modifiers, d<=128: 245 registers, no spills (128x64x4 spills 870 B)"),
    ("fwd", False, 256, Tiles(64, 32, 4), "modifiers, d<=256: as the plain variant"),
    ("bwd", False, 128, Tiles(64, 64, 8, 2), "modifiers, d<=128: no spills (64x128 key tiles spill 570 B)"),
    ("dq", False, 256, Tiles(32, 32, 2), "modifiers, deterministic dQ, d<=256: 64x64x4 spills 1.1 KB"),
)

# (kernel, fp32?, largest head dim, tiles, reason). Scanned in order.
_TABLE = (
    # --- forward: each warp owns block_m / warps query rows -------------------------------
    # Measured on H200, bf16, 16k tokens, seqlen 4k (benchmarks/tune.py; benchmarks/NOTES.md).
    ("fwd", False, 128, Tiles(128, 64, 4), "d<=128: 32 rows per warp halve K/V fragment reads per product: 1.22-1.25x over 64x64x4 (d=64: 267 vs 214, d=128: 289 vs 237 TFLOP/s); Q kept in registers was slower"),
    ("fwd", False, 256, Tiles(64, 32, 4), "d<=256: O needs 128 fp32 registers per thread; 64x32 tiles beat 128x64x8 causal (220 vs 208), trail it 2% non-causal; 68 KB fits every part"),
    ("fwd", True, 128, Tiles(64, 32, 4), "fp32 d<=128: three bf16 terms per fragment; narrow key tiles limit registers"),
    ("fwd", True, 256, Tiles(64, 32, 4), "fp32 d<=256: 135 KB smem"),
    ("fwd", True, 256, Tiles(32, 16, 2), "fp32 d<=256 on 99 KB parts"),
    # --- backward dK/dV: K, V, Q, dO, P, dS tiles all resident ----------------------------
    # Warp layouts (wm_s, wn_kv, wm_q) = (2, 4, 2): 32x32 S/dP, 32x64 dK/dV and 32x32 dQ
    # sub-tiles per warp read a quarter less shared memory than rows-first (4, 8, 4):
    # d=128 247 vs 221 TFLOP/s (causal 222 vs 198), d=64 184 vs 174 (tune.py, H200).
    ("bwd", False, 128, Tiles(64, 128, 8, 2, wm_s=2, wn_kv=4, wm_q=2), "d<=128 (not 32, 96): squarer warp sub-tiles, +6-12%"),
    ("bwd", False, 128, Tiles(64, 128, 8, 2, wm_s=2, wn_kv=4, wm_q=4), "d=32, 96: dQ split in two column halves"),
    ("bwd", False, 128, Tiles(64, 128, 8, 2), "d<=128: 128-key tiles 1.2-1.4x faster than 64; double-buffered Q/dO +7% at d=128 (187 vs 174 TFLOP/s); 174 KB smem (Hopper)"),
    ("bwd", False, 128, Tiles(64, 128, 8), "d<=128 on A100 (163 KB): single-buffered Q/dO, 139 KB"),
    ("bwd", False, 128, Tiles(64, 64, 8), "d<=128 on 99 KB parts: 88 KB smem"),
    ("bwd", False, 256, Tiles(64, 64, 8, 2, wm_s=2, wn_kv=2, wm_q=2), "d=192, 256: 32x32 S/dP sub-tiles, 32x64 dK/dV and dQ: 192 vs 184 TFLOP/s (causal 178 vs 170)"),
    ("bwd", False, 256, Tiles(64, 64, 8, 2), "d<=256: dK+dV 128 fp32 registers per thread; double-buffered Q/dO +9% (137 vs 125 TFLOP/s) in 221 KB (Hopper)"),
    ("bwd", False, 256, Tiles(64, 64, 8), "d<=256 on A100: 154 KB smem"),
    ("bwd", False, 256, Tiles(32, 32, 4), "d<=256 on 99 KB parts: 72 KB smem"),
    ("bwd", True, 64, Tiles(32, 64, 4), "fp32 d<=64: 74 KB smem"),
    ("bwd", True, 128, Tiles(32, 64, 4), "fp32 d<=128: 123 KB smem (Hopper, A100)"),
    ("bwd", True, 128, Tiles(32, 32, 4), "fp32 d<=128 on 99 KB parts: 80 KB smem"),
    ("bwd", True, 256, Tiles(32, 32, 4), "fp32 d<=256: 145 KB smem (Hopper, A100 only)"),
    # --- deterministic dQ: one warp per 16 query rows -------------------------------------
    ("dq", False, 128, Tiles(64, 64, 4), "d<=128: 70 KB smem"),
    ("dq", False, 256, Tiles(64, 64, 4), "d<=256: 135 KB smem (Hopper, A100)"),
    ("dq", False, 256, Tiles(32, 32, 2), "d<=256 on 99 KB parts: 68 KB smem"),
    ("dq", True, 64, Tiles(64, 32, 4), "fp32 d<=64: 55 KB smem"),
    ("dq", True, 128, Tiles(32, 32, 2), "fp32 d<=128: 70 KB smem"),
    ("dq", True, 256, Tiles(32, 32, 2), "fp32 d<=256: 135 KB smem (Hopper, A100)"),
    ("dq", True, 256, Tiles(16, 16, 1), "fp32 d<=256 on 99 KB parts: 68 KB smem"),
    # --- pre-Ampere: the only rows that fit 64 KB (Turing) at the largest head dims; every
    # row above is tried first, so Ampere and Hopper plans are unchanged. Not yet measured
    # on a T4 (benchmarks/NOTES.md: the predicted speed).
    ("fwd", False, 256, Tiles(32, 32, 2), "d<=256 on 64 KB parts (Turing): 50 KB smem"),
    ("fwd", True, 256, Tiles(16, 16, 1), "fp32 d<=256 on 64 KB parts: 50 KB smem"),
    ("bwd", False, 256, Tiles(16, 32, 2), "d<=256 on 64 KB parts: 53 KB smem"),
    ("bwd", True, 128, Tiles(16, 32, 2), "fp32 d<=128 on 64 KB parts: 57 KB smem"),
    ("bwd", True, 256, Tiles(16, 16, 1), "fp32 d<=256 on 96 KB parts (Volta)"),
    ("dq", False, 256, Tiles(32, 16, 2), "d<=256 on 64 KB parts: 50 KB smem"),
)

# Hopper forward (16-bit, no score modifiers): (largest head dim, tiles, reason). The
# mma.sync kernel's best reaches ~0.85x FlashAttention-2 there; warpgroup MMA issues a
# 64 x N x 16 product per instruction from shared memory, with no fragment loads.
_SM90_FWD_TABLE = (
    # Measured on H200, bf16, 16k tokens, seqlen 4k (benchmarks/tune.py; benchmarks/NOTES.md).
    # d<=64 (seqlen 512-16k, causal and not; H200, bf16 and fp16, ratio to FlashAttention-2
    # in the same process): two blocks of two warpgroups per SM, 64-key tiles, P·V
    # overlapped with the next softmax (128 registers, 49 KB): 0.99-1.10. One warpgroup per
    # block, 3 blocks/SM (64 x 128): 0.96-1.02, K and V read three times as often as with
    # 192-row tiles; 192 x 128 x 12 (three warpgroups share K/V, no overlap: 168 registers
    # would spill): 0.74-0.86 at 512-1k, 1.05-1.07 at 8k-16k (1% ahead there).
    (64, Tiles(128, 64, 8, min_blocks=2, wgmma=True, overlap=True), "d<=64: 2 blocks/SM of 2 warpgroups, 64-key tiles, overlapped: 0.99-1.10x FlashAttention-2 at 512-16k"),
    (128, Tiles(128, 128, 8, wgmma=True, overlap=True), "d<=128: 128-key tiles, P·V overlapped with the next softmax: 404 vs 378 TFLOP/s without (causal 358 vs 336)"),
    (256, Tiles(128, 64, 8, wgmma=True, overlap=True), "d<=256: 64-key tiles, 198 KB: 443 vs 351 TFLOP/s with 32-key tiles (causal 385 vs 299)"),
)
# Hopper backward dK/dV kernel (16-bit, no score modifiers; flash_bwd_sm90.cu): block_n =
# keys in groups of 64, each owned by one warpgroup (d<=128) or shared by two that split the
# head dim (d=256: warps / 4 / (block_n / 64) = 2, bwd_sm90_split); block_m = the query
# tile; the preprocess and dQ kernels stay the portable ones. dQ is split over the
# warpgroups by query rows (block_m = 128) or by head-dim columns (block_m = 64). Measured
# on H200 (d<=128, benchmarks/NOTES.md v8) and H100 (d=256, v9), bf16, 16k tokens.
_SM90_BWD_TABLE = (
    (64, Tiles(128, 128, 8, 2, wgmma=True), "d<=64: 128-query tiles, dQ split by rows, 134 KB: 284 TFLOP/s at 4k vs 184 on mma.sync; one warpgroup per block (2 blocks/SM) 197"),
    (128, Tiles(64, 128, 8, 2, wgmma=True), "d<=128: 64-query tiles (Sᵀ, dPᵀ 32 registers each beside dK, dV 64 each), dQ split by columns, 150 KB: 293 vs 248; one warpgroup per block 266"),
    (256, Tiles(64, 64, 8, 2, wgmma=True), "d=224, 256: two warpgroups per 64 keys split dK, dV, dQ by head-dim halves (64 registers each) and Sᵀ, dPᵀ by query halves; Pᵀ, dSᵀ through shared memory, 210 KB: 239 vs 196 TFLOP/s at 4k on mma.sync"),
)
# Warp-specialised Hopper forward (16-bit; flash_fwd_ws_sm90.cu): 128
# query rows per block in two consumer warpgroups of 64 beside one producer warpgroup (12
# warps); K and V arrive by TMA in a ring of `stages` slots. Planned where TMA can read q, k
# and v (16-byte aligned pointers and strides, _tma.map_shape) and the head dim pads to 64,
# 128 or 256; the wgmma kernel above serves every other 16-bit call on Hopper.
WS_FWD_FILE = "flash_fwd_ws_sm90.cu"
_WS_FWD_TABLE = (
    (64, Tiles(128, 128, 12, stages=4, wgmma=True), "d<=64: 128-key tiles, 4 stages (144 KB): loads run far ahead of the short products"),
    (128, Tiles(128, 128, 12, stages=2, wgmma=True), "d<=128: 128-key tiles, 2 stages (160 KB); S and P 96 registers beside O's 64"),
    (256, Tiles(128, 64, 12, stages=2, wgmma=True), "d<=256: O holds 128 fp32 registers, so 64-key tiles; 2 stages (192 KB)"),
)
# The same family with score modifiers and dropout compiled in (CF_GENERAL): calls with
# softcap, ALiBi, a bias, a mask or dropout. A head dim missing here keeps those calls on the
# portable kernel (the wgmma kernel has no modifiers).
_WS_FWD_GENERAL_TABLE = (
    (64, Tiles(128, 128, 12, stages=4, wgmma=True), "modifiers, d<=64: as the plain variant"),
    (128, Tiles(128, 128, 12, stages=2, wgmma=True), "modifiers, d<=128: as the plain variant"),
    (256, Tiles(128, 64, 12, stages=2, wgmma=True), "modifiers, d<=256: as the plain variant"),
)
# Which Hopper forward family plans 16-bit calls: "ws" (the warp-specialised kernel where
# it applies; else, without modifiers, the wgmma kernel, with them the portable one) or
# "sm90" (the wgmma kernel without modifiers, the portable kernel with them, as before the
# warp-specialised family served them). Tests and benchmarks set it to run both.
FWD_FAMILIES = ("ws", "sm90")
FWD_FAMILY = os.environ.get("CUFLASH_FWD_FAMILY", "ws")
# The warp-specialised forward as a persistent kernel: one block per SM, each taking every
# grid-th query tile (sections of heads sharing L2, heaviest tiles first) instead of one
# block per tile. The same cubin serves both; off until measured (benchmarks/ws_check.py).
WS_PERSISTENT = os.environ.get("CUFLASH_FWD_PERSISTENT", "0") == "1"
WGMMA_ARCHES = ("sm_90",)  # built as sm_90a: the cubin runs on exactly this architecture
WGMMA_ENABLED = True  # False plans the portable kernel everywhere (benchmarks compare the two)

_SMEM = {"fwd": fwd_smem, "bwd": bwd_smem, "dq": dq_smem}


def bwd_layout(t: Tiles, head_dim: int) -> tuple[int, int, int] | None:
    """The dK/dV kernel's warp layouts (wm_s, wn_kv, wm_q) for a padded head dim, or None
    where a product does not split evenly (each warp's sub-tile must be whole pairs of
    n8 tiles: the kernel's static_asserts)."""
    w = t.warps
    wm_s = t.wm_s or min(w, t.block_m // 16)
    wn_kv = t.wn_kv or min(w, t.block_n // 16)
    wm_q = t.wm_q or wm_s
    for rows, cols, split in ((t.block_m, t.block_n, wm_s), (t.block_n, head_dim, wn_kv), (t.block_m, head_dim, wm_q)):
        if w % split or rows % (16 * split) or cols % (16 * (w // split)):
            return None
    return wm_s, wn_kv, wm_q


def _fits(kernel: str, t: Tiles, bucket: int, elem: int, smem_limit: int) -> bool:
    if _SMEM[kernel](t, bucket, elem) > smem_limit:
        return False
    return kernel != "bwd" or bwd_layout(t, bucket) is not None


class UnsupportedConfig(ValueError):
    pass


# Block-sparse attention: the block sizes (block_q, block_k) the kernels take. Every tile of
# every kernel family (the rows above and the Hopper tables below, after `_sparse_tiles`)
# divides 64, so a query tile lies in one query block and a key tile in one key block:
# the kernels walk the listed blocks tile by tile and never mask inside a tile for the
# block mask's sake.
BLOCK_SIZES = (64, 128)


def _divides(t: Tiles, block_size: tuple[int, int] | None) -> bool:
    return block_size is None or (block_size[0] % t.block_m == 0 and block_size[1] % t.block_n == 0)


def _sparse_defines(block_size: tuple[int, int] | None) -> tuple[tuple[str, int], ...]:
    return (("CF_BLOCK_SPARSE", 1),) if block_size is not None else ()


# (kernel, fp32, head-dim bucket) -> Tiles tried before the table (benchmarks/tune.py).
OVERRIDES: dict[tuple[str, bool, int], Tiles] = {}


def tiles_for(kernel: str, dtype: np.dtype, head_dim: int, smem_limit: int, general: bool = False,
              block_size: tuple[int, int] | None = None) -> Tiles:
    """The first table row for the kernel that fits; with `block_size` (block-sparse), the
    first whose tiles also divide the blocks."""
    bucket = head_dim_bucket(head_dim)
    fp32 = np.dtype(dtype) == np.float32
    elem = 4 if fp32 else 2
    forced = OVERRIDES.get((kernel, fp32, bucket))
    if forced is not None and _fits(kernel, forced, bucket, elem, smem_limit) and _divides(forced, block_size):
        return forced
    for name, is_fp32, max_d, tiles, _reason in (_GENERAL_TABLE + _TABLE) if general else _TABLE:
        if (name == kernel and is_fp32 == fp32 and bucket <= max_d and _fits(kernel, tiles, bucket, elem, smem_limit)
                and _divides(tiles, block_size)):
            return tiles
    raise UnsupportedConfig(
        f"no {kernel} tiles for dtype={dtype} head_dim={head_dim} within {smem_limit} bytes of shared memory per block"
    )


def ws_fwd_smem(t: Tiles, head_dim: int) -> int:
    """FwdWs::kSmemBytes + 1 KB to align the swizzle atoms: Q, `stages` slots of K and of V
    (head dim padded to 64), and 2 + 4 x stages 8-byte mbarriers."""
    d64 = -(-head_dim // 64) * 64
    return (t.block_m + 2 * t.stages * t.block_n) * d64 * 2 + 8 * (2 + 4 * t.stages) + 1024


def _ws_tiles(bucket: int, smem_limit: int, general: bool = False) -> Tiles | None:
    padded = -(-bucket // 64) * 64
    if padded not in (64, 128, 256):
        return None  # d=160, 192: no table row (wgmma or portable kernel)
    forced = OVERRIDES.get(("fwd_ws_general" if general else "fwd_ws", False, bucket))
    table = _WS_FWD_GENERAL_TABLE if general else _WS_FWD_TABLE
    for max_d, tiles, _reason in (((padded, forced, "override"),) if forced else ()) + table:
        if padded <= max_d and ws_fwd_smem(tiles, padded) <= smem_limit:
            return tiles
    return None


def _fwd_family() -> str:
    if FWD_FAMILY not in FWD_FAMILIES:
        raise ValueError(f"CUFLASH_FWD_FAMILY={FWD_FAMILY!r} must be one of {FWD_FAMILIES}")
    return FWD_FAMILY


def _sm90_fwd_smem(t: Tiles, head_dim: int) -> int:
    return fwd_smem(t, head_dim, 2)


# Hopper kernel -> (its table, its shared memory per block).
_SM90_TABLES = {"fwd_sm90": (_SM90_FWD_TABLE, _sm90_fwd_smem), "bwd_sm90": (_SM90_BWD_TABLE, bwd_sm90_smem)}


def _sm90_tiles(kernel: str, bucket: int, smem_limit: int, block_size: tuple[int, int] | None = None) -> Tiles | None:
    table, smem = _SM90_TABLES[kernel]
    forced = OVERRIDES.get((kernel, False, bucket))
    if forced is not None and smem(forced, bucket) <= smem_limit and _divides(forced, block_size):
        return forced
    for max_d, tiles, _reason in table:
        if bucket <= max_d and smem(tiles, bucket) <= smem_limit and _sm90_shapes_fit(kernel, tiles, bucket):
            for t in (tiles,) if block_size is None else _sparse_tiles(kernel, tiles):
                if _divides(t, block_size) and smem(t, bucket) <= smem_limit and _sm90_valid(kernel, t, bucket):
                    return t
            return None
    return None


def _sparse_tiles(kernel: str, t: Tiles) -> tuple[Tiles, ...]:
    """Block-sparse candidates for a Hopper row, best first: the row itself, then the row
    narrowed to 64 query rows (one warpgroup per 64 rows in the forward) and 64 keys, for
    blocks of 64 that the row's 128-wide tiles would straddle."""
    if kernel == "fwd_sm90":
        narrow = dataclasses.replace(t, block_m=64, block_n=min(t.block_n, 64), warps=4)
        return (t, dataclasses.replace(t, block_n=min(t.block_n, 64)), narrow)
    # Backward: one warpgroup per 64 keys (split rows keep their two).
    split = bwd_sm90_split(t)
    return (t, dataclasses.replace(t, block_m=64, block_n=64, warps=4 * split))


def _sm90_valid(kernel: str, t: Tiles, bucket: int) -> bool:
    """The Hopper kernels' static_asserts, for derived (block-sparse) tiles."""
    d = -(-bucket // 64) * 64
    wg = t.warps // 4
    if kernel == "fwd_sm90":
        return t.block_m == 64 * wg and t.block_n in (32, 64, 128)
    if t.block_n % 64 or t.block_m not in (64, 128) or wg * 64 % t.block_n:
        return False
    split = wg // (t.block_n // 64)
    if split not in (1, 2) or split * t.block_n != 64 * wg:
        return False
    if split == 2 and not (t.block_m // split == 32 and d // split == 128):
        return False
    mq = t.block_m // 64
    if wg % mq:
        return False
    return d // (wg // mq) in (64, 128) and _sm90_shapes_fit(kernel, t, bucket)


def _sm90_shapes_fit(kernel: str, t: Tiles, bucket: int) -> bool:
    """The split Hopper backward needs whole 128-column halves of the padded head dim (its
    wgmma_ss_bt shape): d=160 and 192 (padded to 192) stay on the portable kernel."""
    if kernel != "bwd_sm90" or bwd_sm90_split(t) == 1:
        return True
    return -(-bucket // 64) * 64 == 128 * bwd_sm90_split(t)


def _wgmma_applies(arch: str | None, general: bool, elem_bytes: int) -> bool:
    return WGMMA_ENABLED and arch in WGMMA_ARCHES and not general and elem_bytes == 2


def _ws_applies(arch: str | None, elem_bytes: int, tma: bool, family: str | None) -> bool:
    """The warp-specialised forward, with or without modifiers: 16-bit inputs TMA can read
    on Hopper, with the "ws" family chosen."""
    return (WGMMA_ENABLED and arch in WGMMA_ARCHES and elem_bytes == 2 and tma
            and (family or _fwd_family()) == "ws")


def forward_variant(
    dtype: np.dtype,
    head_dim: int,
    general: bool,
    smem_limit: int,
    arch: str | None = None,
    tma: bool = False,
    family: str | None = None,
    block_size: tuple[int, int] | None = None,
) -> tuple[Variant, Tiles, int]:
    """The forward kernel for (dtype, head dim, modifiers?) on a GPU with `smem_limit`
    bytes of shared memory per block. With `arch` in WGMMA_ARCHES, 16-bit inputs get the
    warp-specialised kernel (with modifiers compiled in when `general`) when `tma` (TMA can
    read q, k and v) and the family (`family`, default FWD_FAMILY) allow it; else, without
    modifiers, the warpgroup MMA kernel. Everything else, and arch=None, plans the portable
    one. `block_size` (block-sparse) compiles the list-walking kernel with tiles dividing it
    (the warp-specialised kernel walks no lists)."""
    bucket = head_dim_bucket(head_dim)
    elem = np.dtype(dtype).itemsize
    sparse = _sparse_defines(block_size)
    if _ws_applies(arch, elem, tma, family) and block_size is None:
        t = _ws_tiles(bucket, smem_limit, general)
        if t is not None:
            padded = -(-bucket // 64) * 64
            smem = ws_fwd_smem(t, padded)
            defines = (
                ("CF_ELEM", ELEM_CODE[np.dtype(dtype)]),
                ("CF_HEAD_DIM", padded),
                ("CF_GENERAL", int(general)),
                ("CF_FWD_BLOCK_N", t.block_n),
                ("CF_FWD_STAGES", t.stages),
                ("CF_FWD_SMEM", smem),
            )
            return Variant(WS_FWD_FILE, defines, arch_suffix="a"), t, smem
    if _wgmma_applies(arch, general, elem):
        t = _sm90_tiles("fwd_sm90", bucket, smem_limit, block_size)
        if t is not None:
            defines = (
                ("CF_ELEM", ELEM_CODE[np.dtype(dtype)]),
                ("CF_HEAD_DIM", bucket),
                ("CF_GENERAL", 0),
                ("CF_FWD_BLOCK_M", t.block_m),
                ("CF_FWD_BLOCK_N", t.block_n),
                ("CF_FWD_WARPS", t.warps),
                ("CF_FWD_MIN_BLOCKS", t.min_blocks),
                ("CF_FWD_OVERLAP", int(t.overlap)),
                *sparse,
            )
            return Variant("flash_fwd_sm90.cu", defines, arch_suffix="a"), t, fwd_smem(t, bucket, elem)
    t = tiles_for("fwd", dtype, head_dim, smem_limit, general, block_size)
    defines = (
        ("CF_ELEM", ELEM_CODE[np.dtype(dtype)]),
        ("CF_HEAD_DIM", bucket),
        ("CF_GENERAL", int(general)),
        ("CF_FWD_BLOCK_M", t.block_m),
        ("CF_FWD_BLOCK_N", t.block_n),
        ("CF_FWD_WARPS", t.warps),
        ("CF_FWD_Q_REGS", int(t.q_regs)),
        *sparse,
    )
    return Variant("flash_fwd.cu", defines), t, fwd_smem(t, bucket, elem)


@dataclasses.dataclass(frozen=True)
class BackwardPlan:
    variant: Variant
    dkdv: Tiles
    dkdv_smem: int
    dq: Tiles
    dq_smem: int
    head_dim_padded: int
    # Hopper: the module of cuflash_bwd_dkdv (warpgroup MMA) when it is not `variant`'s;
    # `dkdv` and `dkdv_smem` then describe it. The other kernels come from `variant`.
    dkdv_variant: Variant | None = None


def backward_variant(
    dtype: np.dtype, head_dim: int, general: bool, smem_limit: int, arch: str | None = None,
    block_size: tuple[int, int] | None = None,
) -> BackwardPlan:
    """The backward kernels for (dtype, head dim, modifiers?) on a GPU with `smem_limit`
    bytes of shared memory per block. With `arch` in WGMMA_ARCHES, 16-bit inputs without
    score modifiers get the warpgroup MMA dK/dV kernel; arch=None plans the portable one.
    `block_size` (block-sparse) compiles the list-walking kernels with tiles dividing it."""
    bucket = head_dim_bucket(head_dim)
    elem = np.dtype(dtype).itemsize
    sparse = _sparse_defines(block_size)
    t = tiles_for("bwd", dtype, head_dim, smem_limit, general, block_size)
    tq = tiles_for("dq", dtype, head_dim, smem_limit, general, block_size)
    defines = (
        ("CF_ELEM", ELEM_CODE[np.dtype(dtype)]),
        ("CF_HEAD_DIM", bucket),
        ("CF_GENERAL", int(general)),
        ("CF_BWD_BLOCK_M", t.block_m),
        ("CF_BWD_BLOCK_N", t.block_n),
        ("CF_BWD_WARPS", t.warps),
        ("CF_BWD_STAGES", t.stages),
        *zip(("CF_BWD_WM_S", "CF_BWD_WN_KV", "CF_BWD_WM_Q"), bwd_layout(t, bucket)),
        ("CF_DQ_BLOCK_M", tq.block_m),
        ("CF_DQ_BLOCK_N", tq.block_n),
        ("CF_DQ_WARPS", tq.warps),
        *sparse,
    )
    portable = Variant("flash_bwd.cu", defines)
    tw = _sm90_tiles("bwd_sm90", bucket, smem_limit, block_size) if _wgmma_applies(arch, general, elem) else None
    if tw is not None:
        hopper = (
            ("CF_ELEM", ELEM_CODE[np.dtype(dtype)]),
            ("CF_HEAD_DIM", bucket),
            ("CF_BWD_BLOCK_M", tw.block_m),
            ("CF_BWD_BLOCK_N", tw.block_n),
            ("CF_BWD_WARPS", tw.warps),
            ("CF_BWD_MIN_BLOCKS", tw.min_blocks),
            *sparse,
        )
        return BackwardPlan(portable, tw, bwd_sm90_smem(tw, bucket), tq, dq_smem(tq, bucket, elem), bucket,
                            Variant("flash_bwd_sm90.cu", hopper, arch_suffix="a"))
    return BackwardPlan(portable, t, bwd_smem(t, bucket, elem), tq, dq_smem(tq, bucket, elem), bucket)


def shipped_variants(arch: str) -> list[Variant]:
    """Every variant a user can reach on `arch` (what the compile check builds)."""
    limit = limit_for(arch)
    out = []
    for dtype in ELEM_CODE:
        if not bf16_supported(arch) and dtype == BFLOAT16:
            continue
        for bucket in HEAD_DIM_BUCKETS:
            for general in (False, True):
                out.append(forward_variant(dtype, bucket, general, limit)[0])
                if arch in WGMMA_ARCHES:
                    for tma in (False, True):
                        wg = forward_variant(dtype, bucket, general, limit, arch, tma=tma, family="ws")[0]
                        if wg.arch_suffix and wg not in out:
                            out.append(wg)
                try:
                    out.append(backward_variant(dtype, bucket, general, limit).variant)
                except UnsupportedConfig:
                    continue
                if arch in WGMMA_ARCHES:
                    hopper = backward_variant(dtype, bucket, general, limit, arch).dkdv_variant
                    if hopper is not None:
                        out.append(hopper)
    # Other kernel families register their variants here.
    from ._decode_tiles import shipped_variants as decode_variants

    if bf16_supported(arch):  # the KV-cache family is built on cp.async: Ampere and newer
        out += decode_variants(arch)
    return out


def block_sparse_variants(arch: str, dtypes=None, head_dims=HEAD_DIM_BUCKETS,
                          block_sizes=None) -> list[Variant]:
    """The block-sparse (CF_BLOCK_SPARSE) variants a user can reach on `arch`, deduplicated:
    block sizes that lead to the same tiles share one variant."""
    limit = SMEM_LIMIT[arch]
    sizes = block_sizes or [(bq, bk) for bq in BLOCK_SIZES for bk in BLOCK_SIZES]
    out: dict[Variant, None] = {}
    for dtype in dtypes or ELEM_CODE:
        for bucket in head_dims:
            for general in (False, True):
                for size in sizes:
                    hopper = arch if arch in WGMMA_ARCHES else None
                    out[forward_variant(dtype, bucket, general, limit, block_size=size)[0]] = None
                    plan = backward_variant(dtype, bucket, general, limit, block_size=size)
                    out[plan.variant] = None
                    if hopper:
                        out[forward_variant(dtype, bucket, general, limit, hopper, block_size=size)[0]] = None
                        dkdv = backward_variant(dtype, bucket, general, limit, hopper, size).dkdv_variant
                        if dkdv is not None:
                            out[dkdv] = None
    return list(out)
