"""Every CUDA C++ source in csrc/ compiles, on a machine without a GPU: the CI check.

Kernel files (*.cu) go through nvcc for sm_90a to object files, with ptxas turning a
register spill into an error; torch bindings (*.cpp) through the host compiler against
the installed torch's headers (a CPU build of torch is enough: the bindings include no
CUDA header). All compiles run at once, into a temporary directory: nothing is cached in
the repository, and the wall time is that of the slowest file.

The objects are then linked into the library mmfast.cuda.build would load, against the
CPU torch and the toolkit's cudart, and loaded in a fresh interpreter: every op schema
must parse and every fake must register. Only running a kernel needs a GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmfast.cuda import build

CSRC = Path(__file__).resolve().parents[2] / "csrc"
KERNELS = sorted(p.name for p in CSRC.glob("*.cu"))
BINDINGS = sorted(p.name for p in CSRC.glob("*.cpp"))
# What torch.utils.cpp_extension passes nvcc in the real build: no implicit half/bf16
# operators or conversions, so kernels must use the explicit intrinsics.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
UNITY = "bindings (" + " + ".join(BINDINGS) + ")"
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
            nvcc, "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-Xcompiler=-fPIC",
            *TORCH_NVCC_DEFINES,
            "-Xptxas=-warn-spills,-Werror", "-I", str(CSRC), "-c", str(CSRC / name),
            "-o", str(out / f"{name}.o"),
        ] if nvcc else "nvcc not found (set CUDA_HOME)"
    cxx = _cxx()
    from torch.utils.cpp_extension import include_paths

    includes = [flag for path in include_paths() for flag in ("-I", path)]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    # One translation unit for every binding: torch's headers are parsed once, not once
    # per file (the slowest part of the check). Compiler messages still name the file.
    unity = out / "bindings.cpp"
    unity.write_text("".join(f'#include "{name}"\n' for name in BINDINGS))
    commands[UNITY] = [
        cxx, "-std=c++20", "-O0", "-fPIC", abi, *includes, "-I", str(CSRC), "-c", str(unity),
        "-o", str(out / "bindings.o"),
    ] if cxx else "no host C++ compiler"
    return commands


def _cxx() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


@pytest.fixture(scope="module")
def objects(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("csrc-objects")


@pytest.fixture(scope="module")
def compiled(objects) -> dict[str, tuple[int, str] | str]:
    """Compile everything in parallel; file name -> (exit code, output) or a skip reason."""
    commands = _commands(objects)
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


@pytest.mark.parametrize("name", KERNELS + [UNITY])
def test_compiles(name, compiled):
    result = compiled[name]
    if isinstance(result, str):
        pytest.skip(result)
    code, output = result
    assert code == 0, f"{name} does not compile:\n{output[-6000:]}"


_LOAD = """
import importlib, json, sys, torch
torch.ops.load_library(sys.argv[1])
from mmfast.cuda import build
for module in build.OP_MODULES:
    importlib.import_module(module).register_fakes()
schemas = [s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("mmfast_cuda::")]
print(json.dumps(sorted(name.split("::")[1] for name in schemas)))
"""


def test_library_links_and_its_ops_register(compiled, objects):
    kernels = [name for name in build.SOURCES if name.endswith(".cu")]
    missing = [n for n in kernels + [UNITY] if not isinstance(compiled[n], tuple) or compiled[n][0] != 0]
    if missing:
        pytest.skip(f"not compiled here: {missing}")
    assert set(build.SOURCES) - set(kernels) == set(BINDINGS)
    cudart = Path(_nvcc()).parent.parent / "lib64"
    torch_lib = Path(torch.__file__).parent / "lib"
    library = objects / "libmmfast_cuda_check.so"
    link = [_cxx(), "-shared", "-o", str(library), *(str(objects / f"{name}.o") for name in kernels),
            str(objects / "bindings.o"),
            "-L", str(torch_lib), "-ltorch", "-ltorch_cpu", "-lc10", "-L", str(cudart), "-lcudart"]
    done = subprocess.run(link, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    env = {**os.environ, "LD_LIBRARY_PATH": f"{cudart}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    loaded = subprocess.run([sys.executable, "-c", _LOAD, str(library)], capture_output=True, text=True,
                            timeout=120, env=env)
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    ops = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert ops == ["attention_short_fwd", "group_norm_bwd", "group_norm_fwd", "guided_step", "norm_bwd", "norm_fwd"]
