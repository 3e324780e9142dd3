"""Timing, peak memory, per-op profiles and the record of which mmfast backends ran.

Timing follows a :class:`Plan`: warm-up, then rounds that call every side once in turn
(interleaved, A B A B ...) until the spread is small or the time budget is spent.
GPU timings bracket each call with ``torch.cuda.synchronize``; on a CPU ``perf_counter``
alone is exact (nothing runs asynchronously).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from mmfast.profile.stats import relative_spread


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


@dataclass(frozen=True)
class Plan:
    """How long to measure: ``warmup`` untimed rounds, then timed rounds until every
    figure of every side has a relative spread (interquartile range over median) of at most
    ``target_spread`` or the timed rounds have taken ``budget_s`` seconds, but never fewer
    than ``min_repeats`` nor more than ``max_repeats`` rounds."""
    warmup: int
    min_repeats: int
    max_repeats: int
    budget_s: float
    target_spread: float

    def __post_init__(self):
        if self.warmup < 0:
            raise ValueError(f"warmup: expected 0 or more rounds, got {self.warmup}")
        if not 1 <= self.min_repeats <= self.max_repeats:
            raise ValueError(f"min_repeats, max_repeats: expected 1 <= min_repeats <= max_repeats, "
                             f"got {self.min_repeats} and {self.max_repeats}")
        if not self.budget_s > 0:
            raise ValueError(f"budget_s: expected a positive number of seconds, got {self.budget_s}")
        if not self.target_spread >= 0:
            raise ValueError(f"target_spread: expected a fraction >= 0, got {self.target_spread}")


@dataclass
class Measurement:
    """Per side, each named quantity's samples in round order; how many rounds ran and why
    they stopped ("spread", "budget" or "max_repeats")."""
    samples: list[dict[str, list[float]]]
    rounds: int
    stopped: str
    seconds: float  # wall time of the timed rounds


def interleaved(samplers: Sequence[Callable[[], dict[str, float]]], plan: Plan, clock=time.perf_counter,
                progress=None) -> Measurement:
    """Run ``plan``: each round calls every sampler once, in order (A B A B ...), so that
    drift of the machine (clock, temperature, other processes) hits every side alike. A
    sampler takes one timed sample of its side: {quantity: seconds}."""
    for _ in range(plan.warmup):
        for sample in samplers:
            sample()
        if progress is not None:
            progress.update(1)
    samples: list[dict[str, list[float]]] = [{} for _ in samplers]
    start = clock()
    rounds = 0
    while True:
        for sample, into in zip(samplers, samples):
            for name, seconds in sample().items():
                into.setdefault(name, []).append(seconds)
        rounds += 1
        if progress is not None:
            progress.update(1)
        stopped = _stop(plan, rounds, clock() - start, samples)
        if stopped:
            return Measurement(samples, rounds, stopped, clock() - start)


def _stop(plan: Plan, rounds: int, elapsed: float, samples: list[dict[str, list[float]]]) -> str | None:
    if rounds >= plan.max_repeats:
        return "max_repeats"
    if rounds < plan.min_repeats:
        return None
    if all(relative_spread(values) <= plan.target_spread for side in samples for values in side.values()):
        return "spread"
    return "budget" if elapsed >= plan.budget_s else None


def timed(call: Callable[[Callable[[str], None]], object], device: torch.device,
          clock=time.perf_counter) -> dict[str, float]:
    """Seconds of one ``call(mark)``: ``"total"``, and for each name the call passed to
    ``mark`` the seconds from the start to its first mark (the device synchronized there).
    Every mark lies inside the call, so a mark is never later than the total."""
    marks: dict[str, float] = {}

    def mark(name: str) -> None:
        if name not in marks:
            synchronize(device)
            marks[name] = clock()

    synchronize(device)
    start = clock()
    call(mark)
    synchronize(device)
    end = clock()
    return {**{name: at - start for name, at in marks.items()}, "total": end - start}


@contextlib.contextmanager
def on_first_call(module: torch.nn.Module, callback: Callable[[], None] | None, before: bool = False):
    """Calls ``callback`` once, at the first forward of ``module`` inside the block: after it
    (or ``before`` it). Later calls, e.g. while a CUDA graph is captured, pass untouched."""
    if callback is None:
        yield
        return
    fired = False

    def hook(*_):
        nonlocal fired
        if not fired:
            fired = True
            callback()

    handle = module.register_forward_pre_hook(hook) if before else module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def peak_memory_gib(fn: Callable[[], object], device: torch.device, weights_bytes: int) -> float | None:
    """The peak CUDA memory (GiB) one call of ``fn`` needs: its weights plus the most
    allocated beyond what was allocated before (both sides' weights stay resident, so the
    raw allocator peak would count the other side's too). None on a CPU, without calling
    ``fn``: torch keeps no allocator statistics there."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (weights_bytes + torch.cuda.max_memory_allocated(device) - before) / 2**30


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
