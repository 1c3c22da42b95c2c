"""Compiling many kernel variants in child processes, for the compile checks.

Child processes, because NVRTC's ptxas can take a process down on bad input: a crash then
fails a test instead of the run. Spawned, not forked: the test process may hold threads
(JAX's) that a fork would copy mid-flight. Each variant gets a value unique to this run
(CF_BUILD_NONCE, common.cuh) that lands in the PTX, so every one really goes through ptxas
(a compile cache keyed on PTX, as some machines keep below NVRTC, answers without the -v
report that `resources` reads).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cuflash import _build


@dataclass
class Compiled:
    """Per variant tag: seconds and ptxas resources per kernel; failures: 'tag arch: log'."""

    report: dict[str, dict] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def resources(log: str) -> dict[str, dict[str, int]]:
    """Registers, stack and spill stores per entry function, from ptxas's -v report."""
    found = {}
    for m in re.finditer(
        r"Compiling entry function '(\w+)'.*?(\d+) bytes stack frame, (\d+) bytes spill stores.*?Used (\d+) registers",
        log,
        re.S,
    ):
        found[m.group(1)] = {"registers": int(m.group(4)), "stack": int(m.group(2)), "spill_stores": int(m.group(3))}
    return found


def compile_all(variants, arch: str, max_workers: int = 16) -> Compiled:
    nonce = (("CF_BUILD_NONCE", int.from_bytes(os.urandom(3), "little")),)
    jobs = [(v.with_defines(nonce), arch) for v in variants]
    out = Compiled()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(os.cpu_count() or 2, max_workers), mp_context=context) as pool:
        for tag, arch_, seconds, log in pool.map(_build.compile_job, jobs):
            if seconds is None:
                out.failures.append(f"{tag} {arch_}: {log[:2000]}")
            else:
                out.report[tag] = {"seconds": round(seconds, 2), "kernels": resources(log)}
                out.logs[tag] = log
    return out


def save_report(report: dict, arch: str) -> None:
    """Into $CUFLASH_COMPILE_REPORT/compile-ARCH.json when set (reports/ tables are made from it)."""
    out = os.environ.get("CUFLASH_COMPILE_REPORT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"compile-{arch}.json").write_text(json.dumps(report, indent=1, sort_keys=True))
