"""Plain-text tables of result rows, one block per case, providers side by side."""

from __future__ import annotations

from mmfast.bench.results_io import time_change
from mmfast.bench.suite import Suite


def num(x: float | None) -> str:
    """About four significant digits without scientific notation."""
    if x is None:
        return "-"
    for limit, fmt in ((1000, "{:.0f}"), (100, "{:.1f}"), (10, "{:.2f}"), (1, "{:.3f}")):
        if abs(x) >= limit:
            return fmt.format(x)
    return "{:.4f}".format(x)


def pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x * 100:+.1f}%" if signed else f"{x * 100:.1f}%"


def target_mark(suite: Suite, row: dict, is_gpu: bool) -> str:
    """'ok' / 'LOW' against the suite's targets for this provider (GPU runs only)."""
    if not is_gpu or row.get("frac_of_peak") is None:
        return ""
    marks = [("ok" if row["frac_of_peak"] >= t.min_frac else "LOW")
             for t in suite.targets if t.provider == row["provider"]]
    return " ".join(marks)


def format_table(suite: Suite, rows: list[dict], previous: dict | None = None,
                 is_gpu: bool = True) -> str:
    """The rows of one suite; ``previous`` maps (case, provider) to the row compared with."""
    unit = "GB/s" if suite.bound == "memory" else "TFLOP/s"
    metric = "gbps" if suite.bound == "memory" else "tflops"
    # A fraction exists only where the device's peak was measured (GPU runs, see cli._peaks).
    of_peak = any(row.get("frac_of_peak") is not None for row in rows)
    header = ["case", "provider", "ms", "p20-p80 ms", unit, *(["of peak"] if of_peak else []), "mem MiB"]
    if suite.targets and is_gpu:
        header.append("target")
    if previous is not None:
        header.append("time vs last")
    lines, last_case = [], None
    for row in rows:
        cells = [
            row["case"] if row["case"] != last_case else "",
            row["provider"],
            num(row["ms"]),
            f"{num(row['ms_p20'])}-{num(row['ms_p80'])}",
            num(row.get(metric)),
            *([pct(row.get("frac_of_peak"))] if of_peak else []),
            num(row.get("peak_mem_mb")),
        ]
        if suite.targets and is_gpu:
            cells.append(target_mark(suite, row, is_gpu))
        if previous is not None:
            old = previous.get((row["case"], row["provider"]))
            cells.append(pct(time_change(row, old), signed=True) if old else "new")
        if row["case"] != last_case and last_case is not None:
            lines.append(None)  # a blank line between cases
        lines.append(cells)
        last_case = row["case"]
    widths = [max(len(str(c)) for c in col)
              for col in zip(header, *(cells for cells in lines if cells is not None))]
    right = {i for i, h in enumerate(header) if h not in ("case", "provider", "target")}  # numbers

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [fmt(header), fmt(["-" * w for w in widths])]
    out += ["" if cells is None else fmt(cells) for cells in lines]
    return "\n".join(out)


def target_summary(suite: Suite, rows: list[dict], is_gpu: bool) -> list[str]:
    """One line per target: how many rows of its provider reach it, and which do not."""
    lines = []
    for t in suite.targets:
        mine = [r for r in rows if r["provider"] == t.provider and r.get("frac_of_peak") is not None]
        if not mine:
            continue
        if not is_gpu:
            lines.append(f"target ({t.text}): not checked, this is not a GPU run")
            continue
        low = [r for r in mine if r["frac_of_peak"] < t.min_frac]
        lines.append(f"target ({t.text}): {len(mine) - len(low)}/{len(mine)} {t.provider} rows reach "
                     f"{t.min_frac:.0%} of the measured peak")
        lines += [f"  below: {r['case']} at {pct(r['frac_of_peak'])}" for r in low]
    return lines


def speedup_summary(suite: Suite, rows: list[dict], is_gpu: bool) -> list[str]:
    """One line per speedup goal: in how many of its cases the provider reaches the ratio
    over the fastest baseline measured beside it, and the ratios where it does not."""
    by_case: dict[str, dict[str, dict]] = {}
    params = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["provider"]] = r
        params[r["case"]] = r["params"]
    lines = []
    for goal in suite.speedups:
        ratios = {}
        for case, case_rows in by_case.items():
            times = {p: r[goal.metric] for p, r in case_rows.items() if r.get(goal.metric) is not None}
            base = [times[b] for b in goal.baselines if b in times]
            if goal.applies_to(params[case]) and goal.provider in times and base:
                ratios[case] = min(base) / times[goal.provider]
        if not ratios:
            continue
        if not is_gpu:
            lines.append(f"speedup goal ({goal.text}): not checked, this is not a GPU run")
            continue
        low = {c: x for c, x in ratios.items() if x < goal.min_ratio}
        lines.append(f"speedup goal ({goal.text}): {len(ratios) - len(low)}/{len(ratios)} cases reach "
                     f"{goal.min_ratio:g}x the fastest of {', '.join(goal.baselines)}")
        lines += [f"  below: {c} at {x:.2f}x" for c, x in sorted(low.items())]
    return lines


def latency_summary(suite: Suite, rows: list[dict], is_gpu: bool) -> list[str]:
    """One line per latency goal: how many of its provider's rows are within it, and
    the times of those that are not."""
    lines = []
    for goal in suite.latencies:
        mine = [r for r in rows if r["provider"] == goal.provider and goal.applies_to(r["params"])
                and r.get("ms") is not None]
        if not mine:
            continue
        if not is_gpu:
            lines.append(f"latency goal ({goal.text}): not checked, this is not a GPU run")
            continue
        over = [r for r in mine if r["ms"] > goal.max_ms]
        lines.append(f"latency goal ({goal.text}): {len(mine) - len(over)}/{len(mine)} {goal.provider} rows "
                     f"within {num(goal.max_ms)} ms")
        lines += [f"  over: {r['case']} at {num(r['ms'])} ms" for r in over]
    return lines
