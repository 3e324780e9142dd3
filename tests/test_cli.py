"""The `mmfast` command: `info` tells the truth about this machine, `bench` hands its
arguments to the suites untouched."""

import json
import os
import subprocess
import sys
import sysconfig
import types
from pathlib import Path

import pytest
import torch

from mmfast.cli import main

HAS_CUDA = torch.cuda.is_available()


def _run(command: list[str], **env) -> subprocess.CompletedProcess:
    """Run ``command`` with TRITON_INTERPRET unset unless given (the test session sets it)."""
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ.update(env)
    done = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def _info_json(**env) -> dict:
    return json.loads(_run([sys.executable, "-m", "mmfast", "info", "--json"], **env).stdout)


def _backends(info: dict, family: str) -> dict:
    return {b["name"]: b for b in info["ops"]["families"][family]}


# ---- info -----------------------------------------------------------------------------


def test_info_reports_the_device(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    if HAS_CUDA:
        assert torch.cuda.get_device_name(0) in out
        assert "no CUDA device" not in out
    else:
        assert "no CUDA device: CPU only" in out
    assert f"torch         {torch.__version__}" in out


def test_info_json_lists_the_norm_backends(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["devices"]) == (torch.cuda.device_count() if HAS_CUDA else 0)
    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["torch_cuda"] == torch.version.cuda
    backends = _backends(info, "norm")
    assert {"triton", "torch"} <= set(backends)
    assert backends["torch"]["usable"]
    assert info["ops"]["probe"] == (
        {"device": "cuda", "dtype": "bfloat16"} if HAS_CUDA else {"device": "cpu", "dtype": "float32"}
    )


def test_info_without_interpreter_says_where_triton_cannot_run():
    info = _info_json()
    triton = _backends(info, "norm")["triton"]
    if HAS_CUDA:
        assert triton["usable"] and info["triton_runs"]["mode"] == "compiled"
    else:
        assert not triton["usable"]
        assert any("TRITON_INTERPRET" in reason for reason in triton["reasons"])
        assert not info["triton_runs"]["runs"]
        assert "TRITON_INTERPRET" in info["triton_runs"]["why"]


def test_info_under_interpreter_reports_triton_usable():
    info = _info_json(TRITON_INTERPRET="1")
    assert info["triton_runs"] == {
        "runs": True, "mode": "interpreter", "why": "TRITON_INTERPRET=1 is set; slow, meant for tests"
    }
    triton = _backends(info, "norm")["triton"]
    assert triton["usable"] and triton["reasons"] == []
    # The norm backend's hidden-size limit can only be judged per call.
    assert triton["note"] == "further limits depend on each call ('hidden')"


def test_info_shows_a_backend_override():
    out = _run([sys.executable, "-m", "mmfast", "info"], MMFAST_BACKEND="norm=torch").stdout
    assert "MMFAST_BACKEND=norm=torch overrides the order" in out


def test_console_script_and_module_run_info():
    script = Path(sysconfig.get_path("scripts")) / "mmfast"
    assert script.exists(), f"console script missing: {script} (is mmfast installed?)"
    for command in ([str(script), "info"], [sys.executable, "-m", "mmfast.cli", "info"]):
        assert "norm" in _run(command).stdout


# ---- bench ----------------------------------------------------------------------------


def test_bench_passes_its_arguments_verbatim(monkeypatch):
    received = []
    suites = types.ModuleType("mmfast.bench")
    suites.main = lambda argv: received.append(argv) or 3
    monkeypatch.setitem(sys.modules, "mmfast.bench", suites)
    argv = ["--quick", "norm", "--no-save", "--help"]
    assert main(["bench", *argv]) == 3
    assert received == [argv]


def test_bench_help_reaches_the_suites_parser():
    out = _run([sys.executable, "-m", "mmfast", "bench", "--help"]).stdout
    assert out.startswith("usage: mmfast bench")


def test_bench_without_the_suites_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mmfast.bench", None)  # makes the import fail
    assert main(["bench", "norm"]) == 2
    assert "not installed" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2


# ---- a quick start: --help and --version without torch ------------------------------------


def _imported_modules(*argv: str) -> tuple[str, set[str]]:
    """(stdout, every module imported) of ``python -X importtime -m mmfast *argv``."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPROFILEIMPORTTIME"}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "mmfast", *argv], env=environ,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    modules = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return done.stdout, modules


@pytest.mark.parametrize("argv", [["--help"], ["--version"]])
def test_help_and_version_do_not_import_torch(argv):
    out, modules = _imported_modules(*argv)
    assert "mmfast.cli" in modules  # the listing is real
    heavy = sorted(m for m in modules if m.split(".")[0] in ("torch", "triton", "numpy", "transformers", "diffusers"))
    assert not heavy, heavy[:10]
    if argv == ["--version"]:
        import mmfast

        assert out.strip() == f"mmfast {mmfast.__version__}"
    else:
        assert out.startswith("usage: mmfast")


def test_the_lazy_namespace_still_registers_the_op_families():
    # `import mmfast` no longer imports the ops; asking the registry must still see them all.
    code = ("import json, mmfast, sys; from mmfast.dispatch import op_families; "
            "print(json.dumps({'families': sorted(op_families()), 'patch': callable(mmfast.patch), "
            "'norm': mmfast.ops.rms_norm.__name__}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert {"norm", "attention"} <= set(found["families"]) and found["patch"] and found["norm"] == "rms_norm"


def test_version_comes_from_one_place():
    import importlib.metadata

    import mmfast
    from mmfast._version import __version__

    assert mmfast.__version__ == __version__
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'version = { attr = "mmfast._version.__version__" }' in pyproject
    try:
        installed = importlib.metadata.version("mmfast")
    except importlib.metadata.PackageNotFoundError:
        return
    assert installed == __version__


HELP_COMMANDS = [["--help"], ["info", "--help"], ["bench", "--help"], ["profile", "--help"],
                 ["profile", "vlm", "--help"], ["profile", "ldm", "--help"]]


@pytest.mark.parametrize("argv", HELP_COMMANDS, ids=" ".join)
def test_help_texts_hold_no_markup(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        exit_code = main(argv)  # bench returns its status instead of exiting
        raise SystemExit(exit_code)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mmfast")
    assert "`" not in out and ":mod:" not in out and ":func:" not in out, out


def test_the_extra_profile_names_exists_and_numpy_is_a_dependency():
    import tomllib

    from mmfast.profile import preflight

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    extra = preflight.EXTRA.removeprefix("mmfast[").removesuffix("]")
    wanted = {name for names in preflight.REQUIRED.values() for name in names}
    assert wanted <= {req.split(">")[0].split("<")[0].split("=")[0].strip()
                      for req in project["optional-dependencies"][extra]}
    dependencies = {req.split(";")[0].split(">")[0].strip(): req for req in project["dependencies"]}
    assert "numpy" in dependencies  # torch warns "Failed to initialize NumPy" without it
    assert "platform_system == 'Linux'" in dependencies["triton"]
