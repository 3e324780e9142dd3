#!/usr/bin/env bash
# Make .venv ready to run mmfast's tests and benchmarks; safe to run again.
#
#   bash scripts/setup.sh
#
# Environment:
#   MMFAST_PYTHON      interpreter that creates .venv (default: python3)
#   MMFAST_TORCH_SPEC  what `pip install` gets when .venv has no torch yet (default:
#                      torch==2.13.0, the CPU build on the CPU machines' disk, with triton 3.9.0).
#                      Words are passed to pip as they are, so an index can be given too:
#                      MMFAST_TORCH_SPEC="torch==2.11.0 --index-url https://download.pytorch.org/whl/cu130"
#
# torch is installed on its own, pinned, before mmfast: a bare `torch` requirement would
# pull a multi-gigabyte CUDA build. mmfast asks only for torch>=2.4, which the torch
# already installed satisfies, so installing mmfast never replaces it. Everything else is
# held to the versions in scripts/constraints.txt, so that CI is reproducible.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
python="$venv/bin/python"
# -qq: errors only (a misconfigured extra index floods warnings).
pip=("$python" -m pip --disable-pip-version-check -qq)
constraints=(-c scripts/constraints.txt)

if [[ ! -x "$python" ]]; then
    echo "setup: creating $venv" >&2
    "${MMFAST_PYTHON:-python3}" -m venv "$venv"
fi

if ! "$python" -c "import torch" 2>/dev/null; then
    read -ra torch_spec <<< "${MMFAST_TORCH_SPEC:-torch==2.13.0 triton==3.9.0}"
    echo "setup: installing ${torch_spec[*]}" >&2
    "${pip[@]}" install "${constraints[@]}" "${torch_spec[@]}"
fi

# Reinstall mmfast only when its packaging or the pins changed since the last setup
# (delete .venv/.mmfast-installed to force it).
stamp="$venv/.mmfast-installed"
wanted="$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$wanted" ]]; then
    echo "setup: installing mmfast (editable) with its test and bench extras" >&2
    torch_before="$("$python" -W ignore -c "import torch; print(torch.__version__)")"
    "${pip[@]}" install "${constraints[@]}" -e '.[test,bench]'
    torch_after="$("$python" -W ignore -c "import torch; print(torch.__version__)")"
    if [[ "$torch_before" != "$torch_after" ]]; then
        echo "setup: installing mmfast replaced torch $torch_before with $torch_after" >&2
        exit 1
    fi
    echo "$wanted" > "$stamp"
fi
