"""Device check of the warp-specialised Hopper forward (flash_fwd_ws_sm90.cu): correctness
against float64 first (plain and with score modifiers and dropout), then speed beside the
wgmma kernel and SDPA's cuDNN and flash backends, and a features table at seqlen 4k (the
family compiled with the modifiers beside the portable kernel and SDPA given the same mask
or bias). Runs in under three minutes on an H200:

    python benchmarks/ws_check.py            # both parts; the table comes last
    python benchmarks/ws_check.py --quick    # fewer timing points

Each part runs in a child process under a watchdog: a kernel that never finishes (an
mbarrier wait nobody completes) kills its child after a few seconds and is reported as a
hang; the timing part then runs without the family. Correctness uses the GPU tests' case
machinery (tests/test_kernels_gpu.py: the tolerance method, NaN-poisoned outputs) with the
family forced, and checks that the family really ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HANG = 3  # exit status of a child whose watchdog fired


class Watchdog:
    """Kills the process when `arm(seconds)` is not re-armed or disarmed in time."""

    def __init__(self):
        self._timer: threading.Timer | None = None
        self.what = ""

    def arm(self, seconds: float, what: str) -> None:
        self.disarm()
        self.what = what

        def fire():
            print(json.dumps({"hang": what, "seconds": seconds}), flush=True)
            os._exit(HANG)

        self._timer = threading.Timer(seconds, fire)
        self._timer.daemon = True
        self._timer.start()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


# ---- correctness -------------------------------------------------------------------------------


def correctness_cases():
    from test_kernels_gpu import Case

    cases = []
    for d in (64, 128, 256):
        for dtype in ("fp16", "bf16"):
            for causal in (False, True):
                cases.append(Case(batch=2, seqlen_q=257, seqlen_k=389, heads=2, heads_kv=2, head_dim=d, dtype=dtype,
                                  causal=causal))
            cases.append(Case(batch=1, seqlen_q=389, seqlen_k=131, heads=4, heads_kv=2, head_dim=d, dtype=dtype,
                              causal=True, alignment="top_left"))  # GQA, seqlen_q > seqlen_k
    cases += [
        Case(batch=1, seqlen_q=1, seqlen_k=1, heads=3, heads_kv=1, head_dim=64, dtype="bf16"),
        Case(batch=1, seqlen_q=17, seqlen_k=1031, heads=3, heads_kv=1, head_dim=64, dtype="bf16", causal=True),
        Case(batch=1, seqlen_q=300, seqlen_k=40, heads=2, heads_kv=2, head_dim=128, dtype="fp16", causal=True),
        Case(heads=4, heads_kv=1, dtype="bf16", layout="bhsd", seqlen_q=200, seqlen_k=300, head_dim=96),
        Case(seqlen_q=77, seqlen_k=130, head_dim=40, dtype="fp16"),
        Case(seqlen_q=77, seqlen_k=130, head_dim=224, dtype="bf16"),
        Case(seqlen_q=500, seqlen_k=500, window=(37, 5), dtype="bf16", head_dim=128),
        Case(seqlen_q=130, seqlen_k=300, causal=True, positions=(170, 0), dtype="bf16", head_dim=128),
        Case(seqlen_q=130, seqlen_k=300, causal=True, positions=(0, 100), dtype="fp16", head_dim=64),
        Case(heads=2, heads_kv=1, dtype="bf16", head_dim=128, varlen=((5, 7), (0, 9), (130, 1), (257, 300), (1, 0))),
        Case(heads=4, heads_kv=2, dtype="fp16", head_dim=64, causal=True, varlen=((200, 200), (131, 129), (17, 260))),
        Case(heads=2, heads_kv=2, dtype="bf16", head_dim=256, window=(20, 3), varlen=((100, 90), (70, 130))),
        Case(batch=1, seqlen_q=2049, seqlen_k=2050, heads=2, heads_kv=1, head_dim=128, dtype="bf16", causal=True),
    ]
    return cases + feature_cases()


def feature_cases():
    """The features table's modifiers, on small shapes (the family compiled with them)."""
    from test_kernels_gpu import Case

    small = {"batch": 2, "seqlen_q": 257, "seqlen_k": 389, "heads": 2, "heads_kv": 2}
    cases = []
    for d in (64, 128, 256):
        cases.append(Case(**small, head_dim=d, dtype="bf16", softcap=30.0, alibi="h", bias_shape=("b", "h", "q", "k"),
                          mask_shape=("b", "1", "1", "k")))
        cases.append(Case(**small, head_dim=d, dtype="fp16", causal=True, dropout_p=0.1))
    cases += [
        Case(**small, head_dim=128, dtype="bf16", softcap=30.0),
        Case(**small, head_dim=128, dtype="bf16", alibi="bh", causal=True),
        Case(**small, head_dim=128, dtype="bf16", mask_shape=("b", "1", "1", "k")),
        Case(**small, head_dim=128, dtype="bf16", bias_shape=("b", "h", "q", "k")),
        Case(**small, head_dim=128, dtype="bf16", dropout_p=0.1),
        Case(heads=2, heads_kv=1, dtype="bf16", head_dim=128, softcap=20.0, mask_shape=("b", "h", "q", "k"),
             dropout_p=0.2, varlen=((5, 7), (0, 9), (130, 1), (257, 300))),
    ]
    return cases


