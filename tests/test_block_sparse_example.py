"""examples/block_sparse_train.py in its --tiny configuration (CPU): the sparse and the
dense model both train, every attention call of the sparse one carries the block mask,
and the mask keeps only part of the causal work."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "block_sparse_train.py"


def test_tiny_block_sparse_training_runs_sparse_and_dense(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("block_sparse_train_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        calls = []
        real = module.cuflash_torch.attention

        def counted(*args, **kwargs):
            calls.append(kwargs.get("block_mask") is not None)
            return real(*args, **kwargs)

        monkeypatch.setattr(module.cuflash_torch, "attention", counted)
        results = module.main(["--tiny"])
    finally:
        sys.modules.pop(spec.name, None)
    printed = capsys.readouterr().out
    assert "step time sparse / dense" in printed
    steps, layers = 4, 2
    assert calls == [True] * (steps * layers) + [False] * (steps * layers)
    assert 0.0 < results["sparse"]["density"] < 1.0 and results["dense"]["density"] == 1.0
    for r in results.values():
        assert math.isfinite(r["final_loss"]) and r["ms_per_step"] > 0


@pytest.mark.gpu
def test_block_sparse_training_on_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    spec = importlib.util.spec_from_file_location("block_sparse_train_gpu_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        results = module.main(["--seqlen", "4096", "--steps", "12", "--layers", "2", "--dim", "256", "--heads", "4"])
    finally:
        sys.modules.pop(spec.name, None)
    sparse, dense = results["sparse"], results["dense"]
    assert 0.0 < sparse["density"] < 0.5
    for r in (sparse, dense):
        assert math.isfinite(r["final_loss"]) and r["final_loss"] < math.log(256) + 0.5
        assert math.isfinite(r["peak_gib"])
