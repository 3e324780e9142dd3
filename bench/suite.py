"""The plug-in types of the benchmark harness: a Suite is a list of Cases and Providers.

A new suite is one file under bench/suites/ that builds a ``Suite`` and one line in the
registry (bench/suites/__init__.py). The harness does the rest: input rotation, timing,
peaks, rows, tables, plots, comparison and the pytest-benchmark parametrisation.

    SUITE = Suite(
        name="gelu", bound="memory",
        cases=lambda quick, device: [Case("4096x8192", {"rows": 4096, "hidden": 8192},
                                          make_inputs=..., bytes=...)],
        providers=(Provider("torch-eager", build=lambda case: lambda inp: F.gelu(inp)),),
        plot_x="hidden",
    )

``make_inputs(device)`` returns one fresh set of inputs (any nesting of dicts, lists,
tuples and dataclasses holding tensors); ``build(case)`` returns the callable that is
timed, taking one such set. Building happens outside the timed region, and the first
call (compilation, autotuning) is a warm-up that is never timed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch


@dataclass(frozen=True)
class Case:
    """One problem: a shape, a dtype, a pass. ``name`` is the key runs are compared by,
    so keep it stable across versions; ``params`` are saved with every row and used by
    plots. Give ``bytes`` (that must move per call) for memory-bound suites and ``flops``
    (useful, per call) for compute-bound ones; either gives a throughput column."""

    name: str
    params: dict[str, Any]
    make_inputs: Callable[[torch.device], Any]
    bytes: int | None = None
    flops: int | None = None


def cpu_compile_skip(device: torch.device) -> str | None:
    """Why a torch.compile provider is skipped on a CPU (it builds C++ for every case),
    unless MMFAST_BENCH_CPU_COMPILE=1; None on a GPU."""
    if device.type == "cpu" and os.environ.get("MMFAST_BENCH_CPU_COMPILE", "0") in ("", "0"):
        return ("torch.compile on CPU builds C++ for every case (~15 s each); "
                "set MMFAST_BENCH_CPU_COMPILE=1 to include it")
    return None


def backend_skip(family: str, backend: str, device: torch.device, dtype: torch.dtype, **call) -> str | None:
    """Why mmfast's ``backend`` of op ``family`` cannot take a case (its own reasons,
    joined), or None. ``call``: the other fields of :class:`mmfast.dispatch.Call`."""
    import mmfast.ops  # noqa: F401  (registers every op family's backends)
    from mmfast.dispatch import Call, op_family

    reasons = op_family(family).backends[backend].reasons(Call(device=device, dtype=dtype, **call))
    return "; ".join(reasons) or None


def gpu_library_skip(module: str, device: torch.device, what: str) -> str | None:
    """Why a third-party CUDA library's provider is skipped: ``module`` (a dotted path
    may name a submodule) not importable, or no CUDA device; None when it can run."""
    from mmfast.dispatch import module_available

    if not module_available(module):
        return f"{what} is not installed"
    if device.type != "cuda":
        return f"{what} runs on CUDA only"
    return None


def _always(case: Case, device: torch.device) -> str | None:
    return None


@dataclass(frozen=True)
class Provider:
    """One implementation under test (ours or a baseline).

    ``skip(case, device)`` returns why the provider cannot run that case here (library
    missing, no GPU, shape unsupported), or None; the reason is printed, never hidden.
    """

    name: str
    build: Callable[[Case], Callable[[Any], Any]]
    skip: Callable[[Case, torch.device], str | None] = _always


@dataclass(frozen=True)
class Target:
    """A performance goal checked on GPU runs: ``provider`` rows must reach ``min_frac``
    of the measured device peak (copy bandwidth or matmul throughput, per the suite's
    bound). ``text`` says where the goal comes from."""

    provider: str
    min_frac: float
    text: str


def _where_holds(where: dict[str, Any], params: dict[str, Any]) -> bool:
    """Every key of ``where`` has its value in ``params`` (a tuple value: any of its items)."""
    return all(params.get(key) in value if isinstance(value, tuple) else params.get(key) == value
               for key, value in where.items())


@dataclass(frozen=True)
class Speedup:
    """A goal relative to baselines measured in the same run: in every case whose params
    hold all of ``where`` (every case when empty; a tuple value means any of its items),
    ``provider`` must be at least
    ``min_ratio`` times faster than the fastest of ``baselines`` that ran there. Checked
    on GPU runs only; ``text`` says where the goal comes from. ``metric`` is the row
    column compared, lower being better: "ms" (time) or "peak_mem_mb" (peak memory)."""

    provider: str
    baselines: tuple[str, ...]
    min_ratio: float
    text: str
    where: dict[str, Any] = field(default_factory=dict)
    metric: str = "ms"

    def applies_to(self, params: dict[str, Any]) -> bool:
        return _where_holds(self.where, params)


@dataclass(frozen=True)
class Latency:
    """An absolute goal: in every case whose params hold all of ``where`` (as for
    :class:`Speedup`), ``provider`` takes at most ``max_ms`` per call. Checked on GPU runs
    only, by reading the numbers against it (never asserted); ``text`` says where the
    goal comes from (e.g. a whole-pipeline time divided by its number of steps)."""

    provider: str
    max_ms: float
    text: str
    where: dict[str, Any] = field(default_factory=dict)

    def applies_to(self, params: dict[str, Any]) -> bool:
        return _where_holds(self.where, params)


@dataclass(frozen=True)
class Suite:
    """Cases x providers, run side by side in one process.

    ``bound`` picks the peak the fraction is taken of: "memory" (measured copy GB/s) or
    "compute" (measured bf16 matmul TFLOP/s). ``plot_x`` is the case parameter on the x
    axis of the plots; ``plot_panels`` the parameters that split them into panels.
    """

    name: str
    description: str
    bound: Literal["memory", "compute"]
    cases: Callable[[bool, torch.device], list[Case]]
    providers: tuple[Provider, ...]
    plot_x: str
    plot_panels: tuple[str, ...] = ()
    targets: tuple[Target, ...] = field(default_factory=tuple)
    speedups: tuple[Speedup, ...] = field(default_factory=tuple)
    latencies: tuple[Latency, ...] = field(default_factory=tuple)

    def provider(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(f"suite '{self.name}' has no provider '{name}'")
