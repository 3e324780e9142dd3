"""The results table, the speedup verdicts, the per-op breakdown, JSON and the PNG chart.

Every figure is shown with its spread (median, interquartile range q1..q3, min..max, and
the number of samples); a speedup is stated only when the two sides' interquartile
ranges do not overlap, else "no difference measured" with the ranges.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    key: str               # in each side's metrics
    heading: str
    unit: str
    fmt: str
    lower_is_better: bool
    compared: bool = False  # gets a speedup line

    @property
    def better(self) -> str:
        return "lower is better" if self.lower_is_better else "higher is better"


# The first column is the headline: what "speedup" compares, the chart's first panel.
COLUMNS = {
    "vlm": (Column("generate_s", "generate", "s", "{:.4g}", True, True),
            Column("time_to_first_token_s", "time to first token", "s", "{:.4g}", True, True),
            Column("decode_tokens_per_s", "decode", "tok/s", "{:.4g}", False, True),
            Column("prefill_tokens_per_s", "prefill", "tok/s", "{:.4g}", False),
            Column("images_per_s", "images", "/s", "{:.4g}", False),
            Column("peak_memory_gib", "peak memory", "GiB", "{:.3g}", True)),
    "ldm": (Column("end_to_end_s", "end to end", "s", "{:.4g}", True, True),
            Column("denoise_s", "denoising", "s", "{:.4g}", True, True),
            Column("it_per_s", "denoising", "it/s", "{:.4g}", False),
            Column("s_per_image", "per image", "s", "{:.4g}", True),
            # Wan video presets only (mmfast.profile.ldm_wan); a table leaves out what no side has
            Column("step_s", "denoising per step", "s", "{:.4g}", True),
            Column("decode_s", "VAE decode", "s", "{:.4g}", True),
            Column("peak_memory_gib", "peak memory", "GiB", "{:.3g}", True)),
    "sam": (Column("encode_s", "image encoder per batch", "s", "{:.4g}", True, True),
            Column("images_per_s", "image embeddings", "/s", "{:.4g}", False),
            Column("peak_memory_gib", "peak memory", "GiB", "{:.3g}", True)),
}
CHART_KEYS = {"vlm": ("generate_s", "time_to_first_token_s", "decode_tokens_per_s", "prefill_tokens_per_s",
                      "peak_memory_gib"),
              "ldm": ("end_to_end_s", "denoise_s", "it_per_s", "peak_memory_gib"),
              "sam": ("encode_s", "images_per_s", "peak_memory_gib")}


def _span(figure: dict, fmt: str, low: str, high: str) -> str:
    return f"{fmt.format(figure[low])}..{fmt.format(figure[high])}"


def measurement(results: dict) -> str:
    """One line: how the figures were measured and why the measuring stopped."""
    m = results["measurement"]
    why = {"spread": f"every figure's interquartile range within {m['target_spread']:.0%} of its median",
           "budget": f"the {m['time_budget_s']:g} s time budget was spent",
           "max_repeats": f"--max-repeats {m['max_repeats']} reached"}[m["stopped"]]
    return (f"measured: {m['warmup']} warm-up + {m['rounds']} timed rounds ({m['seconds']:.1f} s), each round "
            f"runs every side once in turn (interleaved); stopped: {why}")


def table(results: dict) -> str:
    """One row per figure and side: median, interquartile range, min..max, samples."""
    rows = [["figure", "side", "median", "IQR q1..q3", "min..max", "n"]]
    for column in COLUMNS[results["kind"]]:
        if not any(column.key in side["metrics"] for side in results["sides"]):
            continue  # a figure of another model family (the video figures of Wan)
        for index, side in enumerate(results["sides"]):
            label = f"{column.heading} {column.unit} ({column.better})" if index == 0 else ""
            figure = side["metrics"].get(column.key)
            if figure is None:
                rows.append([label, side["name"], "n/a", "", "", ""])
            else:
                rows.append([label, side["name"], column.fmt.format(figure["median"]),
                             _span(figure, column.fmt, "q1", "q3"), _span(figure, column.fmt, "min", "max"),
                             str(figure["n"])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def verdict(column: Column, ours: dict | None, theirs: dict | None, ratio: dict | None, name: str) -> str:
    """mmfast against one reference side on one figure: a speedup with its spread when the
    interquartile ranges do not overlap, else "no difference measured" with the ranges."""
    what = f"{column.heading} ({column.unit})"
    if ratio is None:
        return f"{what}: n/a (not measured on both sides)"
    spread = f"IQR {ratio['q1']:.2f}..{ratio['q3']:.2f}x, min..max {ratio['min']:.2f}..{ratio['max']:.2f}x"
    if ratio["differs"]:
        faster = "faster" if ratio["median"] > 1 else "slower"
        return f"{what}: mmfast {ratio['median']:.2f}x, {faster} ({spread})"
    return (f"{what}: no difference measured (the spreads overlap: mmfast {_span(ours, column.fmt, 'q1', 'q3')}, "
            f"{name} {_span(theirs, column.fmt, 'q1', 'q3')}; per-round ratio {spread})")


def speedups(results: dict) -> str:
    """Per reference side, mmfast's speedup (or "no difference measured") for each compared
    figure; the first line is the headline."""
    ours = results["sides"][0]["metrics"]
    lines = []
    for side in results["sides"][1:]:
        lines.append(f"mmfast vs {side['name']} (ratios of the same rounds, > 1: mmfast better):")
        for column in COLUMNS[results["kind"]]:
            if column.compared:
                lines.append("  " + verdict(column, ours.get(column.key), side["metrics"].get(column.key),
                                            side["mmfast_speedup"].get(column.key), side["name"]))
    return "\n".join(lines)


def breakdown(results: dict, top: int) -> str:
    lines = []
    unit = "device" if results["device"].startswith("cuda") else "CPU"
    for side in results["sides"]:
        lines.append(f"top ops by self {unit} time, {side['name']}:")
        for row in side["ops"][:top]:
            lines.append(f"  {row['self_ms']:10.3f} ms  {row['calls']:6d} calls  {row['name'][:90]}")
    return "\n".join(lines)


def file_stem(results: dict) -> str:
    """profile_<kind>[_<model>]_<preset or checkpoint folder>: one file set per model and
    preset, so runs of different models do not overwrite each other."""
    source = results["preset"] or "checkpoint-" + os.path.basename(os.path.normpath(results["checkpoint"]))
    parts = ["profile", results["kind"]] + ([results["vlm_model"]] if results["kind"] == "vlm" else []) + [source]
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", part) for part in parts)


def write(results: dict, out_dir: str) -> list[str]:
    """<stem>.json, and <stem>.png when matplotlib is importable, under ``out_dir``;
    returns their absolute paths."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.abspath(os.path.join(out_dir, file_stem(results)))
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=2)
    written = [stem + ".json"]
    chart = _chart(results, stem + ".png")
    if chart:
        written.append(chart)
    return written


