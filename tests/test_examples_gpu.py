"""The examples' short runs on the GPU: both train with cuflash attention in bf16, and
their loss curves track the same model run with the framework's own attention."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_gpu_example", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_torch_gpt_trains_on_the_gpu_like_sdpa(capsys):
    pytest.importorskip("torch")
    curves = _load("torch_gpt").main(
        ["--compare", "--steps", "120", "--batch-size", "16", "--seq-len", "128", "--layers", "2",
         "--dim", "128", "--heads", "2", "--device", "cuda", "--dtype", "bfloat16", "--sample", "0"]
    )
    printed = capsys.readouterr().out
    assert "device: cuda" in printed
    ours, sdpa = curves["cuflash"], curves["sdpa"]
    assert sum(ours[-5:]) / 5 < ours[0] - 1.0, ours
    # Same seed, same model: the curves differ only by bf16 rounding in attention.
    assert max(abs(a - b) for a, b in zip(ours, sdpa)) < 0.15


def test_jax_transformer_trains_on_the_gpu_like_xla(capsys):
    jax = pytest.importorskip("jax")
    if jax.default_backend() != "gpu":
        pytest.skip(f"JAX's default backend is {jax.default_backend()}, not gpu")
    curves = _load("jax_transformer").main(["--tiny", "--compare"])
    printed = capsys.readouterr().out
    assert "device:" in printed
    ours, xla = curves["cuflash"], curves["xla"]
    assert sum(ours[-3:]) / 3 < sum(ours[:3]) / 3 - 0.8
    assert max(abs(a - b) for a, b in zip(ours, xla)) < 5e-2
