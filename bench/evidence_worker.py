"""The child process of the GPU evidence run: runs a list of items and reports each one.

The orchestrator (:mod:`mmfast.bench.evidence`) starts one worker per stage with the
items still to do, and kills it when an item or the stage runs past its time; it is the
only writer of the result files. A worker reports on a private copy of its stdout taken
before anything else runs (pytest's capture redirects fd 1 later), one line per event::

    @@evidence {"event": "hello", ...}            device and versions, once
    @@evidence {"event": "start", "item": ID}
    @@evidence {"event": "row", "item": ID, "row": {...}}   a test's outcome, as it finishes
    @@evidence {"event": "done", "item": ID, "status": ..., "reason": ..., "rows": [...]}
    @@evidence {"event": "restart", "item": ID or null, "reason": ...}   CUDA context broken:
        the worker exits; a new one takes the rest (and the item ID, if unfinished)

Everything else it prints goes to the log. Environment (set by the orchestrator before
this module is imported): MMFAST_POISON_OUTPUTS=1 for the checks, TRITON_INTERPRET=1 in
the CPU dry run; MMFAST_EVIDENCE_FAKE_TIMING=1 replaces GPU timing by a constant.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

PREFIX = "@@evidence "
_events = None


def emit(event: str, **fields: Any) -> None:
    global _events
    if _events is None:
        _events = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    _events.write(PREFIX + json.dumps({"event": event, **fields}, default=str) + "\n")
    _events.flush()


# ---- one item of each kind -----------------------------------------------------------


def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def run_check(params: dict, size: str) -> tuple[str, list[dict]]:
    import torch

    from mmfast.bench.evidence_checks import run_check as check, spec

    s = spec(params["spec"])
    device = _device()
    if s.needs_cuda_build and device.type != "cuda":
        return "skipped", [{"check": s.name, "family": s.family, "backend": s.backend, "dtype": params["dtype"],
                            "status": "skipped", "reason": "no CUDA device: the CUDA C++ path cannot run"}]
    if s.needs_cuda_build:
        from mmfast.cuda import build

        start = time.perf_counter()
        if not build.load(device):  # waits for the background build (cpp_extension's lock)
            return "error", [{"check": s.name, "family": s.family, "backend": s.backend, "dtype": params["dtype"],
                              "status": "error", "error": f"CUDA C++ path unavailable: "
                              f"{build.unavailable_reason(device)}"}]
        waited = time.perf_counter() - start
        if waited > 1:
            print(f"{s.name}: waited {waited:.1f} s for the CUDA C++ library")
    row = check(s, size, getattr(torch, params["dtype"]), device)
    return row["status"], [row]


class BenchContext:
    """What every bench item of one worker shares: the environment and the device peaks
    (read from the rows recorded so far, so that fractions of peak are reported)."""

    def __init__(self, out: Path, commit: str, quick: bool):
        import dataclasses

        from mmfast.bench.env import detect_env

        env = detect_env()
        self.env = dataclasses.replace(env, commit=commit if env.commit == "unknown" else env.commit)
        self.out, self.quick, self._peaks, self._suites = out, quick, None, {}

    def peaks(self):
        from mmfast.bench.harness import Peaks

        if self._peaks is None:
            rows = [r for r in _read_jsonl(self.out / "bench.jsonl")
                    if r.get("suite") == "peaks" and r.get("gpu") == self.env.gpu and r.get("ms")]
            matmul = [r for r in rows if r["case"].startswith("matmul")]
            copy = [r for r in rows if r["case"].startswith("copy")]
            if matmul and copy:
                self._peaks = Peaks(matmul[-1]["tflops"], copy[-1]["gbps"], ())
        return self._peaks

    def suite(self, name: str):
        from mmfast.bench import suites

        if name not in self._suites:
            self._suites[name] = suites.get(name)
        return self._suites[name]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def run_peaks(ctx: BenchContext) -> tuple[str, list[dict]]:
    from mmfast.bench.harness import measure_peaks

    peaks = measure_peaks(ctx.env, ctx.quick)
    ctx._peaks = peaks
    return "ok", [dict(r) for r in peaks.rows]


def run_bench(params: dict, ctx: BenchContext) -> tuple[str, list[dict]]:
    from mmfast.bench.harness import run_case

    suite = ctx.suite(params["suite"])
    cases = {c.name: c for c in suite.cases(ctx.quick, ctx.env.device)}
    case = cases.get(params["case"])
    if case is None:
        raise KeyError(f"suite '{suite.name}' has no case '{params['case']}' here")
    provider = suite.provider(params["provider"])
    reason = provider.skip(case, ctx.env.device)
    if reason:
        return "skipped", [{"suite": suite.name, "case": case.name, "provider": provider.name,
                            "status": "skipped", "reason": reason}]
    row = run_case(suite, case, provider, ctx.env, ctx.peaks(), ctx.quick)
    return "ok", [row]


def run_cuda_build() -> tuple[str, list[dict]]:
    """Build (or find in the cache) the CUDA C++ library; the checks that need it wait."""
    from mmfast.cuda import build

    device = _device()
    if build.load(device):
        return "ok", []
    return "error", [{"status": "error", "error": f"CUDA C++ path unavailable: {build.unavailable_reason(device)}"}]


def run_tests(params: dict, out: Path) -> tuple[str, list[dict]]:
    """pytest in this process; the plugin reports every test as it finishes."""
    import pytest

    from mmfast.bench import evidence_pytest

    plugin = evidence_pytest.Recorder(emit, evidence_pytest.recorded_node_ids(out / "tests.jsonl"), cuda_broken)
    # A module that cannot be imported here (diffusers is not on the GPU machines) must
    # not stop the others.
    args = [*params["paths"], "-m", params["marker"], "-q", "-rfEs", "-p", "no:cacheprovider", "--durations=10",
            "--continue-on-collection-errors"]
    code = pytest.main(args, plugins=[plugin])
    if plugin.broken:
        raise ContextBroken(plugin.broken)
    # 0: all passed, 1: some failed, 5: nothing collected (all recorded already): complete.
    status = "ok" if code in (0, 5) else "fail" if code == 1 else "error"
    return status, [{"exit_code": int(code), **plugin.counts}]


# ---- the loop ------------------------------------------------------------------------


def _fake_timing() -> None:
    """CPU dry run: one real call per provider (the warm-up), a constant for the time."""
    from mmfast.bench import harness

    harness.time_call = lambda call, env, quick: harness.Timing(1.0, 0.9, 1.1)
    harness.peak_memory_mb = lambda call, env: None


# Exit code of a worker that stops because its CUDA context is unusable.
RESTART_CODE = 3


class ContextBroken(Exception):
    """The CUDA context of this process cannot be used any more (an illegal address or
    a device-side assert is sticky): every later item would fail for that alone."""


def cuda_broken() -> str | None:
    """Why this process's CUDA context is unusable, or None (also without CUDA)."""
    import torch

    if not torch.cuda.is_initialized():
        return None
    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).item()
    except Exception as e:  # noqa: BLE001  (whatever the driver says)
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    return None