COLORS = ("tab:orange", "tab:gray", "tab:blue")


def _chart(results: dict, path: str) -> str | None:
    """The chart (:func:`chart`) as a PNG at ``path``; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure = chart(results)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def chart(results: dict):
    """A matplotlib figure, one panel per figure, the headline first (bold, with the
    verdict): bars at the median, black error bars over the interquartile range, thin grey
    lines over min..max, "n/a" written where a side has no value; each panel says whether
    lower or higher is better, compared panels give the verdict against the first
    reference side."""
    import matplotlib.pyplot as plt

    columns = {column.key: column for column in COLUMNS[results["kind"]]}
    on_gpu = results["device"].startswith("cuda")
    keys = [key for key in CHART_KEYS[results["kind"]] if on_gpu or key != "peak_memory_gib"]  # None on a CPU
    sides = results["sides"]
    names = ["\n".join(textwrap.wrap(side["name"], 14, break_long_words=False)) for side in sides]
    figure, axes = plt.subplots(1, len(keys), figsize=(3.3 * len(keys), 4.2))
    for number, (axis, key) in enumerate(zip(axes, keys)):
        column = columns[key]
        figures = [side["metrics"].get(key) for side in sides]
        # The scale follows the interquartile ranges; a min..max line that goes past it is cut
        # there and labelled, so one outlier does not flatten the bars.
        top = max((f["q3"] for f in figures if f is not None), default=0.0) * 1.6 or 1.0
        for x, f in enumerate(figures):
            if f is None:
                axis.text(x, top * 0.05, "n/a", ha="center", va="bottom", fontsize=12, fontweight="bold",
                          color="tab:red")
                continue
            axis.bar(x, f["median"], color=COLORS[x % len(COLORS)], width=0.6)
            axis.vlines(x, f["min"], min(f["max"], top), color="0.6", linewidth=1, zorder=3)
            if f["max"] > top:
                axis.text(x, top, f"max {column.fmt.format(f['max'])}", ha="center", va="bottom", fontsize=6,
                          color="0.4")
            axis.errorbar(x, f["median"], yerr=[[f["median"] - f["q1"]], [f["q3"] - f["median"]]], fmt="none",
                          ecolor="black", capsize=6, linewidth=1.5, zorder=4)
            axis.text(x + 0.32, f["median"], column.fmt.format(f["median"]), ha="left", va="center", fontsize=7)
        axis.set_xticks(range(len(sides)), names, fontsize=8)
        axis.set_xlim(-0.6, len(sides) - 0.4 + 0.3)
        axis.set_ylim(0, top * 1.1)
        title = f"{column.heading} ({column.unit})\n{column.better}"
        if column.compared and len(sides) > 1:
            title += "\n" + _short_verdict(sides[1]["mmfast_speedup"].get(key))
        axis.set_title(title, fontsize=9, fontweight="bold" if number == 0 else "normal")
        if number == 0:  # the headline
            for spine in axis.spines.values():
                spine.set_linewidth(2)
        axis.tick_params(axis="y", labelsize=7)
    where = f"{results['device_name']}, {results['dtype']}, batch {results['batch']}"
    heading = f"mmfast profile {results['kind']}: {results['model']}\n{where}"
    if not on_gpu:
        heading += "   CPU: not GPU numbers"
    figure.suptitle(heading, fontsize=10, color="black" if on_gpu else "darkred")
    m = results["measurement"]
    figure.text(0.5, 0.01, f"bar: median of {m['rounds']} interleaved rounds; black: interquartile range; "
                "grey: min..max", ha="center", fontsize=7)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    return figure


def _short_verdict(ratio: dict | None) -> str:
    if ratio is None:
        return "speedup n/a"
    spread = f"IQR {ratio['q1']:.2f}..{ratio['q3']:.2f}x"
    if not ratio["differs"]:
        return f"no difference measured\n(ratio {spread})"
    return f"mmfast {ratio['median']:.2f}x, {'faster' if ratio['median'] > 1 else 'slower'}\n({spread})"
