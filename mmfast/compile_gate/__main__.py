"""``python -m mmfast.compile_gate [--full] [--only F,...] [--update] [--out FILE] [--json FILE] [--markdown]``

Compiles the Triton kernels for an H100 (sm_90a) without a GPU and fails (exit 1) on a
compile error, a spill in an fp16/bf16 config, a dot kernel without wgmma, head-dim
padding above 1.12x in attention at head dims 72/80, an entry kernel no case launches,
or a stale known-issue entry. Default: the quick subset (what the test suite runs);
``--full``: every case in fp16 and bf16, the resource table written to ``--out``
(default bench/results/sm90_resources.jsonl); ``--full --only F --update``: family F's
rows replaced in that table, the others kept (mmfast/compile_gate/table.py).

Runs with an empty Triton cache of its own (removed afterwards), so nothing compiled by an
earlier run can hide a failure, and with the interpreter off and every autotune config on.
"""

import os
import sys
import tempfile

# Before Triton or the kernels are imported: compiled kernels, not interpreted ones, and
# the full autotune lists.
os.environ.pop("TRITON_INTERPRET", None)
os.environ["MMFAST_AUTOTUNE"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "bench" / "results" / "sm90_resources.jsonl"


def summary(rows: list[dict]) -> list[dict]:
    """One line per kernel: its rows' extremes."""
    by_kernel: dict[str, list[dict]] = {}
    for r in rows:
        by_kernel.setdefault(f"{r['module']}.{r['kernel']}", []).append(r)
    out = []
    for name, rs in sorted(by_kernel.items()):
        ok = [r for r in rs if r["compiled"]]
        ratios = [r["issued_over_useful"] for r in ok if r["issued_over_useful"] is not None]
        out.append({
            "kernel": name, "rows": len(rs), "errors": len(rs) - len(ok),
            "regs": max((r["regs"] for r in ok), default=0),
            "spill": max((r["spill_bytes"] for r in ok), default=0),
            "smem_kib": round(max((r["shared_bytes"] for r in ok), default=0) / 1024, 1),
            "min_occupancy": min((r["occupancy"] for r in ok), default=0.0),
            "wgmma": ("-" if not any(r["has_dot"] for r in ok)
                      else "yes" if all(r["wgmma"] for r in ok if r["has_dot"]) else "partly"),
            "max_ratio": max(ratios) if ratios else None,
            "expected": sorted({e.split(":")[0] for r in rs for e in r["expected"]}),
        })
    return out


def markdown(lines: list[dict]) -> str:
    head = "| kernel | rows | errors | max regs | max spill B | max smem KiB | min occupancy | wgmma | max issued/useful | expected |"
    out = [head, "|" + "---|" * 10]
    for s in lines:
        ratio = "-" if s["max_ratio"] is None else f"{s['max_ratio']:.2f}"
        out.append(f"| {s['kernel']} | {s['rows']} | {s['errors']} | {s['regs']} | {s['spill']} | {s['smem_kib']} "
                   f"| {s['min_occupancy']:.3f} | {s['wgmma']} | {ratio} | {', '.join(s['expected']) or '-'} |")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmfast.compile_gate", description=__doc__.split("\n\n")[1])
    parser.add_argument("--full", action="store_true", help="every case, fp16 and bf16 (default: the quick subset)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"write the rows as JSON lines (--full default: {DEFAULT_OUT})")
    parser.add_argument("--json", type=Path, default=None, help="write the verdict (failures, uncovered, stale) as JSON")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes (default 1)")
    parser.add_argument("--only", default="", help="comma-separated case families (no coverage check)")
    parser.add_argument("--update", action="store_true",
                        help="with --full --only: replace those families' rows in --out (default: the resource "
                             "table) and keep the other rows")
    parser.add_argument("--markdown", action="store_true", help="print the per-kernel summary as a Markdown table")
    args = parser.parse_args(argv)
    families = tuple(f for f in args.only.split(",") if f)
    if args.update and not (args.full and families):
        parser.error("--update needs --full and --only (the families whose rows it replaces)")

    cache = tempfile.mkdtemp(prefix="mmfast-compile-gate-")
    os.environ["TRITON_CACHE_DIR"] = cache
    try:
        from .gate import run
        from .table import read_rows, replace_families, write_rows

        result = run(quick=not args.full, families=families, jobs=args.jobs, log=lambda s: print(s, flush=True))
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    out = args.out or (DEFAULT_OUT if args.full else None)
    if out is not None:
        table = replace_families(read_rows(out), result["rows"], families) if args.update else result["rows"]
        write_rows(out, table)
    lines = summary(result["rows"])
    if args.markdown:
        print(markdown(lines))
    rows = result["rows"]
    failures = result["failures"]
    for r in failures:
        print(f"FAIL {r['module']}.{r['kernel']} [{r['shape']} {r['dtype']}] {r['failures']} "
              f"{r['constexprs']} warps={r['num_warps']} stages={r['num_stages']} spill={r['spill_bytes']} "
              f"ratio={r['issued_over_useful']} {r['error'] or ''}")
    for k in result["uncovered"]:
        print(f"UNCOVERED {k}: no case launches it (add one to mmfast/compile_gate/cases.py)")
    for s in result["stale"]:
        print(f"STALE known issue {s}: no longer found; delete it from known_issues.py")
    verdict = {
        "compiles": result["compiles"], "rows": len(rows), "seconds": result["seconds"],
        "compile_errors": sum(not r["compiled"] for r in rows),
        "spilling_rows": sum(r["spill_bytes"] > 0 for r in rows),
        "dot_rows": sum(r["has_dot"] for r in rows), "wgmma_rows": sum(r["wgmma"] for r in rows),
        "expected_rows": sum(bool(r["expected"]) for r in rows),
        "failures": [{k: r[k] for k in ("module", "kernel", "shape", "dtype", "failures", "constexprs",
                                        "num_warps", "num_stages", "spill_bytes", "error")} for r in failures],
        "uncovered": result["uncovered"], "stale": result["stale"],
        "kernels_launched": sorted({f"{r['module']}.{r['kernel']}" for r in rows}),
    }
    if args.json is not None:
        args.json.write_text(json.dumps(verdict, indent=1, default=str))
    print(f"compile gate: {verdict['compiles']} compiles, {len(rows)} rows, {verdict['compile_errors']} compile errors, "
          f"{verdict['spilling_rows']} spilling rows, wgmma in {verdict['wgmma_rows']}/{verdict['dot_rows']} dot rows, "
          f"{verdict['expected_rows']} rows with expected issues, {len(failures)} failing rows, "
          f"{len(result['uncovered'])} uncovered kernels, {len(result['stale'])} stale entries, {result['seconds']}s")
    return 1 if failures or result["uncovered"] or result["stale"] else 0


if __name__ == "__main__":
    sys.exit(main())
