"""Timing for benchmarks and reports: the median of CUDA-event timings (on a GPU) or of wall-clock
timings (on the CPU) after a warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], None], warmup: int = 5, iters: int = 20) -> float:
    """Median milliseconds of `iters` calls of `fn`, each timed by CUDA events, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def median_ms_on(device: torch.device, fn: Callable[[], None], warmup: int = 3, iters: int = 10) -> float:
    """`median_ms` where `fn` runs on `device`: CUDA events on a GPU, the wall clock on the CPU."""
    if device.type == "cuda":
        return median_ms(fn, warmup, iters)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
