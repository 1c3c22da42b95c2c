"""examples/torch_gpt.py in its --tiny configuration (CPU, float64, a few seconds): the
loss falls, and the cuflash and torch-SDPA runs from one seed give the same loss curve."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "torch_gpt.py"


@pytest.fixture(scope="module")
def torch_gpt():
    spec = importlib.util.spec_from_file_location("torch_gpt_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_tiny_gpt_learns_and_cuflash_matches_sdpa(torch_gpt, monkeypatch, capsys):
    calls = []
    real = torch_gpt.cuflash_torch.flash_attn_func

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_gpt.cuflash_torch, "flash_attn_func", counted)
    curves = torch_gpt.main(["--tiny", "--compare"])
    printed = capsys.readouterr().out

    assert "device: cpu" in printed and "max |loss difference|" in printed
    cuflash, sdpa = curves["cuflash"], curves["sdpa"]
    steps = len(cuflash)
    assert steps == len(sdpa) >= 20
    assert len(calls) == 2 * steps  # two layers per step, forward only: cuflash really ran
    # The loss falls: from ~log(vocab) to well below it.
    assert sum(cuflash[-5:]) / 5 < cuflash[0] - 0.7
    # float64 end to end: the two attentions agree to rounding, and so do the curves.
    assert max(abs(a - b) for a, b in zip(cuflash, sdpa)) < 1e-9
