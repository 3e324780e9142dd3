"""Packaging: kernels/ and bench/ ship only as mmfast.kernels and mmfast.bench (Hugging
Face's `kernels` package owns the top-level name), and `import mmfast` stays light.

Imports are checked in fresh subprocesses started outside the repository: pytest puts the
repository root on sys.path, where `import kernels` would find kernels/ and prove nothing.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path, **env) -> dict:
    """Run ``code`` in a fresh interpreter outside the repository; it prints one JSON object."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environ.update(env)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=environ, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _is_under(path: str, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


# ---- the editable install -----------------------------------------------------------

_WHERE = """
import importlib.util, json
import mmfast, mmfast.kernels
top = {name: getattr(importlib.util.find_spec(name), "origin", None) for name in ("kernels", "bench")}
print(json.dumps({"mmfast": mmfast.__file__, "kernels": mmfast.kernels.__file__, "top": top}))
"""


def test_editable_install_maps_kernels_into_mmfast(tmp_path):
    where = _python(_WHERE, cwd=tmp_path)
    if not _is_under(where["mmfast"], REPO):
        pytest.skip(f"mmfast is imported from {where['mmfast']}, not an editable install of {REPO}")
    assert Path(where["kernels"]) == REPO / "kernels" / "__init__.py"
    # A top-level `kernels` (or `bench`) may exist, e.g. Hugging Face's in .venv, but never ours.
    for name, origin in where["top"].items():
        assert origin is None or not _is_under(origin, REPO / name), f"`import {name}` finds {origin}"


def test_the_installed_distribution_holds_no_top_level_kernels(tmp_path):
    # Outside the clone: there, mmfast.egg-info (the editable build's sources) is found first.
    code = "import json; from importlib.metadata import files; print(json.dumps([f.parts[0] for f in files('mmfast')]))"
    tops = set(_python(code, cwd=tmp_path))
    assert not {"kernels", "bench", "kernels.py", "bench.py"} & tops, tops


# ---- `import kernels` from inside the clone -----------------------------------------
# The repository root on sys.path (pytest, a REPL or `python -m` started in the clone)
# must not make `import kernels` find kernels/: see the comment in kernels/__init__.py.

_WHICH_KERNELS = """
import json, sys
import kernels
import mmfast.kernels
print(json.dumps({"kernels": kernels.__file__, "mmfast.kernels": mmfast.kernels.__file__,
                  "mark": getattr(kernels, "MARK", None)}))
"""


def _hugging_face_kernels() -> str | None:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        return str(distribution("kernels").locate_file("kernels/__init__.py"))
    except PackageNotFoundError:
        return None


def test_in_the_test_process_kernels_is_not_ours():
    import kernels
    import mmfast.kernels

    assert Path(mmfast.kernels.__file__) == REPO / "kernels" / "__init__.py"
    installed = _hugging_face_kernels()
    if installed is None:  # the empty namespace kernels/__init__.py leaves in its place
        assert getattr(kernels, "__file__", None) is None and list(kernels.__path__) == []
    else:
        assert Path(kernels.__file__).resolve() == Path(installed).resolve()


def test_in_a_process_started_in_the_clone_kernels_is_hugging_faces():
    installed = _hugging_face_kernels()
    if installed is None:
        pytest.skip("Hugging Face's kernels package is not installed")
    for code in (_WHICH_KERNELS, "import transformers.integrations.hub_kernels\n" + _WHICH_KERNELS):
        where = _python(code, cwd=REPO)  # `-c` puts the working directory first on sys.path
        assert Path(where["kernels"]).resolve() == Path(installed).resolve()
        assert Path(where["mmfast.kernels"]) == REPO / "kernels" / "__init__.py"


def test_kernels_folder_on_the_path_defers_to_the_next_kernels(tmp_path):
    other = tmp_path / "other" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("MARK = 'other'\n")
    where = _python(_WHICH_KERNELS, cwd=REPO, PYTHONPATH=str(tmp_path / "other"))
    assert where["mark"] == "other" and _is_under(where["kernels"], tmp_path)


