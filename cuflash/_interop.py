"""DLPack in, the caller's own array type out, with no copies on either side.

An input becomes an `ArrayRef`: the caller's object, a zero-copy NumPy (host) or CuPy
(CUDA) view of it, and enough metadata (shape, strides in elements, dtype, device) for the
validator to explain any problem without touching the data. Outputs are allocated by the
caller's own library where it allows writes (PyTorch: its caching allocator, which also
works under CUDA-graph capture; CuPy), and by CuPy otherwise (JAX arrays are immutable),
then handed back through DLPack.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import numpy as np

try:  # ml_dtypes gives NumPy a bfloat16 (CuPy 14 maps DLPack bf16 to it as well).
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a core dependency
    BFLOAT16 = None

# DLPack device types (dlpack.h: DLDeviceType).
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13


@dataclasses.dataclass(frozen=True)
class Device:
    kind: str  # "cpu" or "cuda"
    index: int = 0

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


CPU = Device("cpu")


@dataclasses.dataclass
class ArrayRef:
    """One caller array: its origin and a zero-copy view to compute with."""

    name: str
    obj: Any  # what the caller passed
    library: str  # "numpy", "cupy", "torch", "jax" or the producing module's name
    view: Any  # numpy.ndarray (host) or cupy.ndarray (CUDA), sharing memory with obj
    device: Device

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.view.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.view.dtype)

    @property
    def strides(self) -> tuple[int, ...]:
        """Strides in elements (the kernels' unit)."""
        item = self.view.dtype.itemsize
        return tuple(s // item for s in self.view.strides)

    def describe(self) -> str:
        return f"{self.name}: shape={self.shape} strides={self.strides} dtype={dtype_name(self.dtype)} device={self.device}"


def dtype_name(dtype: np.dtype) -> str:
    return "bfloat16" if BFLOAT16 is not None and dtype == BFLOAT16 else str(dtype)


def library_of(obj: Any) -> str:
    module = type(obj).__module__.split(".")[0]
    if module in ("jaxlib", "jax"):
        return "jax"
    return module


class InteropError(TypeError):
    pass


def device_of(obj: Any) -> Device:
    """The device an array lives on, from the DLPack protocol (no data is touched)."""
    if isinstance(obj, np.ndarray):
        return CPU
    if not hasattr(obj, "__dlpack_device__"):
        raise InteropError(f"expected an array supporting DLPack, got {type(obj).__name__}")
    if getattr(obj, "is_meta", False) is True:  # torch's "meta" device (DLPack has no code for it)
        raise InteropError(
            f"meta tensors hold no data (a {type(obj).__name__} on device 'meta', shape {tuple(obj.shape)}): "
            "cuflash computes on CPU or CUDA arrays; for shapes alone call the cuflash.torch functions, "
            "whose meta implementations give outputs on the meta device"
        )
    kind, index = obj.__dlpack_device__()
    kind = int(kind)
    if kind in (_DL_CPU, _DL_CUDA_HOST):
        return CPU
    if kind in (_DL_CUDA, _DL_CUDA_MANAGED):
        return Device("cuda", int(index))
    raise InteropError(f"DLPack device type {kind} is not supported (only CPU and CUDA)")


def import_array(name: str, obj: Any, stream: Any = None) -> ArrayRef:
    """Wrap a caller array without copying it. `stream` is the CuPy stream the kernels
    will run on; DLPack uses it to order the producer's pending work before ours."""
    device = device_of(obj)
    library = library_of(obj)
    if library == "torch" and getattr(obj, "requires_grad", False):
        obj_for_export = obj.detach()  # torch refuses to export tensors that require grad
    else:
        obj_for_export = obj
    if device.kind == "cpu":
        view = _host_view(obj_for_export, library)
    else:
        import cupy

        with cupy.cuda.Device(device.index):
            if stream is not None:
                with stream:
                    view = cupy.from_dlpack(obj_for_export)
            else:
                view = cupy.from_dlpack(obj_for_export)
    return ArrayRef(name=name, obj=obj, library=library, view=view, device=device)


def _host_view(obj: Any, library: str) -> np.ndarray:
    if isinstance(obj, np.ndarray):
        return obj
    if library == "torch" and BFLOAT16 is not None and str(obj.dtype) == "torch.bfloat16":
        import torch

        # NumPy's DLPack import has no bfloat16; reinterpret the bits instead (no copy).
        return obj.view(torch.int16).numpy().view(BFLOAT16)
    if library == "torch" and str(obj.dtype) == "torch.float8_e4m3fn":
        import torch

        # Likewise float8 (NumPy's DLPack import has no float8): the bits as ml_dtypes'.
        return obj.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    try:
        return np.from_dlpack(obj)
    except (BufferError, TypeError, RuntimeError):
        # e.g. bfloat16 from JAX: its __array__ hands out ml_dtypes arrays.
        return np.asarray(obj)


def to_caller(result: Any, like: ArrayRef) -> Any:
    """Return `result` (a NumPy or CuPy array) as an array of the caller's library,
    on the caller's device, without a copy where the library allows it."""
    if like.library in ("numpy", "cupy"):
        if like.device.kind == "cpu" and not isinstance(result, np.ndarray):
            raise AssertionError("host caller given a device result")  # internal invariant
        return result
    if like.library == "torch":
        import torch

        if isinstance(result, np.ndarray):
            if BFLOAT16 is not None and result.dtype == BFLOAT16:
                return torch.from_numpy(result.view(np.int16)).view(torch.bfloat16)
            return torch.from_numpy(result)
        return torch.from_dlpack(result)
    if like.library == "jax":
        import jax.numpy as jnp

        if isinstance(result, np.ndarray):
            return jnp.asarray(result)
        return jnp.from_dlpack(result)
    # Any other DLPack producer: use its array-API namespace when it has one.
    try:
        import array_api_compat

        xp = array_api_compat.array_namespace(like.obj)
        return xp.from_dlpack(result)
    except Exception:  # noqa: BLE001 - fall back to the computing library's array
        return result


def empty(shape: tuple[int, ...], dtype: np.dtype, like: ArrayRef, stream: Any = None) -> tuple[Any, Any]:
    """Allocate an output on `like`'s device: returns (caller_object, compute_view).

    PyTorch outputs come from PyTorch's allocator (stream-ordered, graph-capture safe);
    CuPy outputs from CuPy; everything else (JAX) from CuPy, handed over at the end."""
    if like.device.kind == "cpu":
        arr = np.empty(shape, dtype=dtype)
        return arr, arr
    import cupy

    if like.library == "torch":
        import torch

        tdtype = _torch_dtype(dtype)
        t = torch.empty(shape, dtype=tdtype, device=f"cuda:{like.device.index}")
        with cupy.cuda.Device(like.device.index):
            if stream is not None:
                with stream:
                    view = cupy.from_dlpack(t)
            else:
                view = cupy.from_dlpack(t)
        return t, view
    with cupy.cuda.Device(like.device.index):
        arr = cupy.empty(shape, dtype=dtype)
    return None, arr


def _torch_dtype(dtype: np.dtype):
    import torch

    if BFLOAT16 is not None and dtype == BFLOAT16:
        return torch.bfloat16
    return {
        np.dtype(np.float16): torch.float16,
        np.dtype(np.float32): torch.float32,
        np.dtype(np.float64): torch.float64,
        np.dtype(np.int32): torch.int32,
    }[np.dtype(dtype)]


class _StreamHandle:
    """A raw cudaStream_t presented through the CUDA stream protocol."""

    def __init__(self, ptr: int):
        self._ptr = int(ptr)

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self._ptr)


def caller_stream(first: Any, device: Device):
    """The CuPy stream to launch on: the caller's library's current stream on `device`
    (PyTorch's current stream for torch tensors, CuPy's current stream otherwise)."""
    import cupy

    with cupy.cuda.Device(device.index):
        if library_of(first) == "torch":
            import torch

            ptr = torch.cuda.current_stream(device.index).cuda_stream
            return cupy.cuda.Stream.from_external(_StreamHandle(ptr))
        return cupy.cuda.get_current_stream()


@contextlib.contextmanager
def on_device(device: Device, stream: Any) -> Iterator[None]:
    """Make `device` current and `stream` CuPy's current stream for the block."""
    import cupy

    with cupy.cuda.Device(device.index), stream:
        yield
