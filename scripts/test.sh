#!/usr/bin/env bash
# Set up .venv (see scripts/setup.sh) and run the test suite; extra arguments go to pytest.
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh tests/ops -x    # a part
#
# Without a CUDA device, Triton kernels run under the Triton interpreter (tests/conftest.py
# sets TRITON_INTERPRET=1); tests marked `gpu` are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One worker process per core (pytest-xdist), handed tests as they free up: the suite's
# durations are uneven (a few tests take 10-50 s). `-n 0` as an argument runs in one process.
exec .venv/bin/python -m pytest -q -n auto --dist worksteal "$@"  # no path: pyproject's testpaths (tests/)
