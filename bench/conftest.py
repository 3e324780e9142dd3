"""pytest setup for the suites under pytest-benchmark (``pytest bench/``; the project's
testpaths name only tests/, so bench/ runs only when asked for).

Every benchmark here gets a timer that synchronises the GPU before reading
``time.perf_counter`` (otherwise it would time kernel launches, not kernels), unless
--benchmark-timer is given. Without a GPU, rounds are few and short unless
--benchmark-max-time / --benchmark-min-rounds are given: the CPU run is a smoke test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CPU_MAX_TIME_S, CPU_MIN_ROUNDS = 0.05, 3


def pytest_addoption(parser):
    parser.getgroup("mmfast bench").addoption(
        "--bench-quick", action="store_true",
        help="run each suite's --quick cases (always the case without a GPU)",
    )


def _given(config, flag: str) -> bool:
    args = [*config.invocation_params.args, *os.environ.get("PYTEST_ADDOPTS", "").split()]
    return any(a == flag or a.startswith(flag + "=") for a in map(str, args))


def pytest_collection_modifyitems(config, items):
    # The marker needs pytest-benchmark (and --strict-markers rejects it without).
    if not config.pluginmanager.hasplugin("benchmark"):
        return
    import torch

    from mmfast.bench.harness import synchronized_perf_counter

    defaults = {}
    if not _given(config, "--benchmark-timer"):
        defaults["timer"] = synchronized_perf_counter
    if not torch.cuda.is_available():
        if not _given(config, "--benchmark-max-time"):
            defaults["max_time"] = CPU_MAX_TIME_S
        if not _given(config, "--benchmark-min-rounds"):
            defaults["min_rounds"] = CPU_MIN_ROUNDS
    if not defaults:
        return
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()) and Path(item.path).resolve().is_relative_to(HERE):
            item.add_marker(pytest.mark.benchmark(**defaults))
