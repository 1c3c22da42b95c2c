"""cuflash: exact FlashAttention (forward and backward) as hand-written CUDA, compiled at
run time and launched through CuPy, for any DLPack array (CuPy, PyTorch, JAX, NumPy).

    out = cuflash.attention(q, k, v, causal=True)
    out, lse = cuflash.forward(q, k, v)
    dq, dk, dv = cuflash.backward(dout, q, k, v, out, lse)

CUDA arrays run the kernels; host arrays (NumPy, CPU PyTorch/JAX) take the float64
reference path. Results come back in the caller's own array type.
"""

from . import reference
from ._api import attention, backward, forward, probabilities
from ._options import OPTION_NAMES
from ._validate import MAX_HEAD_DIM, ValidationError

__version__ = "0.1.0"

__all__ = [
    "attention",
    "forward",
    "backward",
    "probabilities",
    "reference",
    "ValidationError",
    "OPTION_NAMES",
    "MAX_HEAD_DIM",
    "__version__",
]

# ---- attention over a KV cache (decode, speculative decode, chunked prefill) ----
from ._kvcache import attention_with_kvcache  # noqa: E402
from ._kvcache import reference as kvcache_reference  # noqa: E402

__all__ += ["attention_with_kvcache", "kvcache_reference"]
