"""The GPU evidence run: one command of at most 8 minutes on a lent GPU machine, staged
by value, each stage with its own time budget, results written as it goes.

    bash scripts/gpu_evidence.sh [--out DIR]        # on the GPU machine (DIR: $OUT there)
    bash scripts/gpu_evidence.sh --collect DIR      # here: file what came back under bench/results
    bash scripts/gpu_evidence.sh --dry-run --out DIR  # CPU: fake clock, tiny shapes, fake timing

Stages (mmfast.bench.evidence_plan): 1 "checks" (every kernel family vs float64, bf16
and fp16, forward and backward, NaN-poisoned; CUDA C++ kernels, built in the background
meanwhile), 2 "headline" (device peaks, each suite's headline case with its baselines),
3 "rest" (pytest -m gpu, then every other benchmark case). Items recorded by an earlier
run on the same source (``bench/results/evidence/<key>/``) are skipped; the last lines
printed say exactly what did not run.

Each stage runs in worker processes (mmfast.bench.evidence_worker; started, watched and
killed through mmfast.bench.evidence_process): one is killed when an item exceeds its
cap (recorded as timed out; a new worker takes the rest) or the stage its deadline (the
unfinished items are reported as not run, and run next time).
"""

from __future__ import annotations

import argparse
import fnmatch
import itertools
import json
import os
import queue
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from mmfast.bench import evidence_plan as plan
from mmfast.bench.evidence_process import BOOTSTRAP, ROOT, FakeClock, RealClock, Worker
from mmfast.bench.evidence_record import FINAL, MAX_FILES, Record, collect

FAKE_COSTS = {"check": 1.0, "peaks": 1.0, "bench": 2.0, "tests": 5.0}
# An item whose worker must start over (CUDA context broken) more often than this crashed.
MAX_RESTARTS = 2


