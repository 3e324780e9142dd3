"""The results table, the per-op breakdown, JSON and the PNG chart."""

from __future__ import annotations

import json
import os

# (key, column heading, unit format); the first one is what "speedup" compares.
VLM_COLUMNS = (("images_per_s", "images/s", "{:.2f}"), ("prefill_tokens_per_s", "prefill tok/s", "{:.0f}"),
               ("time_to_first_token_s", "TTFT s", "{:.4f}"), ("decode_tokens_per_s", "decode tok/s", "{:.1f}"),
               ("peak_memory_gib", "peak GiB", "{:.2f}"))
LDM_COLUMNS = (("it_per_s", "it/s", "{:.2f}"), ("s_per_image", "s/image", "{:.4f}"),
               ("peak_memory_gib", "peak GiB", "{:.2f}"))


def _cell(value, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def table(results: dict) -> str:
    columns = VLM_COLUMNS if results["kind"] == "vlm" else LDM_COLUMNS
    basis = results["speedup_basis"].split()[-1]
    header = ["side"] + [heading for _, heading, _ in columns] + ["mmfast speedup"]
    rows = [header]
    for side in results["sides"]:
        speedup = side.get("mmfast_speedup", {}).get(basis)
        rows.append([side["name"]] + [_cell(side["metrics"].get(key), fmt) for key, _, fmt in columns]
                    + ["-" if speedup is None else f"{speedup:.2f}x"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def speedups(results: dict) -> str:
    """One line per reference side: mmfast's speedup over it for each timed quantity."""
    from mmfast.profile import SPEEDUP_KEYS

    return "\n".join(
        f"mmfast vs {side['name']}: " + ", ".join(f"{SPEEDUP_KEYS[key]} {ratio:.2f}x"
                                                  for key, ratio in side["mmfast_speedup"].items())
        for side in results["sides"][1:])


def breakdown(results: dict, top: int) -> str:
    lines = []
    unit = "device" if results["device"].startswith("cuda") else "CPU"
    for side in results["sides"]:
        lines.append(f"top ops by self {unit} time, {side['name']}:")
        for row in side["ops"][:top]:
            lines.append(f"  {row['self_ms']:10.3f} ms  {row['calls']:6d} calls  {row['name'][:90]}")
    return "\n".join(lines)


def write(results: dict, out_dir: str) -> list[str]:
    """results.json, and profile.png when matplotlib is importable; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"profile_{results['kind']}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    written = [path]
    chart = _chart(results, os.path.join(out_dir, f"profile_{results['kind']}.png"))
    if chart:
        written.append(chart)
    return written


def _chart(results: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    columns = [c for c in (VLM_COLUMNS if results["kind"] == "vlm" else LDM_COLUMNS) if c[0] != "peak_memory_gib"]
    figure, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.2))
    for axis, (key, heading, _) in zip(axes, columns):
        names = [side["name"].split(" ")[0] + (" + compile" if "torch.compile" in side["name"] else "")
                 for side in results["sides"]]
        values = [side["metrics"].get(key) or 0.0 for side in results["sides"]]
        axis.bar(names, values, color=["tab:orange"] + ["tab:gray", "tab:blue"][:len(names) - 1])
        axis.set_title(heading)
    figure.suptitle(f"mmfast profile {results['kind']}: {results['model']} on {results['device_name']}"
                    + ("" if results["device"].startswith("cuda") else " (CPU, not GPU numbers)"), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
