#!/usr/bin/env bash
# The GPU evidence run: ONE command of at most 8 minutes on a lent GPU machine, staged by
# value (1: every kernel family vs float64 in bf16/fp16, CUDA C++ built and checked;
# 2: device peaks and each suite's headline case with its baselines; 3: pytest -m gpu,
# then the other bench cases), results written to the output folder as it goes (at most
# 8 files). Items an earlier run recorded for the same source are skipped; the last lines
# say what did not run. Nothing to install: mmfast runs from this tree with python3.
#
#   bash scripts/gpu_evidence.sh                      # output: $OUT if set, else bench/results/evidence/<key>
#   bash scripts/gpu_evidence.sh --out DIR --total 300
#   bash scripts/gpu_evidence.sh --collect DIR        # here, after a device run: file DIR under bench/results
#   bash scripts/gpu_evidence.sh --dry-run --out DIR  # CPU: fake clock, tiny shapes (a test runs this)
#
# Wheels carried in .whl/ (flash-attn, xformers, ...) are installed first, into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# The run's clock starts now, before the wheels are installed.
export MMFAST_EVIDENCE_T0="${MMFAST_EVIDENCE_T0:-$(date +%s.%N)}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "${MMFAST_PYTHON:-python3}" scripts/gpu_evidence.py "$@"