def poison_outputs() -> None:
    """Every output the API allocates starts as NaN (the GPU tests' fixture, by hand)."""
    import numpy as np

    from cuflash import _fast, _interop
    from cuflash._interop import BFLOAT16

    real_empty, real_fast = _interop.empty, _fast.empty

    def poisoned(shape, dtype, like, stream=None):
        obj, view = real_empty(shape, dtype, like, stream)
        if np.dtype(dtype).kind == "f" or np.dtype(dtype) == BFLOAT16:
            view.fill(np.nan)
        return obj, view

    def poisoned_fast(library, like, shape, dtype):
        arr = real_fast(library, like, shape, dtype)
        if library == "torch" and arr.is_floating_point():
            arr.fill_(float("nan"))
        return arr

    _interop.empty, _fast.empty = poisoned, poisoned_fast


def record_kernel_files() -> list[str]:
    """Make cuflash's module loader note the kernel file of every module it hands out;
    returns the list it appends to (which family really ran)."""
    from cuflash import _build

    files: list[str] = []
    real_module = _build.module

    def recording(variant, device_index):
        files.append(variant.kernel_file)
        return real_module(variant, device_index)

    _build.module = recording
    return files


def run_correctness(dog: Watchdog) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    import cupy
    from test_kernels_gpu import case_seed, run_case

    from cuflash import _fast, _tiles

    poison_outputs()
    _tiles.FWD_FAMILY = "ws"
    files = record_kernel_files()
    failed = 0
    from cuflash import _launch

    plain = [(case, None) for case in correctness_cases()]
    # Persistent grids of a few blocks, each walking many query tiles.
    persistent = [(case, blocks) for case in correctness_cases()[::4] for blocks in (1, 5)]
    for case, blocks in plain + persistent:
        _tiles.WS_PERSISTENT = blocks is not None
        if blocks is not None:
            _launch.sm_count = lambda device_index, blocks=blocks: blocks
        files.clear()
        _fast.clear()
        dog.arm(20.0, repr(case))  # compiles on first use (~2 s), then milliseconds
        try:
            comparisons = run_case(case, seed=case_seed(case), backward=False)
            cupy.cuda.get_current_stream().synchronize()
            ran = _tiles.WS_FWD_FILE in files
            worst = max((c.err / c.bound for c in comparisons if c.bound > 0), default=0.0)  # <= 1 passes
            status = "ok" if ran else "NOT-WS"
            failed += not ran
        except AssertionError as exc:
            status, worst = f"FAIL {str(exc)[:300]}", None
            failed += 1
        except Exception as exc:  # noqa: BLE001 - report and go on
            status, worst = f"ERROR {type(exc).__name__}: {str(exc)[:300]}", None
            failed += 1
        dog.disarm()
        print(json.dumps({"case": repr(case), "persistent_blocks": blocks, "status": status, "worst": worst}),
              flush=True)
    return 1 if failed else 0


