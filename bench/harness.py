"""Timing, device peaks and result rows: what every suite shares.

On a GPU, times come from CUDA events through ``triton.testing.do_bench`` (warm-up, then
the 20th/50th/80th percentiles of many calls, L2 flushed before each call), and each
call takes the next of several copies of its inputs, enough to exceed twice the L2
size, so back-to-back calls never find their inputs in L2 (this also protects the
pytest-benchmark path, which flushes nothing). Without a GPU a smoke mode times a few
calls with ``time.perf_counter``: those numbers say nothing about any GPU.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from mmfast.bench.env import Env, now_iso
from mmfast.bench.suite import Case, Provider, Suite

QUANTILES = (0.2, 0.5, 0.8)
# do_bench budgets, in milliseconds of GPU time per measurement.
GPU_WARMUP_MS, GPU_REP_MS = 25, 100
# Rotation stops at this many copies or this share of free device memory, whichever
# comes first: big cases exceed L2 with one copy anyway. On a CPU a few copies only
# exercise the code (the interpreter is slow enough per call).
MAX_COPIES, CPU_MAX_COPIES = 64, 4
MEMORY_SHARE = 0.25
# CPU smoke mode: a few calls, and at most about this long per case.
CPU_REPEATS, CPU_REPEATS_QUICK, CPU_BUDGET_S = 10, 3, 1.0
# Sizes of the peak measurements.
GPU_MATMUL_N, CPU_MATMUL_N = 8192, 512
GPU_COPY_MIN_BYTES, CPU_COPY_BYTES = 1 << 30, 16 << 20


# ---- inputs ----------------------------------------------------------------------


def tensors_in(obj: Any):
    """Every tensor in a nesting of dicts, lists, tuples and dataclasses."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from tensors_in(getattr(obj, f.name))


def tensor_bytes(obj: Any) -> int:
    seen, total = set(), 0
    for t in tensors_in(obj):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


