"""Compile-time specialisation of the KV-cache kernels (cuda_src/flash_decode.cu).

One thread block takes 16 query rows (the query heads of one kv head times the query
positions) and streams the keys through a ring of `stages` K/V tiles of `block_n` keys;
its `warps` split every tile's keys between them. The kernels are memory bound, so the
tiles are chosen for bytes in flight, not for tensor-core shape: (stages - 1) tiles are
loading while one is used, and two blocks share an SM where shared memory allows.
The first row whose shared memory fits the GPU wins.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ._build import Variant
from ._tiles import ELEM_CODE, HEAD_DIM_BUCKETS, SMEM_LIMIT, UnsupportedConfig, head_dim_bucket

_PAD = 8  # elements of padding per shared-memory row (SmemPad)
_ROWS = 16  # query rows per block (DecodeKernel::kRows)


@dataclasses.dataclass(frozen=True)
class DecodeTiles:
    block_n: int
    warps: int
    stages: int

    @property
    def threads(self) -> int:
        return 32 * self.warps


def decode_smem(t: DecodeTiles, head_dim: int, elem_bytes: int = 2) -> int:
    """DecodeKernel::kSmemBytes: the Q tile, then the larger of the K/V ring and the fp32
    area where the warps merge their outputs (it reuses the ring). The kernel checks this
    number with a static_assert (CF_DEC_SMEM)."""
    ld = head_dim + _PAD
    q = _ROWS * ld * elem_bytes
    ring = t.stages * 2 * t.block_n * ld * elem_bytes
    merge = t.warps * _ROWS * (head_dim + 4) * 4
    return q + max(ring, merge)


# (largest head dim, tiles, reason). Scanned in order; sizes are for 16-bit elements.
_TABLE = (
    (64, DecodeTiles(128, 4, 3), "d<=64: 128-key tiles (18 KB of K+V at d=64), 3 stages: 113 KB, two blocks per H200 SM, ~72 KB in flight per SM"),
    (128, DecodeTiles(64, 4, 3), "d<=128: 64-key tiles (34 KB of K+V at d=128), 3 stages: 106 KB, two blocks per H200 SM, ~136 KB in flight per SM"),
    (256, DecodeTiles(64, 4, 2), "d<=256: 64-key tiles (66 KB at d=256), 2 stages: 144 KB, one block per SM, one tile loading while one is used"),
    # Parts with ~100 KB of shared memory per block (sm_86, sm_89).
    # (d<=64 falls to the d<=128 row there, 58 KB; d<=128 to the d<=256 row, 74 KB.)
    (256, DecodeTiles(32, 2, 2), "d<=256 on 99 KB parts: 32-key tiles, two warps, 76 KB"),
)

DTYPES = tuple(d for d in ELEM_CODE if np.dtype(d).itemsize == 2)


def decode_tiles(head_dim: int, smem_limit: int) -> DecodeTiles:
    bucket = head_dim_bucket(head_dim)
    for max_d, tiles, _reason in _TABLE:
        if bucket <= max_d and decode_smem(tiles, bucket) <= smem_limit:
            return tiles
    raise UnsupportedConfig(f"no KV-cache tiles for head_dim={head_dim} within {smem_limit} bytes of shared memory per block")


def variant_for(dtype: np.dtype, bucket: int, t: DecodeTiles) -> Variant:
    defines = (
        ("CF_ELEM", ELEM_CODE[np.dtype(dtype)]),
        ("CF_HEAD_DIM", bucket),
        ("CF_DEC_BLOCK_N", t.block_n),
        ("CF_DEC_WARPS", t.warps),
        ("CF_DEC_STAGES", t.stages),
        ("CF_DEC_SMEM", decode_smem(t, bucket)),
    )
    return Variant("flash_decode.cu", defines)


def decode_variant(dtype: np.dtype, head_dim: int, smem_limit: int) -> tuple[Variant, DecodeTiles, int]:
    """The KV-cache kernels' module for (dtype, head dim) on a GPU with `smem_limit` bytes
    of shared memory per block, its tiles and its dynamic shared memory."""
    if np.dtype(dtype) not in DTYPES:
        raise UnsupportedConfig(f"dtype={dtype} has no KV-cache kernels (fp16 and bf16 only)")
    bucket = head_dim_bucket(head_dim)
    t = decode_tiles(head_dim, smem_limit)
    return variant_for(dtype, bucket, t), t, decode_smem(t, bucket)


def shipped_variants(arch: str) -> list[Variant]:
    """Every KV-cache variant a user can reach on `arch`."""
    limit = SMEM_LIMIT[arch]
    return [decode_variant(dtype, bucket, limit)[0] for dtype in DTYPES for bucket in HEAD_DIM_BUCKETS]


def all_variants() -> list[Variant]:
    """Every KV-cache variant some GPU of SMEM_LIMIT reaches, the small-shared-memory
    rows included (the compile check builds these beyond the shipped arches' own)."""
    out = []
    # Ampere and newer only: the family is built on cp.async (pre-Ampere parts have no KV-cache kernels).
    for limit in sorted({limit for arch, limit in SMEM_LIMIT.items() if int(arch.split("_")[1]) >= 80}):
        for dtype in DTYPES:
            for bucket in HEAD_DIM_BUCKETS:
                v = decode_variant(dtype, bucket, limit)[0]
                if v not in out:
                    out.append(v)
    return out
