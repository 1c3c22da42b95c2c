"""The warp-specialised Hopper forward's host side, checked without a GPU: the tensor-map
arithmetic (dims, byte strides, box) for every layout, when TMA cannot be used, the
descriptor cache, and where the planner picks the family."""

from __future__ import annotations

import numpy as np
import pytest

from cuflash import _params, _tiles, _tma
from cuflash._interop import BFLOAT16
from cuflash._options import make_options

F16 = np.dtype(np.float16)


@pytest.mark.parametrize(
    "layout, shape, strides, expect_dims, expect_strides",
    [
        # (batch, seqlen, heads, dim) contiguous: rows are heads x dim apart, heads dim apart.
        ("bshd", (3, 70, 4, 64), (70 * 4 * 64, 4 * 64, 64), (64, 70, 4, 3), (4 * 64 * 2, 64 * 2, 70 * 4 * 64 * 2)),
        # (batch, heads, seqlen, dim): rows dim apart, heads seqlen x dim apart.
        ("bhsd", (3, 4, 70, 128), (4 * 70 * 128, 70 * 128, 128), (128, 70, 4, 3), (128 * 2, 70 * 128 * 2, 4 * 70 * 128 * 2)),
        # Rows padded to 200 elements (a slice of a fused QKV projection).
        ("bshd", (2, 33, 2, 64), (33 * 200, 200, 64), (64, 33, 2, 2), (400, 128, 33 * 400)),
    ],
)
def test_map_dims_and_byte_strides_follow_the_layout(layout, shape, strides, expect_dims, expect_strides):
    batch_stride, row_stride, head_stride = strides if layout == "bshd" else (strides[0], strides[2], strides[1])
    m = _tma.map_shape(shape, (batch_stride, row_stride, head_stride), 2, layout, False, 128)
    assert m is not None
    assert m.dims == expect_dims and m.strides == expect_strides
    assert m.box == (64, 128, 1, 1) and m.box[0] * m.itemsize == 128  # one 128-byte swizzle row


def test_varlen_maps_one_batch_entry_of_packed_rows():
    m = _tma.map_shape((1000, 8, 128), (0, 8 * 128, 128), 2, "bshd", True, 64)
    assert m.dims == (128, 1000, 8, 1) and m.box == (64, 64, 1, 1)
    assert m.strides[:2] == (8 * 128 * 2, 128 * 2)
    assert m.strides[2] > 0 and m.strides[2] % 16 == 0  # never stepped along, but must be valid


def test_size_one_dimensions_get_a_valid_stride():
    # batch 1 and one head, as torch may report them with any stride (here 1 element)
    m = _tma.map_shape((1, 50, 1, 64), (1, 64, 1), 2, "bshd", False, 128)
    assert m is not None and m.dims == (64, 50, 1, 1)
    assert all(s > 0 and s % 16 == 0 for s in m.strides) and m.strides[0] == 128


@pytest.mark.parametrize(
    "shape, strides, why",
    [
        ((2, 40, 2, 60), (40 * 2 * 60, 2 * 60, 60), "rows of 60 elements are not whole 16-byte vectors"),
        ((2, 40, 2, 64), (40 * 2 * 68 + 4, 2 * 68, 68), "a row stride of 136 bytes"),
        ((2, 40, 2, 64), (0, 2 * 64, 64), "a broadcast batch (stride 0)"),
        ((2, 40, 2, 64), (40 * 2 * 64, -2 * 64, 64), "a negative stride"),
    ],
)
def test_layouts_tma_cannot_read_are_refused(shape, strides, why):
    assert _tma.map_shape(shape, strides, 2, "bshd", False, 128) is None, why


def test_32_bit_elements_and_oversized_boxes_are_refused():
    assert _tma.map_shape((1, 8, 1, 64), (512, 64, 64), 4, "bshd", False, 64) is None
    assert _tma.map_shape((1, 8, 1, 64), (512, 64, 64), 2, "bshd", False, 512) is None


def test_strides_beyond_2_to_the_31_elements_are_kept_whole():
    rows = 2**21
    m = _tma.map_shape((3, rows, 16, 128), (rows * 16 * 128, 16 * 128, 128), 2, "bshd", False, 128)
    assert m.strides[2] == rows * 16 * 128 * 2 > 2**32