def main(plan_path: str) -> int:
    plan = json.loads(Path(plan_path).read_text())
    import torch

    device = _device()
    emit("hello", device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
         torch=torch.__version__, cuda=torch.version.cuda, pid=os.getpid())
    if os.environ.get("MMFAST_EVIDENCE_FAKE_TIMING", "0") == "1":
        _fake_timing()
    out = Path(plan["out"])
    ctx = None
    for item in plan["items"]:
        emit("start", item=item["id"])
        start = time.perf_counter()
        kind, params = item["kind"], item["params"]
        try:
            if kind == "check":
                status, rows = run_check(params, plan["size"])
            elif kind in ("peaks", "bench"):
                ctx = ctx or BenchContext(out, plan["commit"], plan["quick"])
                status, rows = run_peaks(ctx) if kind == "peaks" else run_bench(params, ctx)
            elif kind == "cuda_build":
                status, rows = run_cuda_build()
            elif kind == "tests":
                status, rows = run_tests(params, out)
            else:
                raise ValueError(f"unknown item kind '{kind}'")
            reason = next((r.get("reason") or r.get("error") for r in rows if r.get("status") == status != "ok"), None)
        except ContextBroken as e:  # mid-item (pytest stopped): the item goes on in a new worker
            emit("restart", item=item["id"], reason=str(e))
            return RESTART_CODE
        except Exception as e:  # recorded, and the worker goes on with the next item
            import traceback

            traceback.print_exc()
            status, reason = "error", f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
            rows = []
        broken = cuda_broken()
        if device.type == "cuda" and not broken:
            torch.cuda.empty_cache()
        emit("done", item=item["id"], status=status, reason=reason, rows=rows,
             seconds=round(time.perf_counter() - start, 3))
        if broken:  # this item broke the context: the rest need a new process
            emit("restart", item=None, reason=broken)
            return RESTART_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
