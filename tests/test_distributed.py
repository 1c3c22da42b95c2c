"""cuflash.distributed on CPU: 2 and 4 gloo processes against one process.

Each world size spawns its ranks once (tests/_cp_workers.py); every rank runs every case
(float64 CPU tensors, so both sides take cuflash's float64 reference path and must agree
to ~1e-10: the ring, the zig-zag and the all-gather change only the order of exact
sums) and every bad input, and the tests below read the verdicts. Four ranks run as four
processes on this machine's CPUs; the same "4 ranks on 2 GPUs" cannot be tested with
NCCL, which refuses two ranks on one GPU, so the ring logic at 4 ranks is tested here.

Cases that need the core's position_offsets (ALiBi, dropout, window edges off the
diagonal) are strict xfails until cuflash.OPTION_NAMES has it.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

import _cp_workers as workers
import cuflash
import cuflash.distributed as cp

WORLDS = (2, 4)
DEADLINE_S = 240  # spawning, importing torch and every case, per world size; a hang fails here
OFFSETS = "position_offsets" in cuflash.OPTION_NAMES


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    """{world: {case name: None | problem}} with every rank's verdicts merged."""
    cache: dict[int, dict] = {}

    def get(world: int) -> dict:
        if world not in cache:
            cache[world] = _spawn(world, tmp_path_factory.mktemp(f"cp{world}"))
        return cache[world]

    return get


def _spawn(world: int, folder) -> dict:
    os.environ.update(workers.NO_MULTICAST)
    prefix = str(folder / "verdicts")
    init = f"file://{folder / 'store'}"
    context = mp.start_processes(workers.worker, args=(world, init, prefix, "cpu"), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{world} gloo ranks did not finish within {DEADLINE_S} s (a rank hangs?)")
    merged: dict[str, list] = {}
    for rank in range(world):
        with open(f"{prefix}.{rank}.json") as f:
            for name, verdict in json.load(f).items():
                merged.setdefault(name, []).append(verdict)
    return merged


def _case_params():
    params = []
    for world in WORLDS:
        for case in workers.CASES:
            marks = []
            if case.needs_offsets(world) and not OFFSETS:
                marks.append(pytest.mark.xfail(strict=True, reason="needs the core option position_offsets"))
            params.append(pytest.param(world, case, id=f"w{world}-{case.name}", marks=marks))
    return params


@pytest.mark.parametrize("world,case", _case_params())
def test_matches_one_process_forward_and_backward(verdicts, world, case):
    """out, lse, dq, dk, dv of every rank's chunk equal the whole-sequence attention's."""
    results = verdicts(world)[case.name]
    problems = [f"rank {rank}: {r}" for rank, r in enumerate(results) if r is not None]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind", workers.BAD_INPUTS)
def test_bad_input_raises_on_every_rank(verdicts, world, kind):
    """Every rank raises ValueError naming the problem, none hangs (the deadline)."""
    results = verdicts(world)["bad:" + kind]
    problems = [f"rank {rank}: {r}" for rank, r in enumerate(results) if r is not None]
    assert not problems, "\n".join(problems)


def test_auto_picks_allgather_for_small_kv():
    from cuflash.distributed import _choose_placement

    q = torch.empty(1, 8, 8, 16)
    small = torch.empty(1, 8, 1, 16)
    assert _choose_placement("auto", "contiguous", q, small, small, 4) == "allgather"
    assert _choose_placement("auto", "contiguous", q, torch.empty(1, 8, 8, 16), torch.empty(1, 8, 8, 16), 2) == "ring"


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("sharding", ["contiguous", "zigzag"])
def test_shard_then_unshard_is_the_identity(world, sharding):
    x = torch.arange(2 * 24 * 3).reshape(2, 24, 3)
    shards = [cp.shard_sequence(x, r, world, sharding) for r in range(world)]
    assert torch.equal(cp.unshard_sequence(shards, sharding), x)


def test_zigzag_shard_holds_chunks_r_and_2w_minus_1_minus_r():
    x = torch.arange(8)[None]
    assert cp.zigzag_shard(x, 0, 2).tolist() == [[0, 1, 6, 7]]
    assert cp.zigzag_shard(x, 1, 2).tolist() == [[2, 3, 4, 5]]
    assert cp.zigzag_unshard([cp.zigzag_shard(x, r, 2) for r in range(2)]).tolist() == x.tolist()


@pytest.mark.parametrize("call,match", [
    (lambda: cp.zigzag_shard(torch.zeros(1, 10), 0, 3), r"x.shape\[1\]=10 must be a multiple of 2 \* world=6"),
    (lambda: cp.shard_sequence(torch.zeros(1, 10), 0, 4), r"x.shape\[1\]=10 must be a multiple of world=4"),
    (lambda: cp.zigzag_shard(torch.zeros(1, 8), 2, 2), r"rank=2 must be in \[0, world=2\)"),
    (lambda: cp.shard_sequence(torch.zeros(1, 8), 0, 2, "striped"), r"sharding='striped'"),
    (lambda: cp.zigzag_unshard([torch.zeros(1, 3), torch.zeros(1, 3)]), r"same even length"),
    (lambda: cp.unshard_sequence([torch.zeros(1, 4, 16), torch.zeros(1, 4, 8)]),
     r"unshard_sequence: every shard must have the same shape except along dim 1; got shapes "
     r"\[\(1, 4, 16\), \(1, 4, 8\)\]"),
    (lambda: cp.zigzag_unshard([torch.zeros(1, 4, 16), torch.zeros(2, 4, 16)]), r"zigzag_unshard: every shard must"),
    (lambda: cp.unshard_sequence([torch.zeros(1, 4), torch.zeros(1, 4, 1)]), r"same shape except along dim 1"),
    (lambda: cp.unshard_sequence([torch.zeros(1, 4)], dim=2), r"dim=2 is out of range for shards of shape \(1, 4\)"),
    (lambda: cp.unshard_sequence([torch.zeros(1, 4), None]), r"shards\[1\] must be a torch.Tensor; got NoneType"),
])
def test_shard_helpers_reject_bad_splits(call, match):
    with pytest.raises(ValueError, match=match):
        call()