# ---- timing ------------------------------------------------------------------------------------


def time_ms(fn, dog: Watchdog, what: str, budget_ms: float = 25.0) -> float:
    import torch

    dog.arm(15.0, what)
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    n = int(min(max(budget_ms / once, 3), 50))
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    dog.disarm()
    return start.elapsed_time(end) / n


def run_timing(dog: Watchdog, skip_ws: bool, quick: bool) -> int:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuflash
    from cuflash import _fast, _tiles

    systems = ([] if skip_ws else ["ws", "ws_persistent"]) + ["sm90", "sdpa_cudnn", "sdpa_flash"]
    seqlens = (1024, 4096) if quick else (1024, 4096, 16384)
    tokens, width = 16384, 2048
    for d in (64, 128, 256):
        for seqlen in seqlens:
            for causal in (False, True):
                b, h = tokens // seqlen, width // d
                gen = torch.Generator(device="cuda").manual_seed(seqlen + d)
                q, k, v = (torch.randn((b, seqlen, h, d), device="cuda", dtype=torch.bfloat16, generator=gen)
                           for _ in range(3))
                flop = 4 * b * h * seqlen * seqlen * d / (2 if causal else 1)
                row = {"d": d, "seqlen": seqlen, "causal": causal}
                for system in systems:
                    what = f"{system} d={d} seqlen={seqlen} causal={causal}"
                    try:
                        if system in ("ws", "ws_persistent", "sm90"):
                            _tiles.FWD_FAMILY = "sm90" if system == "sm90" else "ws"
                            _tiles.WS_PERSISTENT = system == "ws_persistent"
                            _fast.clear()

                            def fn(q=q, k=k, v=v, causal=causal):
                                return cuflash.forward(q, k, v, causal=causal)
                        else:
                            backend = SDPBackend.CUDNN_ATTENTION if system == "sdpa_cudnn" else SDPBackend.FLASH_ATTENTION
                            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

                            def fn(qt=qt, kt=kt, vt=vt, causal=causal, backend=backend):
                                with sdpa_kernel(backend), torch.no_grad():
                                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                        row[system] = flop / time_ms(fn, dog, what) / 1e9
                    except Exception as exc:  # noqa: BLE001 - a backend may refuse a shape
                        dog.disarm()
                        row[system] = None
                        row[f"{system}_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                print(json.dumps(row), flush=True)
    return 0


FEATURES = ("plain", "softcap", "alibi", "key_padding", "dense_bias", "dropout")


def run_features(dog: Watchdog) -> int:
    """Seqlen 4k, batch 4, 16 heads, d=128, bf16, not causal: each modifier through the
    family compiled with it ("ws"), the portable kernel ("portable", WGMMA off) and SDPA's
    cuDNN and memory-efficient backends where they take the same mask or bias."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuflash
    from cuflash import _fast, _tiles

    b, n, h, d = 4, 4096, 16, 128
    gen = torch.Generator(device="cuda").manual_seed(11)
    q, k, v = (torch.randn((b, n, h, d), device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / h) for i in range(h)], device="cuda", dtype=torch.float32)
    keep_keys = torch.ones((b, 1, 1, n), device="cuda", dtype=torch.bool)
    keep_keys[..., n - n // 10:] = False  # 10% padded keys
    dense = torch.randn((b, h, n, n), device="cuda", dtype=torch.bfloat16, generator=gen)
    ours = {
        "plain": {},
        "softcap": {"softcap": 30.0},
        "alibi": {"alibi_slopes": slopes},
        "key_padding": {"mask": keep_keys},
        "dense_bias": {"bias": dense},
        "dropout": {"dropout_p": 0.1},
    }
    # SDPA given the same mask, bias or dropout (softcap and ALiBi: no such option, not timed)
    theirs = {"plain": {}, "key_padding": {"attn_mask": keep_keys}, "dense_bias": {"attn_mask": dense},
              "dropout": {"dropout_p": 0.1}}
    files = record_kernel_files()
    _tiles.FWD_FAMILY = "ws"
    for feature in FEATURES:
        row = {"feature": feature}
        for system in ("ws", "portable", "sdpa_cudnn", "sdpa_efficient"):
            what = f"{system} {feature}"
            try:
                if system in ("ws", "portable"):
                    _tiles.WGMMA_ENABLED = system == "ws"  # off: the portable (mma.sync) kernel, plain too
                    _fast.clear()
                    files.clear()

                    def fn(options=ours[feature]):
                        return cuflash.forward(q, k, v, **options)

                    row[system] = time_ms(fn, dog, what)
                    expected = _tiles.WS_FWD_FILE if system == "ws" else "flash_fwd.cu"
                    if expected not in files:
                        row[f"{system}_error"] = f"ran {files}, not {expected}"
                elif feature in theirs:
                    backend = SDPBackend.CUDNN_ATTENTION if system == "sdpa_cudnn" else SDPBackend.EFFICIENT_ATTENTION

                    def fn(options=theirs[feature], backend=backend):
                        with sdpa_kernel(backend), torch.no_grad():
                            return F.scaled_dot_product_attention(qt, kt, vt, **options)

                    row[system] = time_ms(fn, dog, what)
            except Exception as exc:  # noqa: BLE001 - a backend may refuse an option
                dog.disarm()
                row[system] = None
                row[f"{system}_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        print(json.dumps(row), flush=True)
    _tiles.WGMMA_ENABLED = True
    return 0


def fmt(x, spec="{:10.0f}"):
    """x in spec's width, or a right-aligned "-" where there is no number."""
    return spec.format(x) if isinstance(x, (int, float)) else " " * (len(spec.format(0.0)) - 1) + "-"


def ratio(a, b):
    """a / b where both are numbers and b is not 0, else None."""
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def print_features(rows: list[dict]) -> None:
    print("\nfeatures: bf16 forward, batch 4, seqlen 4k, 16 heads, d=128, not causal: ms, x plain (over the ws "
          "plain kernel), and SDPA's time over ws (> 1: ws faster) given the same mask or bias")
    print(f"{'feature':>12} {'ws ms':>8} {'x plain':>8} {'portable':>9} {'x plain':>8} {'cudnn ms':>9} {'eff ms':>8}"
          f" {'cudnn/ws':>9} {'eff/ws':>7}")
    plain = next((r.get("ws") for r in rows if r.get("feature") == "plain"), None)

    for r in rows:
        if "hang" in r:
            print(f"HANG: {r['hang']}")
            continue
        print(f"{r['feature']:>12} {fmt(r.get('ws'), '{:8.3f}')} {fmt(ratio(r.get('ws'), plain), '{:8.2f}')}"
              f" {fmt(r.get('portable'), '{:9.3f}')} {fmt(ratio(r.get('portable'), plain), '{:8.2f}')}"
              f" {fmt(r.get('sdpa_cudnn'), '{:9.3f}')} {fmt(r.get('sdpa_efficient'), '{:8.3f}')}"
              f" {fmt(ratio(r.get('sdpa_cudnn'), r.get('ws')), '{:9.2f}')}"
              f" {fmt(ratio(r.get('sdpa_efficient'), r.get('ws')), '{:7.2f}')}")
        for s in ("ws", "portable", "sdpa_cudnn", "sdpa_efficient"):
            if r.get(f"{s}_error"):
                print(f"     {s}: {r[f'{s}_error']}")


# ---- the parent --------------------------------------------------------------------------------


def child(part: str, timeout_s: float, extra: list[str]) -> tuple[int, list[dict]]:
    cmd = [sys.executable, __file__, "--part", part, *extra]
    rows: list[dict] = []
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, check=False)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = 124
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    for line in out.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(line)
    if rc not in (0, 1):
        print(f"[{part}] exit status {rc}; stderr tail:\n{err[-3000:]}")
    return rc, rows


