#!/usr/bin/env bash
# The supported version range, checked: runs mmfast's integration and model tests against
# the oldest supported and the newest available transformers / diffusers (and the Triton of
# the GPU machines), each row in a throwaway venv, and prints a matrix (Markdown).
#
#   bash scripts/compat.sh                       # every row
#   bash scripts/compat.sh oldest newest         # some rows
#   MMFAST_COMPAT_TESTS="tests/integrations" bash scripts/compat.sh oldest
#
# Rows (each also runs the kernel tests when it changes triton):
#   oldest   transformers 5.17.0, diffusers 0.40.0, triton 3.6.0: the GPU machines' versions
#            of transformers and triton (they carry no diffusers), on the CPU torch; numpy
#            below 2.4, which triton 3.6's interpreter needs (it turns 1-element arrays into
#            ints, which numpy 2.4 refuses; compiled kernels on a GPU are not affected)
#   pinned   scripts/constraints.txt: what CI runs
#   newest   the newest releases of transformers, diffusers, triton and their dependencies
#
# Environment: MMFAST_PYTHON (interpreter, default python3), MMFAST_TORCH_SPEC (default
# torch==2.13.0), MMFAST_COMPAT_TESTS (test paths of every row), MMFAST_COMPAT_DIR (where
# venvs and reports go; default a temporary folder, removed at the end).
# Needs the package registry; nothing else is touched (the repository's .venv stays as it is).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

declare -A specs=(
    [oldest]="transformers==5.17.0 diffusers==0.40.0 triton==3.6.0 numpy<2.4"
    [pinned]="-c scripts/constraints.txt triton==3.9.0"
    [newest]="--upgrade --upgrade-strategy eager transformers diffusers triton"
)
declare -A kernel_tests=([oldest]="tests/ops tests/nn" [pinned]="" [newest]="tests/ops tests/nn")
rows=("$@")
[[ ${#rows[@]} -gt 0 ]] || rows=(oldest pinned newest)
tests="${MMFAST_COMPAT_TESTS:-tests/integrations tests/models tests/test_packaging.py}"

work="${MMFAST_COMPAT_DIR:-$(mktemp -d)}"
mkdir -p "$work"
[[ -n "${MMFAST_COMPAT_DIR:-}" ]] || trap 'rm -rf "$work"' EXIT

table="| row | torch | triton | transformers | diffusers | kernels (HF) | tests | passed | failed | errors | skipped | minutes |"
table+=$'\n'"|---|---|---|---|---|---|---|---|---|---|---|---|"
for row in "${rows[@]}"; do
    [[ -n "${specs[$row]+set}" ]] || { echo "compat: unknown row $row (oldest, pinned, newest)" >&2; exit 2; }
    venv="$work/$row/venv"
    python="$venv/bin/python"
    pip=("$python" -m pip --disable-pip-version-check -qq)
    echo "compat: $row: building $venv" >&2
    rm -rf "$venv"
    "${MMFAST_PYTHON:-python3}" -m venv "$venv"
    read -ra torch_spec <<< "${MMFAST_TORCH_SPEC:-torch==2.13.0}"
    read -ra row_spec <<< "${specs[$row]}"
    "${pip[@]}" install "${torch_spec[@]}"
    # Editable, as scripts/setup.sh installs it: tests run from the clone import its sources.
    "${pip[@]}" install -e '.[test,bench]' "${torch_spec[@]}" "${row_spec[@]}"
    versions="$("$python" - <<'EOF'
from importlib.metadata import PackageNotFoundError, version
def v(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"
print(" | ".join(v(n) for n in ("torch", "triton", "transformers", "diffusers", "kernels")))
EOF
)"
    read -ra paths <<< "$tests ${kernel_tests[$row]}"
    echo "compat: $row: $versions: pytest ${paths[*]}" >&2
    start=$SECONDS
    # The tests may fail: the matrix says so; the script goes on to the next row.
    (cd "$repo" && "$python" -m pytest -q -p no:cacheprovider "${paths[@]}" \
        --junitxml="$work/$row/junit.xml" > "$work/$row/pytest.log" 2>&1) || true
    minutes=$(( (SECONDS - start + 30) / 60 ))
    counts="$("$python" - "$work/$row/junit.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET
try:
    suites = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print("? | ? | ? | ?"); raise SystemExit
suites = [suites] if suites.tag == "testsuite" else list(suites)
total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
print(f"{passed} | {total['failures']} | {total['errors']} | {total['skipped']}")
EOF
)"
    tail -n 3 "$work/$row/pytest.log" >&2
    table+=$'\n'"| $row | $versions | ${paths[*]} | $counts | $minutes |"
done
echo
echo "$table"
