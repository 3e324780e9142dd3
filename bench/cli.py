"""``mmfast bench [SUITE...]``: run suites, print tables, save rows and plots, compare."""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from pathlib import Path

from mmfast.bench import harness, results_io, suites, table
from mmfast.bench.env import Env, detect_env

SMOKE_WARNING = (
    "*** CPU SMOKE RUN: NO GPU. These numbers are NOT GPU numbers (tiny shapes, "
    "time.perf_counter, a few repeats); they only show that the suites run. ***"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmfast bench",
        description="Run benchmark suites: every provider side by side, time, throughput, "
        "fraction of the measured device peak, peak memory.",
    )
    p.add_argument("suites", nargs="*", metavar="SUITE",
                   help=f"suites to run (default: all of {', '.join(suites.names())})")
    p.add_argument("--quick", action="store_true", help="a few small cases per suite")
    p.add_argument("--compare", action="store_true",
                   help="show the time change against the last saved row of each case on this GPU")
    p.add_argument("--save", action=argparse.BooleanOptionalAction, default=None,
                   help="append rows to OUT/<suite>.jsonl (default: on for GPU runs, off on CPU)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="results directory (default: bench/results in a checkout, else "
                   f"./bench-results; CPU runs use its '{results_io.CPU_SUBDIR}' subfolder)")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=None,
                   help="write PNG plots to OUT/plots (default: on when saving)")
    p.add_argument("--case", metavar="REGEX", help="only cases whose name matches REGEX")
    p.add_argument("--provider", action="append", metavar="NAME",
                   help="only this provider (repeatable)")
    p.add_argument("--list", action="store_true", help="list suites, cases and providers; run nothing")
    return p


def _describe_env(env: Env) -> str:
    from mmfast.dispatch import triton_interpreted

    lines = [f"device: {env.gpu} ({env.device})   torch {env.torch_version}   "
             f"triton {env.triton_version or 'not installed'}   commit {env.commit}   {env.run_id}"]
    if not env.is_gpu:
        lines.append("triton providers: " + ("run under the interpreter (TRITON_INTERPRET=1)"
                                             if triton_interpreted() else
                                             "skipped (set TRITON_INTERPRET=1 to run them interpreted)"))
    return "\n".join(lines)


def _list(loaded: dict, env: Env, quick: bool) -> int:
    for name, suite in loaded.items():
        print(f"{name}: {suite.description}")
        print("  providers: " + ", ".join(p.name for p in suite.providers))
        print(f"  cases on {env.device.type}{' (--quick)' if quick else ''}:")
        for case in suite.cases(quick, env.device):
            print(f"    {case.name}")
    return 0


NO_PEAK_ON_CPU = ("of peak: not reported on a CPU; peaks are measured on a GPU only (a smoke run's "
                  "cache-sized cases would exceed a CPU's memory peak)")


def _peaks(env: Env, args, out: Path, save: bool):
    """Measure the device peaks once for the whole run (None if that fails, and on a CPU:
    its smoke cases fit in caches, so fractions of a DRAM copy peak went over 100%)."""
    if not env.is_gpu:
        print(NO_PEAK_ON_CPU)
        return None
    try:
        peaks = harness.measure_peaks(env, args.quick)
    except Exception as e:
        print(f"peak measurement failed ({type(e).__name__}: {e}); fractions of peak not reported")
        return None
    print(f"measured peaks: matmul {table.num(peaks.tflops)} TFLOP/s, copy {table.num(peaks.gbps)} GB/s "
          "(read + write)")
    if args.compare:
        previous = results_io.latest_rows(results_io.load_rows(out, results_io.PEAKS), env.gpu)
        for row in peaks.rows:
            old = previous.get((row["case"], row["provider"]))
            if old:
                change = table.pct(results_io.time_change(row, old), signed=True)
                print(f"  {row['case']}: time {change} vs last saved (commit {old['commit']})")
    if save:
        results_io.append_rows(out, results_io.PEAKS, list(peaks.rows))
    return peaks


def _is_mmfast(provider_name: str) -> bool:
    return provider_name.startswith("mmfast")


def mmfast_summary(tally: dict) -> str | None:
    """One line on how much of mmfast a run measured (None when it measured all it tried):
    ``tally`` holds "measured" (a count) and "skipped" (reason -> count) of mmfast's
    providers."""
    measured, skipped = tally["measured"], sum(tally["skipped"].values())
    if not skipped:
        return None
    why = "; ".join(tally["skipped"])
    if measured == 0:
        return (f"measured nothing of mmfast: all {skipped} runs of its providers were skipped ({why}); "
                "TRITON_INTERPRET=1 runs its Triton kernels under the interpreter (smoke sizes, not speed)")
    return f"mmfast: measured {measured} of {measured + skipped} runs of its providers; skipped {skipped} ({why})"


