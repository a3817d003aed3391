"""Timing shared by the benchmarks: the best of a few runs, after one warm-up call."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_time(fn: Callable[[], object], repeats: int = 3, warmup: bool = True) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn`` (the least disturbed by other work)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