class _FakeArray:
    def __init__(self, ptr, shape, dtype=BFLOAT16):
        self.dtype = np.dtype(dtype)
        self.itemsize = self.dtype.itemsize
        self.shape, self.ndim = shape, len(shape)
        self.strides = tuple(int(np.prod(shape[i + 1:])) * self.itemsize for i in range(len(shape)))
        self.data = type("Pointer", (), {"ptr": ptr})()


def _views(q_ptr=1 << 20, shape=(2, 70, 4, 64)):
    return _params.Views(q=_FakeArray(q_ptr, shape), k=_FakeArray(2 << 20, shape), v=_FakeArray(3 << 20, shape),
                         out=_FakeArray(4 << 20, shape), lse=_FakeArray(5 << 20, shape[:3], np.float32))


def _maps(views, opts=None):
    opts = opts or make_options()
    return _tma.forward_maps(views, opts.layout, False, 128, 128, _params.params_dtype(),
                             lambda a: _params.qkv_strides(a, opts, False))


def test_a_misaligned_pointer_plans_no_maps(monkeypatch):
    monkeypatch.setattr(_tma, "available", lambda: True)
    assert _maps(_views(q_ptr=(1 << 20) + 8)) is None
    assert _maps(_views()) is not None


def test_descriptors_are_rebuilt_only_for_new_pointers(monkeypatch):
    monkeypatch.setattr(_tma, "available", lambda: True)
    encoded = []

    def fake_encode(shape, address, bf16):
        encoded.append(address)
        return np.zeros((), dtype=_tma.DESCRIPTOR)

    monkeypatch.setattr(_tma, "encode", fake_encode)
    maps = _maps(_views())
    dtype = _params.params_dtype()

    def argument(q, k, v):
        record = _params.pack({"q": q, "k": k, "v": v})
        assert record.dtype == dtype
        return _params.as_argument(record)

    args = maps.arguments(argument(1 << 20, 2 << 20, 3 << 20))
    assert len(args) == 3 and encoded == [1 << 20, 2 << 20, 3 << 20]
    assert all(a.dtype.itemsize == 128 for a in args)
    maps.arguments(argument(1 << 20, 2 << 20, 3 << 20))
    assert len(encoded) == 3  # same pointers: cached
    maps.arguments(argument(7 << 20, 2 << 20, 3 << 20))
    assert encoded[3:] == [7 << 20, 2 << 20, 3 << 20]
    assert maps.arguments(argument((7 << 20) + 2, 2 << 20, 3 << 20)) is None  # TMA cannot read it


