"""Benchmark helpers: CUDA-event timing with L2 flushing, rooflines, and the result-file schema."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable

import torch

# Measured on the H100 80GB HBM3 we target (DESIGN.md): device copy bandwidth and dense peaks. The copy
# bandwidth of the GPU a benchmark runs on replaces the nominal one (measured once per run, see copy_bandwidth).
HBM_BYTES_PER_S = 3.02e12
BF16_FLOPS = 802e12
FP8_FLOPS = 1471e12

_measured: dict[str, float] = {}


def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy of 1 GiB on the current GPU (dgemma.bench.copy_bandwidth, the
    roofline of `dgemma bench` too), measured on first use and remembered for the run; the nominal H100 figure
    without a GPU."""
    if "copy_bytes_per_s" not in _measured:
        if not torch.cuda.is_available():
            return HBM_BYTES_PER_S
        from dgemma.bench import copy_bandwidth as measure

        _measured["copy_bytes_per_s"] = measure(torch.device("cuda", torch.cuda.current_device()))[0]
    return _measured["copy_bytes_per_s"]


def bf16_matmul_flops() -> float:
    """FLOP/s of torch's bf16 matmul (cuBLAS) at 8192^3 on the current GPU, the best of 10 calls, measured on first
    use and remembered for the run (the denominator of a kernel's ``flop_share``); the nominal H100 figure without
    a GPU."""
    if "bf16_flops" not in _measured:
        if not torch.cuda.is_available():
            return BF16_FLOPS
        n = 8192
        a = torch.randn(n, n, device="cuda").to(torch.bfloat16)
        b = torch.randn(n, n, device="cuda").to(torch.bfloat16)
        ms = min(time_cuda(lambda: a @ b, warmup=3, iters=10, flush_l2=False))
        _measured["bf16_flops"] = 2 * n**3 / (ms / 1e3)
    return _measured["bf16_flops"]


def roofline_ms(bytes_moved: float = 0.0, flops: float = 0.0, peak_flops: float = BF16_FLOPS) -> float:
    """The larger of the memory time (bytes at this GPU's measured copy bandwidth) and the compute time
    (flops / peak)."""
    return max(bytes_moved / copy_bandwidth(), flops / peak_flops) * 1e3


def time_cuda(fn: Callable[[], object], *, warmup: int = 5, iters: int = 30, flush_l2: bool = True) -> list[float]:
    """Milliseconds per call, one CUDA-event pair per call; the L2 is flushed (a 256 MiB write)
    before each call so weights come from HBM, as in a real step."""
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda") if flush_l2 else None
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def _commit() -> str:
    """DGEMMA_COMMIT when set (a copied working tree's git metadata may lag its files), else git's HEAD."""
    if os.environ.get("DGEMMA_COMMIT"):
        return os.environ["DGEMMA_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("DGEMMA_COMMIT", "unknown")


def write_results(path: str, results: list[dict]) -> None:
    """Write ``{"device", "torch", "cuda", "commit", "command", ..., "kernel_settings", "results"}`` to ``path``."""
    doc = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": _commit(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        # The bandwidth every roofline_ms of this run used (None: no roofline was computed).
        "copy_bandwidth_gb_per_s": round(_measured["copy_bytes_per_s"] / 1e9, 1)
        if "copy_bytes_per_s" in _measured else None,
        # The bf16 matmul rate every flop_share of this run used (None: none was computed).
        "bf16_tflops": round(_measured["bf16_flops"] / 1e12, 1) if "bf16_flops" in _measured else None,
        # Every DGEMMA_* setting of the run (kernel variants are chosen by them, some read once per process).
        "kernel_settings": {k: v for k, v in sorted(os.environ.items()) if k.startswith("DGEMMA_")},
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
    for r in results:
        extra = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                          if k not in ("name", "median_ms", "roofline_ms"))
        print(f"{r['name']:<32} {r.get('median_ms', float('nan')):9.4f} ms | roofline "
              f"{r.get('roofline_ms', float('nan')):8.4f} ms | {extra}")
