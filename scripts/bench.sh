#!/usr/bin/env bash
# Set up .venv (see scripts/setup.sh) and run the benchmark suites; extra arguments go to
# `mmfast bench` (default: --quick). Timings mean something only on a CUDA device.
#
#   bash scripts/bench.sh                # every suite, quick
#   bash scripts/bench.sh norm           # one suite, full sizes
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [[ $# -eq 0 ]]; then
    set -- --quick
fi
exec .venv/bin/mmfast bench "$@"
