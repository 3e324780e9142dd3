#!/usr/bin/env bash
# diffusers' own scheduler tests (DDIM, Euler, DPM-multistep), run twice: as they are, and
# with every scheduler of those classes given mmfast's fused step right after construction
# (scripts/upstream/diffusers_scheduler_patch_plugin.py). Prints both summaries and the
# tests that fail only when patched (none expected). An extra check beside the project's
# own tests (tests/integrations/test_diffusers_scheduler_grid.py), not a substitute.
#
#   bash scripts/upstream_diffusers_schedulers.sh /path/to/diffusers-checkout [git-ref]
#
# The checkout: a clone of huggingface/diffusers (a git directory or a work tree), the
# test files are read at git-ref (default HEAD); pick the tag of the installed diffusers
# where you can (tests drift between releases: some fail unpatched too, e.g. beta sigmas
# without scipy). MMFAST_UPSTREAM_BACKEND (default torch) picks the scheduler_step backend
# (triton runs under the interpreter on a CPU: slow). Uses the repository's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
source="${1:?usage: $0 /path/to/diffusers-checkout [git-ref]}"
ref="${2:-HEAD}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
files=(tests/__init__.py tests/conftest.py tests/testing_utils.py tests/others/__init__.py tests/others/test_utils.py
       tests/schedulers/__init__.py tests/schedulers/test_schedulers.py tests/schedulers/test_scheduler_ddim.py
       tests/schedulers/test_scheduler_euler.py tests/schedulers/test_scheduler_dpm_multi.py)
git -C "$source" archive "$ref" "${files[@]}" | tar -x -C "$work"
cp scripts/upstream/diffusers_scheduler_patch_plugin.py "$work/"
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}" MMFAST_UPSTREAM_BACKEND="${MMFAST_UPSTREAM_BACKEND:-torch}"
run() {  # $1: plain | patched
    local plugin=()
    [[ $1 == patched ]] && plugin=(-p diffusers_scheduler_patch_plugin)
    (cd "$work" && PYTHONPATH="$work" "$repo/.venv/bin/python" -m pytest -q -p no:cacheprovider "${plugin[@]}" \
        -W ignore -rf tests/schedulers/test_scheduler_ddim.py tests/schedulers/test_scheduler_euler.py \
        tests/schedulers/test_scheduler_dpm_multi.py 2>&1 || true) |
        grep -E '^FAILED|^ERROR|[0-9]+ (passed|failed)' | sed 's/ - .*//' > "$work/$1.txt"
    echo "$1: $(tail -n 1 "$work/$1.txt")"
}
run plain
run patched
only_patched="$(comm -13 <(grep -E '^(FAILED|ERROR)' "$work/plain.txt" | sort) \
                         <(grep -E '^(FAILED|ERROR)' "$work/patched.txt" | sort))"
if [[ -n $only_patched ]]; then
    echo "failing only when patched:"
    echo "$only_patched"
    exit 1
fi
echo "no test fails only when patched"
