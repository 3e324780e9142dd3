"""Timing, peak memory, per-op profiles and the record of which mmfast backends ran.

GPU timings bracket each run with ``torch.cuda.synchronize``; on a CPU ``perf_counter``
alone is exact (nothing runs asynchronously).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Callable

import torch


@contextlib.contextmanager
def building_on(device: torch.device, dtype: torch.dtype):
    """Modules built inside are created on ``device`` in ``dtype``: a random-weight model of
    billions of parameters is initialised there, never as a float32 copy in host memory."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], object], device: torch.device, repeats: int, progress=None) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` (warm it up before)."""
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        if progress is not None:
            progress.update(1)
    return statistics.median(seconds)


@contextlib.contextmanager
def peak_memory(device: torch.device, into: dict, weights_bytes: int):
    """Records into ``into["peak_memory_gib"]`` the peak CUDA memory one side needs: its
    weights plus the most allocated beyond what was allocated before the block (both sides'
    weights stay resident, so the raw allocator peak would count the other side's too).
    None on a CPU: torch keeps no allocator statistics there."""
    if device.type != "cuda":
        into["peak_memory_gib"] = None
        yield
        return
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    yield
    synchronize(device)
    extra = torch.cuda.max_memory_allocated(device) - before
    into["peak_memory_gib"] = (weights_bytes + extra) / 2**30


def op_breakdown(fn: Callable[[], object], device: torch.device, top: int, trace_path: str | None = None) -> list[dict]:
    """The ``top`` ops/kernels of one call of ``fn`` by self time (device time on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    if trace_path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(trace_path)), exist_ok=True)
        prof.export_chrome_trace(trace_path)
    on_gpu = device.type == "cuda"
    rows = []
    for event in prof.key_averages():
        self_us = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        if self_us > 0:
            rows.append({"name": event.key, "self_ms": self_us / 1e3, "calls": event.count})
    rows.sort(key=lambda row: row["self_ms"], reverse=True)
    return rows[:top]


@contextlib.contextmanager
def record_backends(into: set):
    """Adds (op family, backend) to ``into`` for every dispatch decision inside the block."""
    from mmfast import dispatch

    original = dispatch._log_choice

    def log_and_record(op, backend, call):
        into.add((op, backend))
        original(op, backend, call)

    dispatch._log_choice = log_and_record
    try:
        yield
    finally:
        dispatch._log_choice = original
