#!/usr/bin/env bash
# On a lent GPU machine: build the CUDA C++ ops of csrc/ (timed: a cold build should take
# under a minute), run the GPU tests of the cuda backends next to the Triton ones, and run
# compute-sanitizer (memcheck, racecheck) over small calls of every kernel path.
# Logs go to $OUT when it is set (the device tool brings them back), else /tmp/mmfast-gpu.
#
#   bash scripts/gpu_check_csrc.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/mmfast-gpu}"
mkdir -p "$out"
# A fresh cache, outside the repository, so the build below is a cold one.
export MMFAST_CUDA_CACHE="${MMFAST_CUDA_CACHE:-$(mktemp -d /tmp/mmfast-csrc.XXXXXX)}"

python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
python3 -m mmfast info | tee "$out/info.txt"

start=$(date +%s)
MMFAST_CUDA_VERBOSE=1 python3 - <<'PY' 2>&1 | tee "$out/csrc_build.log"
import logging, torch
from mmfast.cuda import build
logging.basicConfig(level=logging.INFO)
device = torch.device("cuda")
print("loaded" if build.load(device) else f"NOT BUILT: {build.unavailable_reason(device)}")
PY
echo "cold build + load: $(( $(date +%s) - start )) s" | tee -a "$out/csrc_build.log"

python3 -m pytest tests/cuda tests/ops/test_norm.py tests/ops/test_group_norm.py tests/test_tuning.py -q -rs --durations=15 \
    2>&1 | tee "$out/csrc_tests.log"
tests_rc=${PIPESTATUS[0]}

sanitizer="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
san_rc=0
if [[ -x "$sanitizer" ]]; then
    for module in test_norm_cuda test_group_norm_cuda test_scheduler_step_cuda test_attention_cuda; do
        for tool in memcheck racecheck; do
            log="$out/sanitizer_${module}_$tool.log"
            "$sanitizer" --tool "$tool" --error-exitcode 1 python3 -m "tests.cuda.$module" > "$log" 2>&1
            rc=$?
            echo "compute-sanitizer $tool on $module: exit $rc" | tee -a "$log"
            tail -n 5 "$log"
            san_rc=$(( san_rc || rc ))
        done
    done
else
    echo "compute-sanitizer not found: sanitizer checks not run" | tee "$out/sanitizer.log"
    san_rc=1
fi

echo "tests exit $tests_rc, sanitizer exit $san_rc"
exit $(( tests_rc || san_rc ))
