"""The fuzz harness: a Case builds its inputs from a seed, runs one public op on one
backend, and is classified against the float64 reference:

    correct      the output matches the reference (see ``compare``)
    clear_error  a ValueError / TypeError (NoBackendError is one) whose message names an
                 argument of the op
    unclear      any other exception, or a ValueError / TypeError naming no argument
    wrong        a silent wrong answer: an output off the reference, or a malformed input
                 accepted (``expect="error"``)
    crash        the process died or hung (cases marked ``isolate`` run in a subprocess)

``expect``: "value" (valid input: the answer must be right, or a clear refusal),
"error" (malformed input: a clear error is the only right outcome), "either".
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch

OUTCOMES = ("correct", "clear_error", "unclear", "wrong", "crash")
BAD = ("unclear", "wrong", "crash")
SEED = int(os.environ.get("MMFAST_FUZZ_SEED", "0"))
ISOLATE_TIMEOUT_S = 300

# Relative tolerance per output dtype, against the float64 reference. The bugs this suite
# exists for are off by whole units, 1e23 or NaN; rounding of the dtype is far below these.
TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}


@dataclass
class Case:
    id: str                      # "<op>/<backend>/<what>": stable, also the seed
    op: Callable
    build: Callable[[torch.Generator], tuple[tuple, dict]]
    backend: str | None = None   # passed as backend= (None: the op takes no backend)
    expect: str = "value"
    reference: Callable | None = None  # (args, kwargs) in float64 -> output; default: op on torch
    outputs: Callable | None = None    # output -> the tensors to compare (default: all)
    isolate: bool = False              # crash-prone: run in a subprocess
    features: frozenset = field(default_factory=frozenset)  # tags that describe what the case attacks
    family: str | None = None          # the dispatch op family, for the coverage test

    @property
    def name(self) -> str:
        return self.op.__name__


def generator(case_id: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(case_id.encode()) ^ SEED)


# ---- inputs in float64 and outputs as tensors ------------------------------------------


def to_float64(value):
    """Floating tensors (contiguous copies, values kept) in float64; everything else as is."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64).contiguous() if value.is_floating_point() else value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(to_float64(v) for v in value)
    if isinstance(value, dict):
        return {k: to_float64(v) for k, v in value.items()}
    return value