# ---- the run -------------------------------------------------------------------------


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Run:
    def __init__(self, args, record: Record, clock, key: str):
        self.args, self.record, self.clock, self.key = args, record, clock, key
        self.run_id = _now_iso()
        self.info: dict = {}
        self.this_run: dict[str, str] = {}  # item id -> status, this run only
        self.builder: Worker | None = None
        self.kinds: dict[str, str] = {}
        self.restarts: dict[str, int] = {}
        self._bench: tuple[list[plan.Item], list[plan.Item]] | None = None
        self.fake_costs = [(pattern, float(s)) for pattern, s in (c.split("=", 1) for c in args.fake_cost)]

    # ---- settings for workers ----

    def cost_of(self, item_id: str) -> float:
        for pattern, seconds in self.fake_costs:
            if fnmatch.fnmatch(item_id, pattern):
                return seconds
        return FAKE_COSTS.get(self.kinds.get(item_id, "bench"), 1.0)

    def worker_env(self, kind: str) -> dict:
        """Checks and tests: outputs start as NaN, one autotune config (the one the tests
        check, quick to compile; tests/conftest.py sets the same). Benchmarks: production
        settings, nothing poisoned. Kernels read both at import: one worker, one setting."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("MMFAST_CUDA_CACHE", str(Path(tempfile.gettempdir()) / "mmfast-evidence-csrc"))
        checking = _env_class(kind) == "checks"
        env["MMFAST_POISON_OUTPUTS"] = "1" if checking else "0"
        env["MMFAST_AUTOTUNE"] = "0" if checking else os.environ.get("MMFAST_AUTOTUNE", "1")
        if self.args.dry_run:
            env["CUDA_VISIBLE_DEVICES"] = ""
            env["TRITON_INTERPRET"] = "1"
            env["MMFAST_EVIDENCE_FAKE_TIMING"] = "1"
        return env

    def settings(self) -> dict:
        return {"out": str(self.record.out), "size": "tiny" if self.args.dry_run else "real",
                "quick": self.args.dry_run, "commit": self.record.commit if self.record.commit != "unknown" else self.key}

    # ---- recording ----

    def finish_item(self, item: plan.Item, status: str, reason: str | None = None, seconds: float | None = None,
                    rows: list[dict] = ()) -> None:
        file = {"check": "checks.jsonl", "peaks": "bench.jsonl", "bench": "bench.jsonl"}.get(item.kind)
        if file and rows:
            self.record.append(file, [{**r, "evidence_item": item.id, "run_id": self.run_id, "source": self.key}
                                      for r in rows])
        self.this_run[item.id] = status
        self.record.set_item(item.id, stage=item.stage, status=status, reason=reason, seconds=seconds,
                             run_id=self.run_id)

    def on_event(self, event: dict, items: dict[str, plan.Item]) -> None:
        if event["event"] == "hello" and not self.info:
            self.info = {k: v for k, v in event.items() if k not in ("event", "pid")}
            self.run_entry["device"] = self.info
            self.record.write_summary()
        elif event["event"] == "row":
            self.record.append("tests.jsonl", [{**event["row"], "run_id": self.run_id, "source": self.key}])

    # ---- the background CUDA C++ build ----

    def start_builder(self, pending: list[plan.Item]) -> None:
        if self.args.dry_run or not any(i.params.get("cuda_build") for i in pending):
            return
        import torch

        if not torch.cuda.is_available():
            return
        item = plan.Item("cuda-build", "checks", "cuda_build", {}, None)
        self.kinds[item.id] = item.kind
        self.builder_item = item
        self.builder_started = self.clock.now()
        self.builder = Worker([item], self.settings(), self.worker_env("check"), self.record, "cuda-build")

    def poll_builder(self, final: bool = False) -> None:
        if self.builder is None:
            return
        while True:
            try:
                event = self.builder.events.get_nowait() if not final else self.builder.events.get(timeout=0.5)
            except queue.Empty:
                if final:
                    self.builder.kill()
                    self.finish_item(self.builder_item, "cut off", "the run ended before the build did")
                    self.builder = None
                return
            if event["event"] == "done":
                self.finish_item(self.builder_item, event["status"], event.get("reason"), event.get("seconds"))
            if event["event"] == "exit":
                self.builder.close()
                self.builder = None
                return

    # ---- one stage ----

    def run_stage(self, stage: str, items: list[plan.Item], deadline: float) -> dict:
        entry = {"budget_s": None, "deadline_s": round(deadline, 1), "started_s": round(self.clock.now(), 1)}
        pending = [i for i in items if not self.record.is_final(i.id)]
        entry["recorded_before"] = len(items) - len(pending)
        if not pending:
            entry.update(status="all recorded", used_s=0.0)
            return entry
        if stage == "checks":
            self.start_builder(pending)
        by_id = {i.id: i for i in pending}
        cut, abandoned = False, None
        while pending and not cut:
            if self.clock.now() >= deadline:
                cut = True
                break
            # One worker per run of items that need the same environment (see worker_env).
            batch = list(itertools.takewhile(lambda i: _env_class(i.kind) == _env_class(pending[0].kind), pending))
            worker = Worker(batch, self.settings(), self.worker_env(batch[0].kind), self.record, stage,
                            fork=self.args.dry_run and not _cuda_initialized())
            current, current_start, restart = None, self.clock.now(), None
            while True:
                self.poll_builder()
                cap = by_id[current].cap_s if current else plan.CAP_STARTUP_S
                item_deadline = current_start + cap if cap else deadline
                event = self.clock.wait(worker.events, min(deadline, item_deadline), self.cost_of)
                if event is None:  # a deadline passed
                    worker.kill()
                    if item_deadline < deadline and current:
                        item = by_id[current]
                        self.finish_item(item, "timeout", f"over its cap of {cap:g} s", round(cap, 1))
                        pending.remove(item)
                    elif item_deadline < deadline:  # no word from a new worker: give up the stage
                        abandoned = f"a worker printed nothing for {cap:g} s"
                        self.record.log(f"[{stage}] {abandoned}: stage abandoned\n")
                        cut = True
                    else:
                        cut = True
                    break
                kind = event["event"]
                if kind == "start":
                    current, current_start = event["item"], self.clock.now()
                elif kind == "done":
                    item = by_id[event["item"]]
                    self.finish_item(item, event["status"], event.get("reason"), event.get("seconds"),
                                     event.get("rows") or [])
                    pending.remove(item)
                    current, current_start = None, self.clock.now()
                elif kind == "restart":  # its CUDA context broke: a new worker takes over
                    restart = event
                elif kind == "exit":
                    worker.close()
                    if restart is not None:
                        self.record.log(f"[{stage}] new worker: CUDA context broken ({restart.get('reason')})\n")
                        item_id = restart.get("item")
                        if item_id:  # unfinished (pytest stopped): resumed, twice at most
                            self.restarts[item_id] = self.restarts.get(item_id, 0) + 1
                            if self.restarts[item_id] > MAX_RESTARTS:
                                self.finish_item(by_id[item_id], "crash", f"CUDA context broken "
                                                 f"{self.restarts[item_id]} times: {restart.get('reason')}")
                                pending.remove(by_id[item_id])
                    elif current:  # died inside an item: a crash (illegal address, abort, ...)
                        item = by_id[current]
                        self.finish_item(item, "crash", f"worker exited with code {worker.proc.returncode}")
                        pending.remove(item)
                    elif any(i in by_id and by_id[i] in pending for i in worker.ids):
                        # died between items (an import error, say): do not loop on it
                        abandoned = f"a worker exited with code {worker.proc.returncode} outside any item"
                        self.record.log(f"[{stage}] {abandoned}: stage abandoned\n")
                        cut = True
                    break
                else:
                    self.on_event(event, by_id)
        for item in pending:  # not final: the next run takes them up again
            self.this_run.setdefault(item.id, "cut off")
            self.record.summary["items"][item.id] = {
                "stage": stage, "status": "cut off", "run_id": self.run_id,
                "reason": f"stage abandoned: {abandoned}" if abandoned else f"stage {stage} reached its deadline"}
        self.record.write_summary()
        entry["used_s"] = round(self.clock.now() - entry["started_s"], 1)
        entry["status"] = (f"abandoned: {abandoned} (see evidence.log)" if abandoned and pending else
                           "cut off at its budget" if pending else "done")
        entry["not_run"] = [i.id for i in pending]
        return entry

    # ---- the whole run ----

    def plan_stage(self, stage: str) -> list[plan.Item]:
        """A stage's items, planned when the stage begins (listing the suites imports
        them all: that time is the headline stage's, not the checks')."""
        if stage == "checks":
            items = plan.check_items(tuple(self.args.dtypes), self.args.checks)
        else:
            if self._bench is None:
                self._bench = plan.bench_items(self.list_suites())
            first, rest = self._bench
            items = first if stage == "headline" else [plan.tests_item(tuple(self.args.tests))] + rest
        self.kinds.update({i.id: i.kind for i in items})
        return items

    def list_suites(self) -> dict[str, tuple[list[str], list[str]]]:
        import torch

        from mmfast.bench import suites

        device = torch.device("cpu" if self.args.dry_run or not torch.cuda.is_available() else "cuda")
        out = {}
        names = self.args.suites or suites.names()
        for name in names:
            try:
                suite = suites.get(name)
                out[name] = ([c.name for c in suite.cases(self.args.dry_run, device)], [p.name for p in suite.providers])
            except Exception as e:  # a suite that cannot load here is reported, not fatal
                self.record.log(f"[plan] suite {name} not loadable: {type(e).__name__}: {e}\n")
                self.unloadable[name] = f"{type(e).__name__}: {e}"
        return out

    def execute(self) -> int:
        self.unloadable: dict[str, str] = {}
        self.run_entry = {"run_id": self.run_id, "dry_run": self.args.dry_run, "total_s": self.args.total,
                          "stages": {}}
        self.record.summary["runs"].append(self.run_entry)
        self.record.log(f"==== evidence run {self.run_id}, source {self.key}, commit {self.record.commit} ====\n")
        budgets = {s: b for s, b in plan.STAGE_BUDGETS.items()}
        for override in self.args.budget:
            name, seconds = override.split("=", 1)
            budgets[name] = float(seconds)
        start = 0.0  # the clock started with the command (see RealClock)
        deadlines = plan.stage_deadlines(start, self.args.total, budgets)
        stages: dict[str, list[plan.Item]] = {}
        for stage in plan.STAGE_BUDGETS:
            if stage not in self.args.stages:
                stages[stage] = []
                self.run_entry["stages"][stage] = {"status": "not asked for (--stages)"}
                continue
            stages[stage] = items = self.plan_stage(stage)
            entry = self.run_stage(stage, items, deadlines[stage])
            entry["budget_s"] = budgets[stage]
            entry["items"] = len(items)
            self.run_entry["stages"][stage] = entry
            self.record.write_summary()
        self.poll_builder(final=True)
        self.run_entry["ended_s"] = round(self.clock.now() - start, 1)
        self.run_entry["unloadable_suites"] = self.unloadable
        self.record.write_summary()
        report = self.report(stages)
        self.record.log(report + "\n")
        print(report)
        bad = [i for i, s in self.this_run.items() if s in ("fail", "error", "crash", "timeout")]
        return 1 if bad else 0

    def print_plan(self) -> int:
        for stage, budget in plan.STAGE_BUDGETS.items():
            if stage not in self.args.stages:
                continue
            items = self.plan_stage(stage)
            todo = [i for i in items if not self.record.is_final(i.id)]
            print(f"stage {stage} ({'rest of the run' if budget is None else f'budget {budget} s'}): "
                  f"{len(items)} items, {len(items) - len(todo)} recorded; to run, in order:")
            print("\n".join(f"  {line}" for line in _grouped(todo)))
        return 0

    def report(self, stages: dict[str, list[plan.Item]]) -> str:
        """The last thing printed: each stage's counts, this run's failures, what was
        skipped here and why, then exactly which items did not run."""
        lines = [f"== GPU evidence {self.run_id}: source {self.key} (commit {self.record.commit}), "
                 f"device {self.info.get('device', '?')}, {self.clock.now():.0f} s"
                 f"{' [DRY RUN: fake clock, tiny shapes, no GPU numbers]' if self.args.dry_run else ''} =="]
        for stage, items in stages.items():
            entry = self.run_entry["stages"].get(stage, {})
            if stage not in self.args.stages:
                lines.append(f"stage {stage}: not asked for (--stages)")
                continue
            counts: dict[str, int] = {}
            for item in items:
                status = self.this_run.get(item.id) or self.record.status(item.id) or "not run"
                status = f"{status} earlier" if item.id not in self.this_run and status in FINAL else status
                counts[status] = counts.get(status, 0) + 1
            budget = entry.get("budget_s")
            lines.append(f"stage {stage} ({'rest of the run' if budget is None else f'budget {budget:g} s'}, "
                         f"used {entry.get('used_s', 0)} s, {entry.get('status', 'not run')}): {len(items)} items: "
                         + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"))
            for item in items:
                status = self.this_run.get(item.id)
                if status in ("fail", "error", "crash", "timeout"):
                    reason = self.record.summary["items"][item.id].get("reason")
                    lines.append(f"  {status.upper()} {item.id}{': ' + reason if reason else ''}")
        skipped = [plan.Item(i, "", "") for i, s in self.this_run.items() if s == "skipped"]
        if skipped:
            lines.append(f"skipped here ({len(skipped)} items; reasons in summary.json):")
            lines.extend(f"  {line}" for line in _grouped(skipped))
        lines.append("DID NOT RUN (the same command again runs them; recorded items are skipped):")
        nothing, counts = True, []
        for stage, items in stages.items():
            if stage not in self.args.stages:
                lines.append(f"  stage {stage}: not asked for (--stages)")
                nothing = False
                continue
            missing = [i for i in items if self.record.status(i.id) not in FINAL and self.this_run.get(i.id) != "skipped"]
            if missing:
                nothing = False
                why = self.run_entry["stages"].get(stage, {}).get("status", "not reached")
                lines.append(f"  stage {stage}: {len(missing)} of {len(items)} items ({why}):")
                lines.extend(f"    {line}" for line in _grouped(missing, items))
            counts.append(f"{stage} {len(missing)} of {len(items)}")
        for name, reason in self.unloadable.items():
            lines.append(f"  suite {name}: not loadable here ({reason})")
            nothing = False
        if nothing:
            lines.append("  nothing: every item of every stage is recorded")
        files = self.record.files()
        lines.append(f"files ({len(files)} of at most {MAX_FILES}) in {self.record.out}: "
                     + ", ".join(p.name for p in files))
        lines.append("not run: " + (", ".join(counts) or "-"))
        return "\n".join(lines)


def _cuda_initialized() -> bool:
    """A process that initialised CUDA must not fork a worker (the child could not use
    it, nor hide it): the dry run then starts its workers like the real run does."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_initialized()


