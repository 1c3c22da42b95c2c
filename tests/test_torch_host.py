"""Host cost of cuflash.torch's operators: what each call runs besides the kernels.

The promise checked here: the operators' bodies are registered directly at the CPU and
CUDA dispatch keys, so a call from torch.compile's generated code reaches the body without
custom_op's per-call wrappers, and still runs the same body (same values)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import cuflash.torch as ct  # noqa: E402


@pytest.mark.parametrize("name", ["attention_fwd", "attention_bwd"])
@pytest.mark.parametrize("key", ["CPU", "CUDA"])
def test_operator_bodies_sit_at_the_device_dispatch_keys(name, key):
    assert ct._DEVICE_KERNELS is not None
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cuflash::{name}", key)


def test_device_kernel_runs_the_operator_body(monkeypatch):
    calls = []
    real = ct._forward_impl
    monkeypatch.setattr(ct, "_forward_impl", lambda *a: calls.append(len(a)) or real(*a))
    q = torch.randn(1, 3, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        out, lse = torch.ops.cuflash.attention_fwd.default(q, q, q, None, None, None, None, None, None, None, True,
                                                          "top_left", -1, -1, 0.0, 0.0, None, None, False, "bhsd")
    assert calls == [len(torch.ops.cuflash.attention_fwd.default._schema.arguments)]  # every argument, by position
    expected = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