def _run_suite(suite, args, env: Env, peaks, out: Path, save: bool, plot: bool, tally: dict | None = None) -> int:
    """Run one suite and print its report; returns the number of failed measurements.
    ``tally``: counts of mmfast's provider runs measured and skipped, added to."""
    tally = {"measured": 0, "skipped": {}} if tally is None else tally
    cases = suite.cases(args.quick, env.device)
    if args.case:
        cases = [c for c in cases if re.search(args.case, c.name)]
    providers = [p for p in suite.providers if not args.provider or p.name in args.provider]
    work, skipped = [], {}
    for case in cases:
        for provider in providers:
            reason = provider.skip(case, env.device)
            if reason:
                skipped.setdefault((provider.name, reason), []).append(case.name)
                if _is_mmfast(provider.name):
                    tally["skipped"][reason] = tally["skipped"].get(reason, 0) + 1
            else:
                work.append((case, provider))

    print(f"\n== {suite.name}: {suite.description} ==")
    rows, errors = [], []
    for i, (case, provider) in enumerate(work, 1):
        print(f"[{i}/{len(work)}] {case.name} {provider.name}", end="", file=sys.stderr, flush=True)
        try:
            row = harness.run_case(suite, case, provider, env, peaks, args.quick)
        except Exception as e:  # one broken provider must not hide the others' numbers
            first = (str(e).strip().splitlines() or [""])[0]
            errors.append(f"{case.name} {provider.name}: {type(e).__name__}: {first}")
            print(f"  ERROR {type(e).__name__}: {first}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            continue
        rows.append(row)
        tally["measured"] += _is_mmfast(provider.name)
        of_peak = f"  {table.pct(row['frac_of_peak'])} of peak" if row["frac_of_peak"] is not None else ""
        print(f"  {table.num(row['ms'])} ms{of_peak}", file=sys.stderr, flush=True)

    previous = None
    if args.compare:
        previous = results_io.latest_rows(results_io.load_rows(out, suite.name), env.gpu)
        path = results_io.results_path(out, suite.name)
        if not previous:
            print(f"(--compare: no saved rows for '{env.gpu}' in {path})")
        else:
            seen = {(r["commit"], r["run_id"]) for r in previous.values()}
            print("compared with: " + ", ".join(f"commit {c} ({t})" for c, t in sorted(seen, key=lambda s: s[1])))
    if rows:
        print(table.format_table(suite, rows, previous, env.is_gpu))
    else:
        print("(no measurements)")
    for line in (table.target_summary(suite, rows, env.is_gpu) + table.speedup_summary(suite, rows, env.is_gpu)
                 + table.latency_summary(suite, rows, env.is_gpu)):
        print(line)
    for (provider, reason), names in skipped.items():
        print(f"skipped {provider} ({len(names)} case{'s' * (len(names) != 1)}): {reason}")
    for line in errors:
        print(f"FAILED {line}")

    if save and rows:
        print(f"saved {len(rows)} rows to {results_io.append_rows(out, suite.name, rows)}")
    if plot and rows:
        from mmfast.bench.plot import plot_suite

        path = plot_suite(suite, rows, peaks.of(suite.bound) if peaks else None, env, out)
        if path:
            print(f"plot: {path}")
    return len(errors)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mmfast bench``; returns the exit status (0: all measured,
    1: some measurement failed, 2: bad arguments)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    names = args.suites or suites.names()
    unknown = [n for n in names if n not in suites.names()]
    if unknown:
        print(f"mmfast bench: unknown suite(s) {', '.join(unknown)} "
              f"(known: {', '.join(suites.names())})", file=sys.stderr)
        return 2
    if args.case:
        try:
            re.compile(args.case)
        except re.error as e:
            print(f"mmfast bench: --case: bad regular expression: {e}", file=sys.stderr)
            return 2

    env = detect_env()
    loaded, failures = {}, 0
    for name in names:
        try:
            loaded[name] = suites.get(name)
        except Exception as e:  # e.g. a baseline library that breaks on import
            print(f"mmfast bench: could not load suite '{name}': {type(e).__name__}: {e}", file=sys.stderr)
            failures += 1
    known = {p.name for suite in loaded.values() for p in suite.providers}
    if args.provider and not set(args.provider) <= known:
        missing = ", ".join(sorted(set(args.provider) - known))
        print(f"mmfast bench: --provider: no provider {missing} (known: {', '.join(sorted(known))})",
              file=sys.stderr)
        return 2
    if args.list:
        return _list(loaded, env, args.quick)
    save = env.is_gpu if args.save is None else args.save
    plot = save if args.plot is None else args.plot
    out = args.out if args.out is not None else results_io.default_out_dir(env.is_gpu)

    if not env.is_gpu:
        print(SMOKE_WARNING)
    print(_describe_env(env))
    peaks = _peaks(env, args, out, save)
    tally = {"measured": 0, "skipped": {}}
    for suite in loaded.values():
        failures += _run_suite(suite, args, env, peaks, out, save, plot, tally)
    summary = mmfast_summary(tally)
    if summary:
        print("\n" + summary)
    if not env.is_gpu:
        print("\n" + SMOKE_WARNING)
    return 1 if failures else 0
