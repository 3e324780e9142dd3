"""PNG plots of one suite's rows: throughput against ``suite.plot_x``, one line per
provider, one panel per value of ``suite.plot_panels``, the measured peak as a dashed
line. matplotlib is imported here only, and only when a plot is asked for."""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

from mmfast.bench.env import Env
from mmfast.bench.suite import Suite


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "device"


def plot_path(out_dir: Path, suite: str, gpu: str) -> Path:
    # One file per suite and GPU, overwritten by each run: the latest picture.
    return Path(out_dir) / "plots" / f"{suite}_{_slug(gpu)}.png"


def plot_suite(suite: Suite, rows: list[dict], peak: float | None, env: Env, out_dir: Path) -> Path | None:
    """Write the plot for ``rows`` and return its path (None when there is nothing to plot)."""
    metric, unit = ("gbps", "GB/s") if suite.bound == "memory" else ("tflops", "TFLOP/s")
    rows = [r for r in rows if r.get(metric) is not None and suite.plot_x in r["params"]]
    if not rows:
        return None
    # Figure without pyplot: no global state, no GUI backend, safe in any process.
    from matplotlib.figure import Figure

    def panel_key(row):
        return tuple(row["params"].get(k) for k in suite.plot_panels)

    # Values of one parameter share a type, so tuples sort naturally (64 before 256).
    panels = sorted({panel_key(r) for r in rows}, key=lambda key: [(v is None, v) for v in key])
    xticks = sorted({r["params"][suite.plot_x] for r in rows})
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, key in zip(axes, panels):
        for provider in providers:
            points = sorted((r["params"][suite.plot_x], r[metric]) for r in rows
                            if r["provider"] == provider and panel_key(r) == key)
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=provider)
        if peak:
            ax.axhline(peak, linestyle="--", color="grey", linewidth=1, label="measured peak")
        title = ", ".join(f"{k}={v}" for k, v in zip(suite.plot_panels, key))
        ax.set_title(textwrap.fill(title, 45), fontsize=8)
        ax.set_xlabel(suite.plot_x)
        if all(isinstance(x, (int, float)) for x in xticks):
            ax.set_xticks(xticks)
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    title = f"{suite.name} on {env.gpu}  (commit {env.commit}, {env.run_id})"
    if not env.is_gpu:
        title += "\nCPU SMOKE RUN: NOT GPU NUMBERS"
    fig.suptitle(title, fontsize=11)
    path = plot_path(out_dir, suite.name, env.gpu)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