def test_the_family_applies_to_16_bit_hopper_calls_tma_can_read():
    limit = _tiles.SMEM_LIMIT["sm_90"]
    for dtype in _tiles.ELEM_CODE:
        for bucket in _tiles.HEAD_DIM_BUCKETS:
            for general in (False, True):
                variant, tiles, smem = _tiles.forward_variant(dtype, bucket, general, limit, "sm_90", tma=True)
                padded = -(-bucket // 64) * 64
                ws = np.dtype(dtype).itemsize == 2 and padded in (64, 128, 256)
                assert (variant.kernel_file == _tiles.WS_FWD_FILE) == ws
                if ws:
                    assert smem == _tiles.ws_fwd_smem(tiles, padded) <= limit
                    assert dict(variant.defines)["CF_FWD_SMEM"] == smem  # the kernel static_asserts it
                    assert dict(variant.defines)["CF_HEAD_DIM"] == padded
                    assert dict(variant.defines)["CF_GENERAL"] == int(general)
                    assert tiles.block_m == 128 and tiles.warps == 12 and variant.arch_suffix == "a"
                # without TMA, the wgmma kernel as before (the portable one with modifiers)
                plain = _tiles.forward_variant(dtype, bucket, general, limit, "sm_90")[0]
                assert plain.kernel_file != _tiles.WS_FWD_FILE
                if general:
                    assert plain.kernel_file == "flash_fwd.cu" and dict(plain.defines)["CF_GENERAL"] == 1
    assert _tiles.forward_variant(F16, 128, False, _tiles.SMEM_LIMIT["sm_80"], "sm_80", tma=True)[0].kernel_file == "flash_fwd.cu"


def test_the_family_switch_forces_the_wgmma_kernel(monkeypatch):
    limit = _tiles.SMEM_LIMIT["sm_90"]
    monkeypatch.setattr(_tiles, "FWD_FAMILY", "sm90")
    assert _tiles.forward_variant(F16, 128, False, limit, "sm_90", tma=True)[0].kernel_file == "flash_fwd_sm90.cu"
    # with modifiers, the portable kernel, as before the warp-specialised family served them
    general = _tiles.forward_variant(F16, 128, True, limit, "sm_90", tma=True)[0]
    assert general.kernel_file == "flash_fwd.cu" and dict(general.defines)["CF_GENERAL"] == 1
    monkeypatch.setattr(_tiles, "FWD_FAMILY", "fast")
    with pytest.raises(ValueError, match="CUFLASH_FWD_FAMILY='fast' must be one of"):
        _tiles.forward_variant(F16, 128, False, limit, "sm_90", tma=True)
    # the portable family everywhere: modifiers too
    monkeypatch.setattr(_tiles, "FWD_FAMILY", "ws")
    monkeypatch.setattr(_tiles, "WGMMA_ENABLED", False)
    assert _tiles.forward_variant(F16, 128, True, limit, "sm_90", tma=True)[0].kernel_file == "flash_fwd.cu"


def test_shipped_variants_include_the_family_whatever_the_switch(monkeypatch):
    monkeypatch.setattr(_tiles, "FWD_FAMILY", "sm90")
    ws = [v for v in _tiles.shipped_variants("sm_90") if v.kernel_file == _tiles.WS_FWD_FILE]
    assert len(ws) == len(set(ws)) == 12  # fp16, bf16 x head dims 64, 128, 256 x modifiers or not
    assert sum(dict(v.defines)["CF_GENERAL"] for v in ws) == 6
    assert not [v for v in _tiles.shipped_variants("sm_80") if v.kernel_file == _tiles.WS_FWD_FILE]


def _plan(monkeypatch, views, encode=None, **options):
    from cuflash import _build, _launch
    from cuflash._validate import Dims

    monkeypatch.setattr(_tma, "available", lambda: True)
    monkeypatch.setattr(_build, "arch_of", lambda device_index: "sm_90")
    monkeypatch.setattr(_launch, "smem_limit", lambda device_index: _tiles.SMEM_LIMIT["sm_90"])
    monkeypatch.setattr(_tma, "encode", encode or (lambda shape, address, bf16: np.zeros((), dtype=_tma.DESCRIPTOR)))
    opts = make_options(causal=True, **options)
    dims = Dims(batch=2, seqlen_q=70, seqlen_k=70, num_heads=4, num_heads_kv=4, head_dim=64)
    record = _params.fill(views, opts, dims)
    return _launch._forward_kernel(views, opts, dims, 0, record)


def test_the_launch_plans_the_family_with_its_maps(monkeypatch):
    variant, tiles, smem, maps = _plan(monkeypatch, _views())
    assert variant.kernel_file == _tiles.WS_FWD_FILE and maps is not None and tiles.threads == 384
    assert [s.dims for s in maps.shapes] == [(64, 70, 4, 2)] * 3
    assert [s.box[1] for s in maps.shapes] == [tiles.block_m, tiles.block_n, tiles.block_n]


def test_the_launch_falls_back_to_the_wgmma_kernel(monkeypatch, caplog):
    variant, _, _, maps = _plan(monkeypatch, _views(q_ptr=(1 << 20) + 2))  # q not 16-byte aligned
    assert variant.kernel_file == "flash_fwd_sm90.cu" and maps is None

    def refuse(shape, address, bf16):
        raise RuntimeError("CUDA_ERROR_INVALID_VALUE")

    with caplog.at_level("WARNING", logger="cuflash"):
        variant, _, _, maps = _plan(monkeypatch, _views(), encode=refuse)
    assert variant.kernel_file == "flash_fwd_sm90.cu" and maps is None
    assert "TMA descriptors refused" in caplog.text


@pytest.mark.parametrize("options", [{"softcap": 30.0}, {"dropout_p": 0.1, "seed": 3}], ids=["softcap", "dropout"])
def test_calls_with_modifiers_plan_the_family_general_or_the_portable_kernel(monkeypatch, options):
    """A call with score modifiers or dropout takes the warp-specialised kernel compiled
    with them; when TMA cannot read q, the portable kernel with them (the wgmma kernel has
    none)."""
    variant, tiles, _, maps = _plan(monkeypatch, _views(), **options)
    assert variant.kernel_file == _tiles.WS_FWD_FILE and maps is not None and tiles.threads == 384
    assert dict(variant.defines)["CF_GENERAL"] == 1
    variant, _, _, maps = _plan(monkeypatch, _views(q_ptr=(1 << 20) + 2), **options)
    assert variant.kernel_file == "flash_fwd.cu" and dict(variant.defines)["CF_GENERAL"] == 1 and maps is None
