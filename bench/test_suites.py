"""Every suite under pytest-benchmark: one test per suite x case x provider.

    pytest bench/ --benchmark-json=out.json            # GPU: the full cases
    pytest bench/ --bench-quick -k "norm and triton"   # a subset

Each test times the same warmed-up callable, cycling through rotating input copies, that
``mmfast bench`` times with CUDA events; here pytest-benchmark times rounds with a
GPU-synchronised timer (bench/conftest.py), so launch overhead is included. Throughput
and the fraction of the measured peak go to each benchmark's extra_info.
"""

from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")

from mmfast.bench import harness, suites  # noqa: E402
from mmfast.bench.env import default_device, detect_env  # noqa: E402

DEVICE = default_device()


def pytest_generate_tests(metafunc):
    if "bench_item" not in metafunc.fixturenames:
        return
    quick = DEVICE.type != "cuda" or metafunc.config.getoption("bench_quick", default=False)
    params = []
    for name in suites.names():
        suite = suites.get(name)
        for case in suite.cases(quick, DEVICE):
            for provider in suite.providers:
                params.append(pytest.param((suite, case, provider),
                                           id=f"{name}-{case.name}-{provider.name}"))
    metafunc.parametrize("bench_item", params)


@pytest.fixture(scope="session")
def bench_env():
    return detect_env(DEVICE)


@pytest.fixture(scope="session")
def bench_peaks(bench_env):
    return harness.measure_peaks(bench_env, quick=True)


def test_bench(benchmark, bench_item, bench_env, bench_peaks):
    suite, case, provider = bench_item
    reason = provider.skip(case, bench_env.device)
    if reason:
        pytest.skip(reason)
    prepared = harness.prepare(case, provider, bench_env)
    benchmark.group = f"{suite.name}: {case.name}"
    benchmark.extra_info.update(
        suite=suite.name, case=case.name, provider=provider.name, params=case.params,
        bytes=case.bytes, flops=case.flops, gpu=bench_env.gpu, smoke=not bench_env.is_gpu,
        input_copies=prepared.copies,
    )
    benchmark(prepared.call)
    if benchmark.stats is None:  # --benchmark-disable: the call ran once, untimed
        return
    ms = benchmark.stats.stats.median * 1e3
    tflops, gbps = harness.throughput(case, ms)
    achieved = gbps if suite.bound == "memory" else tflops
    benchmark.extra_info.update(
        ms=ms, tflops=tflops, gbps=gbps,
        frac_of_peak=achieved / bench_peaks.of(suite.bound) if achieved is not None else None,
    )
