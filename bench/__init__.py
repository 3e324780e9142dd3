"""Benchmark suites of mmfast, shipped as ``mmfast.bench``.

``mmfast bench [SUITE...]`` (or ``mmfast.bench.main(argv)``) runs the suites with every
provider side by side and prints time, throughput, fraction of the measured device
peak and peak memory; GPU runs append rows to bench/results/<suite>.jsonl. The same
suites run under pytest-benchmark: ``pytest bench/ --benchmark-json=out.json``.

Layout: suite.py (the Case / Provider / Suite types a suite is written with),
env.py (device, versions, commit), harness.py (timing, input rotation, peaks, rows),
results_io.py (JSONL files, comparison), table.py, plot.py, cli.py, suites/ (one file
per suite, plus the registry). evidence*.py: the staged GPU evidence run of one short
GPU window (scripts/gpu_evidence.sh): plan, stage-1 checks, processes, worker, record files.
"""

from mmfast.bench.cli import main

__all__ = ["main"]