def _env_class(kind: str) -> str:
    return "checks" if kind in ("check", "tests", "cuda_build") else "bench"


def _grouped(items: list[plan.Item], among: list[plan.Item] | None = None) -> list[str]:
    """Item ids, exactly, in few lines. Bench items: one line per suite, each case with
    its providers in brackets (``bench/norm: case [a, b]; case2 [c]``); relative to
    ``among`` (the stage's items), a case whose every provider is listed is ``[all]``,
    and a suite whose every item is listed is one line ``bench/<suite>: all N items``."""
    def by_suite(group):
        suites: dict[str, dict[str, list[str]]] = {}
        for item in group:
            parts = item.id.split("/")
            if parts[0] == "bench" and len(parts) == 4:
                suites.setdefault(parts[1], {}).setdefault(parts[2], []).append(parts[3])
        return suites

    lines = [i.id for i in items if not (i.id.startswith("bench/") and i.id.count("/") == 3)]
    whole = by_suite(among or [])
    for suite, cases in by_suite(items).items():
        total = whole.get(suite, {})
        if total and cases == total:
            lines.append(f"bench/{suite}: all {sum(map(len, cases.values()))} items of this stage "
                         f"({len(cases)} cases, every provider)")
            continue
        lines.append(f"bench/{suite}: " + "; ".join(
            f"{case} [{'all' if total.get(case) == p else ', '.join(p)}]" for case, p in cases.items()))
    return lines


