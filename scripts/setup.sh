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
# On a terminal pip shows its own progress (one line per package, download bars); in a log
# (CI) only its errors: -qq, as a misconfigured extra index floods warnings.
if [[ -t 1 ]]; then
    pip=("$python" -m pip --disable-pip-version-check --progress-bar on)
else
    pip=("$python" -m pip --disable-pip-version-check -qq)
fi
constraints=(-c scripts/constraints.txt)

# One line as each step starts (with how long it usually takes) and one when it ends, so a
# first run, which downloads for minutes, is never silent.
steps=3
step() {  # step N "what" "usual duration"
    step_started=$SECONDS
    echo "setup: [$1/$steps] $2 ($3) ..." >&2
}
step_done() {  # step_done N
    echo "setup: [$1/$steps] done in $((SECONDS - step_started)) s" >&2
}

if [[ ! -x "$python" ]]; then
    step 1 "creating $venv" "seconds"
    "${MMFAST_PYTHON:-python3}" -m venv "$venv"
    step_done 1
else
    echo "setup: [1/$steps] $venv exists" >&2
fi

torch_version() { "$python" -W ignore -c "import torch; print(torch.__version__)" 2>/dev/null || true; }

installed_torch="$(torch_version)"
if [[ -z "$installed_torch" ]]; then
    read -ra torch_spec <<< "${MMFAST_TORCH_SPEC:-torch==2.13.0 triton==3.9.0}"
    # Measured: 138 s for the CPU build with triton (some 500 MB of wheels, 1.7 GB installed)
    # on a busy 2-core machine, the wheels on local disk.
    step 2 "installing ${torch_spec[*]}" "first time: some 500 MB of wheels, a few minutes"
    "${pip[@]}" install "${constraints[@]}" "${torch_spec[@]}"
    step_done 2
else
    echo "setup: [2/$steps] torch $installed_torch is installed" >&2
fi

# Reinstall mmfast only when its packaging or the pins changed since the last setup
# (delete .venv/.mmfast-installed to force it).
stamp="$venv/.mmfast-installed"
wanted="$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$wanted" ]]; then
    # Measured: 213 s on a busy 2-core machine (about 60 packages, on local disk).
    step 3 "installing mmfast (editable) with its test and bench extras: transformers, diffusers, ..." \
        "first time: about 60 packages, a few minutes"
    torch_before="$(torch_version)"
    "${pip[@]}" install "${constraints[@]}" -e '.[test,bench]'
    torch_after="$(torch_version)"
    if [[ "$torch_before" != "$torch_after" ]]; then
        echo "setup: installing mmfast replaced torch $torch_before with $torch_after" >&2
        exit 1
    fi
    echo "$wanted" > "$stamp"
    step_done 3
else
    echo "setup: [3/$steps] mmfast is installed (pyproject.toml and the pins unchanged)" >&2
fi
