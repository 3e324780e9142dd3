"""scripts/setup.sh says what it does at every step, with a stand-in python and pip (nothing
is installed): a line as each step starts and its time when it ends, and one line per step
already done on a second run."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A python3 stand-in: `-m venv DIR` makes DIR/bin/python (itself); `-m pip ...` logs its
# arguments and "installs" torch; `-c` prints torch's version once torch is installed.
FAKE_PYTHON = """#!/usr/bin/env bash
here="$(cd "$(dirname "$0")" && pwd)"
if [[ "$1" == "-m" && "$2" == "venv" ]]; then
    mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && exit 0
fi
if [[ "$1" == "-m" && "$2" == "pip" ]]; then
    echo "$*" >> "$here/pip.log" && touch "$here/torch-installed" && exit 0
fi
[[ -f "$here/torch-installed" ]] && echo "2.13.0+cpu" && exit 0
exit 1
"""


@pytest.fixture
def checkout(tmp_path):
    if shutil.which("bash") is None or shutil.which("sha256sum") is None:
        pytest.skip("needs bash and sha256sum")
    (tmp_path / "scripts").mkdir()
    for name in ("scripts/setup.sh", "scripts/constraints.txt", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return tmp_path


def run_setup(checkout):
    env = {**os.environ, "MMFAST_PYTHON": str(checkout / "python3")}
    env.pop("MMFAST_TORCH_SPEC", None)
    done = subprocess.run(["bash", "scripts/setup.sh"], cwd=checkout, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)
    assert done.returncode == 0, done.stderr
    return [line for line in done.stderr.splitlines() if line.startswith("setup: ")]


def test_first_run_reports_each_step_start_and_time(checkout):
    lines = run_setup(checkout)
    assert len(lines) == 6, lines
    for step, (started, finished) in enumerate(zip(lines[::2], lines[1::2]), start=1):
        assert started.startswith(f"setup: [{step}/3] ") and started.endswith(") ...")
        assert finished.startswith(f"setup: [{step}/3] done in ") and finished.endswith(" s")
    assert "torch==2.13.0 triton==3.9.0" in lines[2] and "a few minutes" in lines[2]
    assert "mmfast" in lines[4]
    pip_calls = (checkout / ".venv" / "bin" / "pip.log").read_text().splitlines()
    assert len(pip_calls) == 2 and all("-qq" in call for call in pip_calls)  # not a terminal: errors only


def test_second_run_says_what_is_already_there(checkout):
    run_setup(checkout)
    lines = run_setup(checkout)
    assert [line[:14] for line in lines] == ["setup: [1/3] .", "setup: [2/3] t", "setup: [3/3] m"], lines
    assert "2.13.0+cpu" in lines[1]
    assert len((checkout / ".venv" / "bin" / "pip.log").read_text().splitlines()) == 2  # no new install
