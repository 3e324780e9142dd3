"""Run the gate: record the launches of every case, compile each distinct one for sm_90a,
judge the rows, and find entry kernels that no case launches.

A row fails on: a compile error; any spill (fp16/bf16 rows only: every case is one);
a ``tl.dot`` kernel whose PTX has no ``wgmma.mma_async``; an attention kernel whose
head-dim tile exceeds ``MAX_PADDING`` times the head dim at head dims 72/80 (sequence
ends are the shape's, not the kernel's); a dot kernel without a work model. Problems listed in known_issues are reported as expected instead.
"""

from __future__ import annotations

import importlib
import pkgutil
import time

import torch

from . import known_issues
from .cases import DTYPES, Case, all_cases
from .fake_cuda import fake_cuda
from .record import Launch, recording
from .sm90 import Compiled, compile_launch
from .work import has_model, head_dim_padding, work_ratio

MAX_PADDING = 1.12  # cuDNN pads 72 to 80: 1.11


def entry_kernels() -> dict[str, object]:
    """Every ``@triton.jit`` entry kernel (``*_kernel``) of mmfast.kernels, by
    ``module.name``; raises when a jit helper is called by no kernel (dead, or an entry
    kernel misnamed)."""
    import mmfast.kernels as pkg
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    kernels, helpers, sources = {}, {}, []
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"mmfast.kernels.{info.name}")
        for name, obj in vars(module).items():
            fn = obj.fn if isinstance(obj, Autotuner) else obj
            if not isinstance(fn, JITFunction) or fn.fn.__module__ != module.__name__:
                continue
            sources.append(fn.src)
            (kernels if name.endswith("_kernel") else helpers)[f"{info.name}.{name}"] = fn
    unused = [h for h in helpers if not any(h.split(".")[1] + "(" in s for s in sources)]
    if unused:
        raise RuntimeError(f"jit functions called by no kernel (dead, or an entry kernel not named *_kernel): {unused}")
    return kernels


def record_case(case: Case, dtype: torch.dtype) -> list[Launch]:
    with fake_cuda(), recording() as launches:
        case.run(dtype)
    for launch in launches:
        launch.case = {"family": case.family, "shape": case.shape, "dtype": str(dtype).removeprefix("torch.")}
    return launches


def _problems(launch: Launch, compiled: Compiled, padding: float | None, dims: dict) -> list[str]:
    if not compiled.ok:
        return ["compile"]
    problems = []
    if compiled.spill_bytes:
        problems.append("spill")
    if compiled.has_dot and not compiled.wgmma:
        problems.append("no_wgmma")
    if compiled.has_dot and not has_model(launch.name):
        problems.append("no_work_model")
    if dims.get("head_dim") in (72, 80) and padding is not None and padding > MAX_PADDING:
        problems.append("padding")
    return problems


def _row(launch: Launch, compiled: Compiled, dims: dict) -> dict:
    ratio = work_ratio(launch, dims) if compiled.ok and compiled.has_dot else None
    padding = head_dim_padding(launch, dims)
    row = {
        "kernel": launch.name, "module": launch.module, **launch.case,
        "constexprs": {k: v for k, v in launch.constexprs.items()},
        "num_warps": launch.options.get("num_warps", 4), "num_stages": launch.options.get("num_stages", 3),
        "autotuned": launch.autotuned, "compiled": compiled.ok, "error": compiled.error or None,
        "regs": compiled.regs, "spill_bytes": compiled.spill_bytes, "shared_bytes": compiled.shared,
        "ctas_per_sm": compiled.ctas_per_sm, "occupancy": round(compiled.occupancy, 3),
        "has_dot": compiled.has_dot, "wgmma": compiled.wgmma, "mma_sync": compiled.mma_sync,
        "issued_over_useful": ratio, "head_dim_padding": padding, "dims": dims,
    }
    row["problems"] = _problems(launch, compiled, padding, dims)
    row["failures"], row["expected"] = known_issues.classify(row, row["problems"])
    return row


def _plan(quick: bool, families: tuple[str, ...]) -> list[tuple[Case, Launch]]:
    """The distinct (case, launch) rows of a run, in a fixed order."""
    cases = [c for c in all_cases() if (c.quick or not quick) and (not families or c.family in families)]
    plan, seen = [], set()
    for case in cases:
        for dtype in case.quick_dtypes if quick else DTYPES:
            for launch in record_case(case, dtype):
                if (case.shape, launch.specialization()) not in seen:
                    seen.add((case.shape, launch.specialization()))
                    plan.append((case, launch))
    return plan


def _compile_share(quick: bool, families: tuple[str, ...], index: int, jobs: int, log=print) -> dict:
    """Compile every ``jobs``-th distinct specialisation of the plan, from ``index``."""
    firsts: dict[tuple, Launch] = {}
    for case, launch in _plan(quick, families):
        firsts.setdefault(launch.specialization(), launch)
    compiled = {}
    for key in list(firsts)[index::jobs]:
        launch = firsts[key]
        c = compiled[key] = compile_launch(launch)
        log(f"  {c.seconds:5.1f}s {launch.module}.{launch.name} {launch.case['shape']} {launch.case['dtype']} "
            f"{'ok' if c.ok else 'COMPILE ERROR'} regs={c.regs} spill={c.spill_bytes} smem={c.shared} wgmma={c.wgmma}")
    return compiled


def _print(line: str) -> None:
    print(line, flush=True)


def run(quick: bool, families: tuple[str, ...] = (), jobs: int = 1, log=print) -> dict:
    """Compile the quick subset or every case (of ``families`` only, when given), in
    ``jobs`` processes; returns rows, failures, and the entry kernels no case launched
    (only without ``families``)."""
    start = time.perf_counter()
    plan = _plan(quick, families)
    if jobs <= 1:
        compiled = _compile_share(quick, families, 0, 1, log)
    else:
        import concurrent.futures
        import multiprocessing

        compiled = {}
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for share in pool.map(_compile_share, [quick] * jobs, [families] * jobs, range(jobs), [jobs] * jobs,
                                  [_print] * jobs):
                compiled.update(share)
    rows = [_row(launch, compiled[launch.specialization()], case.dims) for case, launch in plan]
    launched = {f"{r['module']}.{r['kernel']}" for r in rows}
    uncovered = [] if families else sorted(set(entry_kernels()) - launched)
    stale = known_issues.stale_entries(rows)
    return {
        "rows": rows, "uncovered": uncovered, "stale": [f"{s.kernel}: {s.check} {s.when}" for s in stale],
        "failures": [r for r in rows if r["failures"]], "compiles": len(compiled),
        "seconds": round(time.perf_counter() - start, 1),
    }