def test_kernels_folder_alone_is_an_empty_namespace(tmp_path):
    """With no other `kernels` on the path, the folder gives what Python gives for a folder
    without __init__.py: a namespace with no __file__ and no __version__ (transformers then
    counts the package as absent), and none of mmfast's kernel files under it."""
    (tmp_path / "kernels").mkdir()
    shutil.copy(REPO / "kernels" / "__init__.py", tmp_path / "kernels")
    (tmp_path / "kernels" / "norm.py").write_text("")
    code = """
import json, kernels
try:
    import kernels.norm
    found = True
except ModuleNotFoundError:
    found = False
print(json.dumps([getattr(kernels, "__file__", None), getattr(kernels, "__version__", None), list(kernels.__path__), found]))
"""
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [None, None, [], False]


# ---- the wheel ----------------------------------------------------------------------

_NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources that holds a saved benchmark result."""
    source = tmp_path_factory.mktemp("source") / "mmfast"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCES)
    results = source / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "norm.csv").write_text("suite,case,provider,ms\n")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
         "--quiet", "--disable-pip-version-check", "-w", str(out)],
        check=True, timeout=300,
    )
    (built,) = out.glob("mmfast-*.whl")
    return built


def test_wheel_holds_only_the_mmfast_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    expected = ["mmfast/__init__.py", "mmfast/cli.py", "mmfast/kernels/__init__.py", "mmfast/kernels/norm.py",
                "mmfast/csrc/norm.cu", "mmfast/csrc/norm_ops.cpp", "mmfast/csrc/common.cuh", "mmfast/tuning/__init__.py"]
    if (REPO / "bench" / "__init__.py").exists():
        expected.append("mmfast/bench/__init__.py")
    assert not [name for name in expected if name not in names]
    top_level = {name.split("/")[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"mmfast"}
    assert not [name for name in names if "/results/" in name]


def test_wheel_declares_the_console_script(wheel):
    archive = zipfile.ZipFile(wheel)
    (entry_points,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "mmfast = mmfast.cli:main" in archive.read(entry_points).decode()


def test_installed_wheel_imports_its_own_kernels(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", str(wheel), "--no-deps", "--quiet",
         "--disable-pip-version-check", "--target", str(target)],
        check=True, timeout=300,
    )
    where = _python(_WHERE, cwd=tmp_path, PYTHONPATH=str(target))
    assert _is_under(where["mmfast"], target)
    assert _is_under(where["kernels"], target)


# ---- import cost --------------------------------------------------------------------

_IMPORT_COST = """
import json, sys
import torch
before = set(sys.modules)
import mmfast
added = set(sys.modules) - before
print(json.dumps({
    "triton": sorted(m for m in added if m == "triton" or m.startswith("triton.")),
    "kernels": sorted(m for m in sys.modules if m.startswith("mmfast.kernels")),
    "cuda_initialized": torch.cuda.is_initialized(),
}))
"""


def test_import_mmfast_imports_no_kernel_and_initialises_no_cuda(tmp_path):
    cost = _python(_IMPORT_COST, cwd=tmp_path)
    assert cost == {"triton": [], "kernels": [], "cuda_initialized": False}


def test_every_package_directory_is_listed_in_pyproject():
    """The packages list is explicit: a new subpackage left out of it would be missing
    from the wheel while the editable install still finds it."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {name: REPO / path for name, path in config["package-dir"].items()}
    found = set()
    for name, root in roots.items():
        for init in root.rglob("__init__.py"):
            relative = init.parent.relative_to(root).parts
            found.add(".".join((name, *relative)))
    nested_roots = {name for name in roots if any(name.startswith(r + ".") for r in roots)}
    missing = sorted(found - set(config["packages"]) - nested_roots)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