def flatten(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flatten(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in flatten(value[k])]
    if isinstance(value, (int, float)):
        return [torch.tensor(float(value), dtype=torch.float64)]
    return []


def compare(out, ref, dtype: torch.dtype) -> str | None:
    """None when ``out`` matches the float64 ``ref``; else what is off."""
    outs, refs = flatten(out), flatten(ref)
    if len(outs) != len(refs):
        return f"{len(outs)} outputs, reference has {len(refs)}"
    for i, (o, r) in enumerate(zip(outs, refs)):
        if tuple(o.shape) != tuple(r.shape):
            return f"output {i}: shape {tuple(o.shape)}, reference {tuple(r.shape)}"
        if not o.is_floating_point():
            if not torch.equal(o.cpu().long(), r.cpu().long()):
                return f"output {i}: integer values differ from the reference"
            continue
        o, r = o.detach().cpu().double(), r.detach().cpu().double()
        tol = TOLERANCE.get(o.dtype if o.dtype != torch.float64 else dtype, 1e-3)
        finite = torch.isfinite(r)
        scale = max(1.0, r[finite].abs().square().mean().sqrt().item()) if finite.any() else 1.0
        fits = r.abs() <= torch.finfo(dtype).max
        close = (o - r).abs() <= tol * (r.abs() + scale)
        # Where the reference is finite the output must be close; an infinity is accepted only
        # where the true value does not fit the dtype. Where the reference is NaN or
        # infinite (NaN / Inf inputs), the output must not be finite.
        ok = torch.where(finite, close | (~torch.isfinite(o) & ~fits), ~torch.isfinite(o))
        if not ok.all():
            bad = (~ok).nonzero()[0].tolist()
            err = (o - r).abs()[finite & ~close]
            worst = err.max().item() if err.numel() else float("nan")
            return (f"output {i}: {int((~ok).sum())} of {o.numel()} elements off (first at {bad}: "
                    f"{o[tuple(bad)].item():.6g} vs {r[tuple(bad)].item():.6g}; worst |err| {worst:.3g})")
    return None


# ---- classification ---------------------------------------------------------------------


def _names_an_argument(message: str, case: Case) -> bool:
    params = [p for p in inspect.signature(case.op).parameters if p not in ("args", "kwargs")]
    return any(p in message for p in params + ["backend"])


def _call(case: Case, args, kwargs):
    if case.backend is not None:
        kwargs = {**kwargs, "backend": case.backend}
    return case.op(*args, **kwargs)


def _reference(case: Case, args, kwargs):
    args64, kwargs64 = to_float64(args), to_float64(kwargs)
    if case.reference is not None:
        return case.reference(args64, kwargs64)
    if case.backend is None:
        return case.op(*args64, **kwargs64)
    return case.op(*args64, **{**kwargs64, "backend": "torch"})


def classify(case: Case) -> tuple[str, str]:
    """(outcome, detail) of one case, in this process."""
    with warnings.catch_warnings():  # NaN / Inf inputs make numpy and torch warn: expected here
        warnings.simplefilter("ignore")
        return _classify(case)


def _classify(case: Case) -> tuple[str, str]:
    args, kwargs = case.build(generator(case.id))
    dtype = next((t.dtype for t in flatten(list(args) + list(kwargs.values())) if t.is_floating_point()),
                 torch.float32)
    try:
        with torch.no_grad():
            out = _call(case, args, kwargs)
    except (ValueError, TypeError) as error:
        message = str(error).splitlines()[0] if str(error) else ""
        if _names_an_argument(str(error), case):
            return "clear_error", f"{type(error).__name__}: {message[:160]}"
        return "unclear", f"{type(error).__name__} naming no argument: {message[:160]}"
    except Exception as error:  # noqa: BLE001 - every other exception is the finding
        return "unclear", f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
    if case.expect == "error":
        return "wrong", "malformed input accepted silently"
    if case.outputs is not None:
        out = case.outputs(out)
    try:
        with torch.no_grad():
            ref = _reference(case, args, kwargs)
    except Exception as error:  # noqa: BLE001
        if case.expect == "either":
            return "wrong", f"accepted an input the reference refuses ({type(error).__name__}: {error})"[:200]
        raise AssertionError(f"{case.id}: the reference failed on a valid input: {error!r}") from error
    if case.outputs is not None:
        ref = case.outputs(ref)
    problem = compare(out, ref, dtype)
    return ("correct", "") if problem is None else ("wrong", problem)


# ---- isolation ----------------------------------------------------------------------------


def run_isolated(case_ids: list[str], tier: str) -> dict[str, tuple[str, str]]:
    """Classify ``case_ids`` in worker subprocesses (python -m tests.fuzz.worker). A worker
    that dies or hangs marks the case it was running as a crash; a fresh worker takes the
    rest."""
    results: dict[str, tuple[str, str]] = {}
    pending = list(case_ids)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    while pending:
        started, finished = _run_worker(root, tier, pending)
        for case_id, outcome in finished.items():
            results[case_id] = outcome
        unfinished = [c for c in pending if c not in results]
        if not unfinished:
            break
        if started is None or started not in unfinished:
            raise AssertionError(f"fuzz worker failed before any case: {unfinished[:3]}")
        results[started] = ("crash", started_detail(started))
        pending = [c for c in unfinished if c != started]
    return results


_last_failure: dict[str, str] = {}


def started_detail(case_id: str) -> str:
    return _last_failure.get(case_id, "the worker process died")


def _run_worker(root: str, tier: str, ids: list[str]):
    """Run one worker over ``ids``; returns (the case running when it stopped, results)."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz.worker", tier, *ids], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=ISOLATE_TIMEOUT_S)
        hung = False
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        hung = True
    started, finished = None, {}
    for line in stdout.splitlines():
        if line.startswith("START "):
            started = line[6:]
        elif line.startswith("RESULT "):
            record = json.loads(line[7:])
            finished[record["id"]] = (record["outcome"], record["detail"])
    if started is not None and started not in finished:
        why = "hung" if hung else f"exit status {proc.returncode}"
        tail = stderr.strip().splitlines()[-1:] if stderr.strip() else []
        _last_failure[started] = f"worker {why}: {' '.join(tail)[:200]}"
    return started, finished


def tally(results: dict[str, tuple[str, str]]) -> dict[str, int]:
    counts = dict.fromkeys(OUTCOMES, 0)
    for outcome, _ in results.values():
        counts[outcome] += 1
    return counts

