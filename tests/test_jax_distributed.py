"""cuflash.jax_distributed on CPU: meshes of 2 and 4 fake devices against one device.

XLA's device count is fixed when jax first initialises, so the check runs in a
subprocess (tests/_cp_jax_check.py) with XLA_FLAGS=--xla_force_host_platform_device_count=4
and float64; it compares out, lse, dq, dk, dv (jax.vjp under jit) of every case of
tests/_cp_workers.py on 2 devices, and of the core placements on 4, with the whole
sequence on one device. Cases that need the core's position_offsets are strict xfails
until cuflash.OPTION_NAMES has it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")

import _cp_workers as workers  # noqa: E402
import cuflash  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OFFSETS = "position_offsets" in cuflash.OPTION_NAMES


@pytest.fixture(scope="module")
def verdicts():
    env = dict(os.environ, **workers.NO_MULTICAST, JAX_PLATFORMS="cpu")
    paths = [os.path.dirname(HERE), HERE] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    done = subprocess.run([sys.executable, os.path.join(HERE, "_cp_jax_check.py")], env=env, timeout=900,
                          capture_output=True, text=True)
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("VERDICTS ")]
    assert line, f"the JAX check printed no verdicts ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-4000:]}"
    return json.loads(line[-1][len("VERDICTS "):])


def _params():
    out = []
    for world, cases in ((2, workers.CASES), (4, workers.JAX_W4_CASES)):
        for case in cases:
            marks = []
            if case.needs_offsets(world) and not OFFSETS:
                marks.append(pytest.mark.xfail(strict=True, reason="needs the core option position_offsets"))
            out.append(pytest.param(world, case, id=f"w{world}-{case.name}", marks=marks))
    return out


@pytest.mark.parametrize("world,case", _params())
def test_matches_one_device_forward_and_backward(verdicts, world, case):
    verdict = verdicts[f"w{world}-{case.name}"]
    assert verdict is None, verdict
