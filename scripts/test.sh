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
exec .venv/bin/python -m pytest -q "$@"  # no path given: pyproject's testpaths (tests/)