def prebuild() -> None:
    """Compile the variants both parts need, in parallel (cold compiles ~2 s each)."""
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np

    from cuflash import _build, _tiles
    from cuflash._interop import BFLOAT16

    limit = _tiles.SMEM_LIMIT["sm_90"]
    variants = set()
    for dtype in (np.dtype(np.float16), BFLOAT16):
        for d in (40, 64, 96, 128, 224, 256):
            for general in (False, True):
                for tma in (False, True):
                    variants.add(_tiles.forward_variant(dtype, d, general, limit, "sm_90", tma=tma, family="ws")[0])
    # the features table's portable kernels (plain and general, bf16, d=128)
    for general in (False, True):
        variants.add(_tiles.forward_variant(BFLOAT16, 128, general, limit)[0])
    with ProcessPoolExecutor(max_workers=min(os.cpu_count() or 4, 16)) as pool:
        list(pool.map(_build.build, sorted(variants, key=lambda v: v.tag), ["sm_90"] * len(variants)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("correctness", "timing", "features"))
    parser.add_argument("--skip-ws", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    dog = Watchdog()
    if args.part == "correctness":
        return run_correctness(dog)
    if args.part == "timing":
        return run_timing(dog, args.skip_ws, args.quick)
    if args.part == "features":
        return run_features(dog)

    t0 = time.time()
    prebuild()
    print(f"prebuilt in {time.time() - t0:.0f} s")
    rc, rows = child("correctness", 80, [])
    bad = [r for r in rows if r.get("status") != "ok"]
    hung = rc in (HANG, 124)
    for r in rows:
        print(("  " if r.get("status") == "ok" else "! ") + json.dumps(r))
    print(f"correctness: {sum(r.get('status') == 'ok' for r in rows)} ok, {len(bad)} not ok"
          + (" (a case hung: timing runs without the family)" if hung else ""))
    extra = (["--skip-ws"] if hung else []) + (["--quick"] if args.quick else [])
    features: list[dict] = []
    if not hung:
        _, features = child("features", 35, [])
    budget = max(175 - (time.time() - t0), 30)
    _, table = child("timing", budget, extra)
    systems = ("ws", "ws_persistent", "sm90", "sdpa_cudnn", "sdpa_flash")
    print("\nbf16 forward, 16k tokens, heads x head_dim = 2048: TFLOP/s and ratios "
          "(ws_pers: the same kernel on one block per SM)")
    print(f"{'d':>4} {'seqlen':>6} {'causal':>6} " + " ".join(f"{s[:10]:>10}" for s in systems)
          + f" {'ws/cudnn':>9} {'pers/cudnn':>10} {'ws/sm90':>8} {'ws/fa2':>7}")

    for r in table:
        if "hang" in r:
            print(f"HANG: {r['hang']}")
            continue
        print(f"{r['d']:>4} {r['seqlen']:>6} {r['causal']!s:>6} " + " ".join(fmt(r.get(s)) for s in systems)
              + " " + fmt(ratio(r.get("ws"), r.get("sdpa_cudnn")), "{:9.2f}")
              + " " + fmt(ratio(r.get("ws_persistent"), r.get("sdpa_cudnn")), "{:10.2f}")
              + " " + fmt(ratio(r.get("ws"), r.get("sm90")), "{:8.2f}")
              + " " + fmt(ratio(r.get("ws"), r.get("sdpa_flash")), "{:7.2f}"))
        for s in systems:
            if r.get(f"{s}_error"):
                print(f"     {s}: {r[f'{s}_error']}")
    print_features(features)
    print(f"total {time.time() - t0:.0f} s")
    return 0 if not bad and not hung else 1


if __name__ == "__main__":
    sys.exit(main())
