"""The files of the GPU evidence run: at most 8 (the device tool brings back 8), flat,
written as the run goes so that a run killed at its limit still leaves them.

    summary.json    source key, runs (device, stage budgets and use), every item's status
    checks.jsonl    stage 1: one row per check (errors vs float64, eager's, the bound)
    bench.jsonl     device peaks and benchmark rows (mmfast.bench.harness format)
    tests.jsonl     one row per GPU test (node id, outcome, seconds, message)
    evidence.log    everything the workers printed

The record of a source key lives in ``bench/results/evidence/<key>/``; a run merges it
into its output folder first, so the output folder always holds the whole record and
replaces the recorded folder as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

FILES = ("summary.json", "checks.jsonl", "bench.jsonl", "tests.jsonl", "evidence.log")
MAX_FILES = 8
# The device tool brings back files of at most 16 MiB; the log stops short of that.
LOG_LIMIT_BYTES = 12 << 20
# Statuses after which an item is not run again on the same source.
FINAL = ("ok", "fail", "error", "crash", "timeout")


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class Record:
    """The output folder of one run: appends rows, keeps the summary current."""

    def __init__(self, out: Path, key: str, commit: str):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.key, self.commit = key, commit
        self._lock = threading.Lock()
        self.summary = {"source": key, "commit": commit, "runs": [], "items": {}}
        existing = self._load_summary(self.out)
        if existing is not None:
            if existing.get("source") != key:
                raise ValueError(f"--out: {self.out} holds results of source {existing.get('source')}, "
                                 f"not {key}; give an empty folder")
            self.summary.update(runs=existing.get("runs", []), items=existing.get("items", {}))
        self._log_bytes = (self.out / "evidence.log").stat().st_size if (self.out / "evidence.log").is_file() else 0

    @staticmethod
    def _load_summary(folder: Path) -> dict | None:
        path = Path(folder) / "summary.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return None

    def merge_from(self, recorded: Path) -> int:
        """Take in what an earlier run of this source recorded in ``recorded`` (its rows,
        its item statuses, its runs); returns how many final items it holds."""
        recorded = Path(recorded)
        if recorded.resolve() == self.out.resolve():
            return sum(1 for i in self.summary["items"].values() if i["status"] in FINAL)
        earlier = self._load_summary(recorded)
        if earlier is None or earlier.get("source") != self.key:
            return 0
        for name in FILES[1:]:
            src, dst = recorded / name, self.out / name
            if src.is_file():
                text = src.read_text(encoding="utf-8")
                mine = dst.read_text(encoding="utf-8") if dst.is_file() else ""
                if text not in mine:
                    dst.write_text(text + mine, encoding="utf-8")
        self._log_bytes = (self.out / "evidence.log").stat().st_size if (self.out / "evidence.log").is_file() else 0
        runs = {r["run_id"]: r for r in earlier.get("runs", []) + self.summary["runs"]}
        self.summary["runs"] = sorted(runs.values(), key=lambda r: r["run_id"])
        self.summary["items"] = {**earlier.get("items", {}), **self.summary["items"]}
        self.write_summary()
        return sum(1 for i in self.summary["items"].values() if i["status"] in FINAL)

    # ---- writing -------------------------------------------------------------------

    def append(self, name: str, rows: list[dict]) -> None:
        if not rows:
            return
        with self._lock, (self.out / name).open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")
            f.flush()

    def log(self, text: str) -> None:
        if not text:
            return
        with self._lock:
            data = text.encode("utf-8", "replace")
            if self._log_bytes >= LOG_LIMIT_BYTES:
                return
            if self._log_bytes + len(data) > LOG_LIMIT_BYTES:
                data = data[:LOG_LIMIT_BYTES - self._log_bytes] + b"\n[log truncated: size limit]\n"
            with (self.out / "evidence.log").open("ab") as f:
                f.write(data)
            self._log_bytes += len(data)

    def set_item(self, item_id: str, **fields) -> None:
        with self._lock:
            self.summary["items"][item_id] = fields
        self.write_summary()

    def status(self, item_id: str) -> str | None:
        entry = self.summary["items"].get(item_id)
        return entry["status"] if entry else None

    def is_final(self, item_id: str) -> bool:
        return self.status(item_id) in FINAL

    def write_summary(self) -> None:
        with self._lock:
            tmp = self.out / "summary.json.tmp"
            tmp.write_text(json.dumps(self.summary, indent=1, default=str), encoding="utf-8")
            os.replace(tmp, self.out / "summary.json")

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())


def collect(src: Path, results: Path, commit: str | None = None) -> Path:
    """Put the files a device run brought back (``src``) where the record of their source
    lives, ``results/evidence/<key>/``, and append their benchmark rows that are not
    there yet to ``results/<suite>.jsonl`` (what ``mmfast bench --compare`` reads).
    ``commit``: the commit to name in the summary where the run could not (no .git)."""
    from mmfast.bench import results_io

    summary = Record._load_summary(Path(src))
    if summary is None or not summary.get("source"):
        raise ValueError(f"{src}: no summary.json of an evidence run")
    dest = Path(results) / "evidence" / summary["source"]
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (Path(src) / name).is_file() and Path(src).resolve() != dest.resolve():
            shutil.copyfile(Path(src) / name, dest / name)
    if commit and summary.get("commit") in (None, "unknown"):
        # The device machine has no .git: name the commit here, where the source matches.
        summary["commit"] = commit
        (dest / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    by_suite: dict[str, list[dict]] = {}
    for row in read_jsonl(dest / "bench.jsonl"):
        if row.get("ms") is not None and row.get("suite") and not row.get("smoke"):
            by_suite.setdefault(row["suite"], []).append(row)
    for suite, rows in by_suite.items():
        have = {(r.get("run_id"), r.get("case"), r.get("provider")) for r in results_io.load_rows(results, suite)}
        new = [r for r in rows if (r.get("run_id"), r.get("case"), r.get("provider")) not in have]
        if new:
            results_io.append_rows(results, suite, new)
    return dest
