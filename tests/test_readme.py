"""README.md's Python snippets run as written.

Every ```python block of README.md is executed here, each in a fresh namespace, in the
order it appears. Words after `python` in the fence say what a block needs:

    ```python                  runs anywhere (NumPy and cuflash only)
    ```python requires=torch   skipped, with the reason, where torch (or jax, cupy) is absent
    ```python gpu              needs a CUDA GPU: carries the gpu marker

Blocks written for PyTorch or JAX pick the GPU when there is one and otherwise run on the
CPU through the float64 reference path, so a machine without a GPU runs them too.
"""

from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
_FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)
_KNOWN_TAGS = {"gpu"}
_KNOWN_PACKAGES = {"torch", "jax", "cupy", "transformers"}


def snippets() -> list[tuple[int, set[str], tuple[str, ...], str]]:
    """(line, tags, required packages, code) of each ```python block of README.md."""
    if not README.is_file():
        return []
    text = README.read_text()
    found = []
    for match in _FENCE.finditer(text):
        words = match.group(1).split()
        tags = {w for w in words if "=" not in w}
        requires = tuple(p for w in words if w.startswith("requires=") for p in w.split("=", 1)[1].split(","))
        line = text.count("\n", 0, match.start()) + 1
        found.append((line, tags, requires, match.group(2)))
    return found


def _params():
    params = []
    for line, tags, requires, code in snippets():
        marks = [pytest.mark.gpu] if "gpu" in tags else []
        params.append(pytest.param(tags, requires, code, id=f"README.md:{line}", marks=marks))
    return params


def test_readme_has_snippets_and_every_tag_is_known():
    if not README.is_file():
        pytest.skip("README.md is not part of an installed package")
    found = snippets()
    assert len(found) >= 5, "README.md's ```python blocks were not found"
    for line, tags, requires, _ in found:
        assert tags <= _KNOWN_TAGS, f"README.md:{line}: unknown tag(s) {tags - _KNOWN_TAGS}"
        assert set(requires) <= _KNOWN_PACKAGES, f"README.md:{line}: unknown requirement(s) {requires}"
    # Most blocks must run without a GPU: a README whose examples all need one would go untested in CI.
    assert sum("gpu" not in tags for _, tags, _, _ in found) >= 4


@pytest.mark.parametrize("tags, requires, code", _params())
def test_readme_snippet_runs(tags, requires, code, tmp_path, monkeypatch, capsys):
    for package in requires:
        try:
            importlib.import_module(package)
        except ImportError as exc:
            pytest.skip(f"needs {package} ({exc})")
    monkeypatch.chdir(tmp_path)
    # The logging snippet configures the process's logging: put it back for the other tests.
    root_handlers, level = logging.root.handlers[:], logging.getLogger("cuflash").level
    try:
        exec(compile(code, "README.md snippet", "exec"), {"__name__": "__readme__"})
    finally:
        logging.root.handlers[:] = root_handlers
        logging.getLogger("cuflash").setLevel(level)
