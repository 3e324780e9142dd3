"""Every CUDA C++ source in csrc/ compiles, on a machine without a GPU: the CI check.

Kernel files (*.cu) go through nvcc for sm_90a to object files, with ptxas turning a
register spill into an error; torch bindings (*.cpp) through the host compiler against
the installed torch's headers (a CPU build of torch is enough: the bindings include no
CUDA header). All compiles run at once, into a temporary directory: nothing is cached in
the repository, and the wall time is that of the slowest file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
KERNELS = sorted(p.name for p in CSRC.glob("*.cu"))
BINDINGS = sorted(p.name for p in CSRC.glob("*.cpp"))
TIMEOUT_S = 240


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


def _commands(out: Path) -> dict[str, list[str] | str]:
    """File name -> compile command, or the reason it cannot be compiled here."""
    commands: dict[str, list[str] | str] = {}
    nvcc = _nvcc()
    for name in KERNELS:
        commands[name] = [
            nvcc, "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a",
            "-Xptxas=-warn-spills,-Werror", "-I", str(CSRC), "-c", str(CSRC / name),
            "-o", str(out / f"{name}.o"),
        ] if nvcc else "nvcc not found (set CUDA_HOME)"
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    from torch.utils.cpp_extension import include_paths

    includes = [flag for path in include_paths() for flag in ("-I", path)]
    for name in BINDINGS:
        commands[name] = [
            cxx, "-std=c++20", "-fsyntax-only", *includes, "-I", str(CSRC), str(CSRC / name),
        ] if cxx else "no host C++ compiler"
    return commands


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, tuple[int, str] | str]:
    """Compile everything in parallel; file name -> (exit code, output) or a skip reason."""
    commands = _commands(tmp_path_factory.mktemp("csrc-objects"))
    running = {
        name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, cmd in commands.items() if not isinstance(cmd, str)
    }
    results: dict[str, tuple[int, str] | str] = {n: c for n, c in commands.items() if isinstance(c, str)}
    for name, process in running.items():
        output, _ = process.communicate(timeout=TIMEOUT_S)
        results[name] = (process.returncode, output)
    return results


def test_csrc_has_sources():
    assert "norm.cu" in KERNELS and "norm_ops.cpp" in BINDINGS


@pytest.mark.parametrize("name", KERNELS + BINDINGS)
def test_compiles(name, compiled):
    result = compiled[name]
    if isinstance(result, str):
        pytest.skip(result)
    code, output = result
    assert code == 0, f"{name} does not compile:\n{output[-6000:]}"