def rotating_inputs(case: Case, env: Env) -> list:
    """Enough independent input sets that cycling through them exceeds 2x the L2 size."""
    first = case.make_inputs(env.device)
    size = max(1, tensor_bytes(first))
    want = math.ceil(2 * env.l2_bytes / size)
    if env.is_gpu:
        free, _ = torch.cuda.mem_get_info(env.device)
        want = min(want, int(free * MEMORY_SHARE) // size)
    copies = max(1, min(want, MAX_COPIES if env.is_gpu else CPU_MAX_COPIES))
    return [first] + [case.make_inputs(env.device) for _ in range(copies - 1)]


@dataclass
class Prepared:
    """A warmed-up, argument-free callable that cycles through its input copies."""

    call: Callable[[], Any]
    copies: int
    bytes_per_copy: int


def prepare(case: Case, provider: Provider, env: Env) -> Prepared:
    fn = provider.build(case)
    inputs = rotating_inputs(case, env)
    cycle = itertools.cycle(inputs)

    def call():
        return fn(next(cycle))

    # The first call compiles / autotunes / JITs: a warm-up that is never timed.
    call()
    synchronize(env.device)
    return Prepared(call, len(inputs), tensor_bytes(inputs[0]))


# ---- timing ----------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized_perf_counter() -> float:
    """``time.perf_counter`` after waiting for the GPU: the timer for pytest-benchmark.

    Without the synchronisation a timer would measure kernel launches, not kernels.
    CUDA is synchronised only if this process already initialised it (a cheap check,
    and a no-op on CPU), since pytest-benchmark calls its timer many times to calibrate.
    """
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


@dataclass(frozen=True)
class Timing:
    ms: float  # median
    ms_p20: float
    ms_p80: float


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (the method torch.quantile uses)."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_gpu(call: Callable[[], Any]) -> Timing:
    from triton.testing import do_bench

    p20, p50, p80 = do_bench(call, warmup=GPU_WARMUP_MS, rep=GPU_REP_MS, quantiles=list(QUANTILES))
    return Timing(p50, p20, p80)


def time_cpu(call: Callable[[], Any], repeats: int, budget_s: float = CPU_BUDGET_S) -> Timing:
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats:
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        times.append((t1 - t0) * 1e3)
        # Slow calls (the Triton interpreter) get fewer repeats, but at least three.
        if len(times) >= 3 and t1 - start > budget_s:
            break
    times.sort()
    return Timing(*(quantile(times, q) for q in (0.5, 0.2, 0.8)))


def time_call(call: Callable[[], Any], env: Env, quick: bool) -> Timing:
    if env.is_gpu:
        return time_gpu(call)
    return time_cpu(call, CPU_REPEATS_QUICK if quick else CPU_REPEATS)


def peak_memory_mb(call: Callable[[], Any], env: Env) -> float | None:
    """Device memory one call allocates at its peak, above what was allocated before it
    (inputs excluded; outputs, saved activations and workspaces included). MiB."""
    if not env.is_gpu:
        return None
    synchronize(env.device)
    torch.cuda.reset_peak_memory_stats(env.device)
    base = torch.cuda.memory_allocated(env.device)
    out = call()
    synchronize(env.device)
    peak = torch.cuda.max_memory_allocated(env.device) - base
    del out
    return peak / 2**20


# ---- device peaks ----------------------------------------------------------------


@dataclass(frozen=True)
class Peaks:
    tflops: float  # dense matmul (bf16 on GPU, fp32 on CPU)
    gbps: float  # device-to-device copy, read + write
    rows: tuple[dict, ...]  # as saved under the suite name "peaks"

    def of(self, bound: str) -> float:
        return self.gbps if bound == "memory" else self.tflops


def _time_matmul(n: int, dtype: torch.dtype, env: Env, quick: bool) -> Timing:
    a, b, c = (torch.randn(n, n, device=env.device, dtype=dtype) for _ in range(3))
    torch.mm(a, b, out=c)
    synchronize(env.device)
    return time_call(lambda: torch.mm(a, b, out=c), env, quick)


def _time_copy(nbytes: int, env: Env, quick: bool) -> Timing:
    src = torch.randint(0, 255, (nbytes,), device=env.device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(env.device)
    return time_call(lambda: dst.copy_(src), env, quick)


def measure_peaks(env: Env, quick: bool = False) -> Peaks:
    """Measure what the device reaches on a large matmul and a large copy, once per run.

    Fractions of these measured peaks, not of datasheet numbers, are what the suites
    report: they are reachable on this very device, clocks and driver included.
    """
    if env.is_gpu:
        n, dtype, nbytes = GPU_MATMUL_N, torch.bfloat16, max(GPU_COPY_MIN_BYTES, 8 * env.l2_bytes)
    else:
        n, dtype, nbytes = CPU_MATMUL_N, torch.float32, CPU_COPY_BYTES
    mm = _time_matmul(n, dtype, env, quick)
    cp = _time_copy(nbytes, env, quick)
    if env.is_gpu:
        torch.cuda.empty_cache()
    tflops = 2 * n**3 / (mm.ms * 1e-3) / 1e12
    gbps = 2 * nbytes / (cp.ms * 1e-3) / 1e9
    dt = str(dtype).removeprefix("torch.")
    rows = (
        make_row("peaks", f"matmul-{dt}-{n}^3", "torch", {"n": n, "dtype": dt}, mm,
                 env, quick, tflops=tflops),
        make_row("peaks", f"copy-{nbytes >> 20}MiB", "torch", {"bytes": nbytes}, cp,
                 env, quick, gbps=gbps),
    )
    return Peaks(tflops, gbps, rows)


# ---- rows ------------------------------------------------------------------------

ROW_FIELDS = (
    "suite", "case", "provider", "params", "ms", "ms_p20", "ms_p80", "tflops", "gbps",
    "frac_of_peak", "peak_mem_mb", "gpu", "device", "torch", "triton", "commit", "time",
    "run_id", "quick", "smoke",
)


def throughput(case: Case, ms: float) -> tuple[float | None, float | None]:
    """(TFLOP/s, GB/s) of a case at ``ms`` per call; None where the case gives no count."""
    seconds = ms * 1e-3
    tflops = case.flops / seconds / 1e12 if case.flops else None
    gbps = case.bytes / seconds / 1e9 if case.bytes else None
    return tflops, gbps


def make_row(suite: str, case: str, provider: str, params: dict, timing: Timing, env: Env,
             quick: bool, *, tflops=None, gbps=None, frac=None, peak_mem_mb=None) -> dict:
    row = {
        "suite": suite, "case": case, "provider": provider, "params": params,
        "ms": timing.ms, "ms_p20": timing.ms_p20, "ms_p80": timing.ms_p80,
        "tflops": tflops, "gbps": gbps, "frac_of_peak": frac, "peak_mem_mb": peak_mem_mb,
        "gpu": env.gpu, "device": env.device.type, "torch": env.torch_version,
        "triton": env.triton_version, "commit": env.commit, "time": now_iso(),
        "run_id": env.run_id, "quick": quick, "smoke": not env.is_gpu,
    }
    assert tuple(row) == ROW_FIELDS
    return row


def run_case(suite: Suite, case: Case, provider: Provider, env: Env, peaks: Peaks | None,
             quick: bool) -> dict:
    """Time one provider on one case and return its result row."""
    prepared = prepare(case, provider, env)
    timing = time_call(prepared.call, env, quick)
    mem = peak_memory_mb(prepared.call, env)
    del prepared
    if env.is_gpu:
        torch.cuda.empty_cache()  # the next case may be large
    tflops, gbps = throughput(case, timing.ms)
    achieved = gbps if suite.bound == "memory" else tflops
    frac = achieved / peaks.of(suite.bound) if peaks and achieved is not None else None
    return make_row(suite.name, case.name, provider.name, case.params, timing, env, quick,
                    tflops=tflops, gbps=gbps, frac=frac, peak_mem_mb=mem)