# ---- the command line ----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_evidence", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: $MMFAST_EVIDENCE_OUT, else $OUT, else the record folder "
                   "bench/results/evidence/<key>)")
    p.add_argument("--record-dir", type=Path, default=None,
                   help="where earlier runs of this source are recorded (default: bench/results/evidence/<key>; "
                   "none in a dry run)")
    p.add_argument("--total", type=float, default=plan.TOTAL_S, help="seconds for the whole run (default 480)")
    p.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS",
                   help="override a stage's budget (checks=90, headline=240; rest takes what is left)")
    p.add_argument("--stages", default="checks,headline,rest", type=lambda s: s.split(","),
                   help="stages to run, comma-separated")
    p.add_argument("--dtypes", default="bfloat16,float16", type=lambda s: s.split(","),
                   help="dtypes of the stage-1 checks")
    p.add_argument("--checks", default=None, metavar="GLOB", help="only the stage-1 checks whose name matches")
    p.add_argument("--suites", default=None, type=lambda s: s.split(","), help="only these bench suites")
    p.add_argument("--tests", nargs="+", default=["tests"], help="pytest paths of stage 3 (default: tests)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU dry run: fake clock, tiny shapes, quick cases, fake timing, Triton interpreted")
    p.add_argument("--fake-cost", action="append", default=[], metavar="GLOB=SECONDS",
                   help="dry run: seconds an item matching GLOB takes on the fake clock")
    p.add_argument("--plan", action="store_true",
                   help="print, per stage, the items still to run, in order, and exit; runs nothing")
    p.add_argument("--collect", type=Path, default=None, metavar="DIR",
                   help="file the results a device run brought back (DIR) under bench/results, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not BOOTSTRAP.is_file():
        print("gpu_evidence: run it from a checkout of mmfast (scripts/gpu_evidence.sh)", file=sys.stderr)
        return 2
    if args.collect is not None:
        summary = json.loads((args.collect / "summary.json").read_text()) if (args.collect / "summary.json").is_file() else {}
        # The commit is named only when this checkout holds the very source that ran.
        commit = _git_commit() if summary.get("source") == plan.source_key(ROOT) else None
        dest = collect(args.collect, ROOT / "bench" / "results", commit)
        print(f"recorded under {dest.relative_to(ROOT)}; benchmark rows appended to bench/results/<suite>.jsonl")
        return 0
    unknown = set(args.stages) - set(plan.STAGE_BUDGETS)
    if unknown:
        print(f"--stages: unknown {', '.join(sorted(unknown))} (known: {', '.join(plan.STAGE_BUDGETS)})",
              file=sys.stderr)
        return 2
    key = plan.source_key(ROOT)
    record_dir = args.record_dir
    if record_dir is None and not args.dry_run:
        record_dir = ROOT / "bench" / "results" / "evidence" / key
    out = args.out or os.environ.get("MMFAST_EVIDENCE_OUT") or os.environ.get("OUT") or record_dir
    if out is None:
        print("--out: a dry run needs an output folder", file=sys.stderr)
        return 2
    if args.plan and not Path(out).exists():
        out = tempfile.mkdtemp(prefix="mmfast-evidence-plan-")  # --plan writes nothing in the tree
    try:
        record = Record(Path(out), key, _git_commit())
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    recorded = record.merge_from(record_dir) if record_dir is not None and Path(record_dir).is_dir() else 0
    print(f"gpu evidence: source {key}, output {out}, {recorded} items recorded earlier "
          f"({record_dir if record_dir else 'no record folder'})", flush=True)
    run = Run(args, record, FakeClock() if args.dry_run else RealClock(), key)
    if args.plan:
        return run.print_plan()
    code = run.execute()
    if record_dir is not None and Path(out).resolve() == Path(record_dir).resolve():
        collect(Path(out), ROOT / "bench" / "results")  # recorded in place: the suite files too
    return code
