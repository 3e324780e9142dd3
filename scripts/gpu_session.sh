#!/usr/bin/env bash
# One call on a lent GPU machine: install mmfast into the machine's own Python (its torch
# is a CUDA build; nothing can be downloaded there), run the GPU test suite (bf16
# included), then the benchmark suites, saving rows and plots under bench/results/.
# Logs and results are copied to $OUT when it is set (the device tool brings them back).
#
#   bash scripts/gpu_session.sh               # tests, then every suite at full sizes
#   bash scripts/gpu_session.sh norm --quick  # tests, then the given `mmfast bench` args
#
# Optional wheels (xformers, flash-attn-4, liger-kernel, diffusers) carried in .whl/ are
# installed first: see the device tool's README for how to download them.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/mmfast-gpu}"
mkdir -p "$out"

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1

python3 -m mmfast info | tee "$out/info.txt"
python3 -m pytest tests -q -rs --durations=15 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}

python3 -m mmfast bench "$@" 2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}

# Results come back as at most a few files: the JSONL rows and the plots, packed.
tar -czf "$out/results.tgz" bench/results
echo "tests exit $tests_rc, bench exit $bench_rc"
exit $(( tests_rc || bench_rc ))
