"""One launch of each kernel of interest between cudaProfilerStart/Stop, for Nsight Compute:

    ncu --profile-from-start off --clock-control none --section ... \\
        python benchmarks/profile_kernels.py [cuflash-fwd|cuflash-bwd|sdpa-fwd|sdpa-bwd|overhead]

bf16, head dim 128, seqlen 4096, batch 4, 16 heads, non-causal. `overhead` times the host
side of one call (no profiler needed).
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import cuflash  # noqa: E402


def main(what: str) -> None:
    b, n, h, d = 4, 4096, 16, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    if what == "overhead":
        for name, shape in (("tiny", (1, 128, 1, 64)), ("bench", (b, n, h, d))):
            qs = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
            cuflash.forward(qs, qs, qs)
            torch.cuda.synchronize()
            reps = 300
            t = time.perf_counter()
            for _ in range(reps):
                cuflash.forward(qs, qs, qs)
            host = (time.perf_counter() - t) / reps
            torch.cuda.synchronize()
            qt = qs.transpose(1, 2)
            t = time.perf_counter()
            for _ in range(reps):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    F.scaled_dot_product_attention(qt, qt, qt)
            sdpa = (time.perf_counter() - t) / reps
            torch.cuda.synchronize()
            print(f"host time per forward call ({name}): cuflash {host * 1e6:.0f} us, SDPA flash {sdpa * 1e6:.0f} us")
        return
    out, lse = cuflash.forward(q, k, v)
    cuflash.backward(do, q, k, v, out, lse)
    qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        o = F.scaled_dot_product_attention(qt, kt, vt)
    o.backward(do.transpose(1, 2), retain_graph=True)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    if what == "cuflash-fwd":
        cuflash.forward(q, k, v)
    elif what == "cuflash-bwd":
        cuflash.backward(do, q, k, v, out, lse)
    elif what == "sdpa-fwd":
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.no_grad():
            F.scaled_dot_product_attention(qt, kt, vt)
    elif what == "sdpa-bwd":
        o.backward(do.transpose(1, 2), retain_graph=True)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cuflash-fwd")
