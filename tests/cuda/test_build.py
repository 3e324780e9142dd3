"""The CUDA C++ path's build logic and its fallback, on any machine: architecture flags,
the cache lookup, what is reported when it cannot run, that a failed build falls back to
Triton with one log line, and that dispatch takes the ``cuda`` backend only where the
tuning table says so. GPUs are faked where needed (a device name, a capability): nothing
here compiles or runs a kernel."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import mmfast
import mmfast.ops  # noqa: F401  (registers the op families; `import mmfast` alone does not, and under
#                    pytest-xdist no earlier test in this worker may have)
from mmfast import dispatch, tuning
from mmfast.cuda import build
from mmfast.dispatch import Call, op_family

CUDA0 = torch.device("cuda", 0)
FAKE_GPU = "Fake GPU 9000"


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """Pristine loader, tuning and capability caches; an empty cache directory."""
    monkeypatch.setattr(build, "_loaded", None)
    monkeypatch.setattr(build, "_failure", None)
    monkeypatch.setattr(build, "_probed", {})
    monkeypatch.setattr(tuning, "_tables", {})
    monkeypatch.setattr(tuning, "_device_names", {})
    monkeypatch.setenv("MMFAST_CUDA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MMFAST_CUDA_ARCHS", raising=False)
    monkeypatch.delenv(tuning.ENV_VAR, raising=False)
    return tmp_path


@pytest.fixture
def fake_hopper(fresh_state, monkeypatch):
    """cuda:0 is a compute capability 9.0 device called FAKE_GPU, for dispatch's eyes."""
    monkeypatch.setitem(dispatch._capability, 0, (9, 0))
    monkeypatch.setitem(tuning._device_names, 0, FAKE_GPU)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    return fresh_state


# ---- architectures ------------------------------------------------------------------


def test_arch_list_parsing_and_flags():
    archs = build.parse_archs(" 8.0;9.0a, 10.0+PTX ")
    assert archs == ["8.0", "9.0a", "10.0+PTX"]
    assert build.gencode_flags(archs) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_100,code=sm_100",
        "-gencode=arch=compute_100,code=compute_100",
    ]
    with pytest.raises(ValueError, match="MMFAST_CUDA_ARCHS: expected entries .* got \\['sm_90'\\]"):
        build.parse_archs("8.0;sm_90")
    with pytest.raises(ValueError, match="MMFAST_CUDA_ARCHS"):
        build.parse_archs(" ; ")


def test_hopper_builds_for_sm90a_and_code_compatibility():
    assert build.device_arch((9, 0)) == "9.0a"
    assert build.device_arch((8, 6)) == "8.6"
    assert build.runs_on(["9.0a"], (9, 0))
    assert not build.runs_on(["9.0a"], (10, 0))       # arch-specific code: that arch only
    assert build.runs_on(["8.0"], (8, 9))             # same major, later minor
    assert not build.runs_on(["8.6"], (8, 0))
    assert not build.runs_on(["8.0"], (9, 0))
    assert build.runs_on(["8.0+PTX"], (9, 0))         # the driver compiles the PTX


# ---- cache lookup -----------------------------------------------------------------------


def _fake_library(root, archs, **overrides):
    directory = root / "somekey"
    directory.mkdir(parents=True)
    (directory / "lib.so").write_bytes(b"not really a library")
    manifest = {"library": "lib.so", "sources": build.source_hash(), "archs": archs,
                "torch": torch.__version__, "cuda": torch.version.cuda, **overrides}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory / "lib.so"


def test_find_library_matches_sources_versions_and_arch(fresh_state):
    root = build.cache_root()
    library = _fake_library(root, ["9.0a"])
    assert build.find_library((9, 0)) == library
    assert build.find_library((8, 0)) is None
    (library.parent / "manifest.json").write_text(json.dumps({"library": "lib.so", "sources": "stale"}))
    assert build.find_library((9, 0)) is None


def test_build_writes_a_manifest_that_find_library_reads_back(fresh_state, monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    seen = {}

    def fake_load(name, sources, build_directory, extra_cuda_cflags, is_python_module, **kwargs):
        seen.update(name=name, sources=sources, flags=extra_cuda_cflags, python_module=is_python_module)
        (build.Path(build_directory) / f"{name}.so").write_bytes(b"compiled")

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    library = build.build(["9.0a"], build.cache_root())
    assert seen["name"] == f"mmfast_cuda_{build.build_key(['9.0a'])}" and seen["python_module"] is False
    assert [build.Path(s).name for s in seen["sources"]] == list(build.SOURCES)
    assert "-gencode=arch=compute_90a,code=sm_90a" in seen["flags"]
    assert build.find_library((9, 0)) == library
    assert build.find_library((8, 0)) is None


def test_ahead_of_time_build_copies_only_library_and_manifest(fresh_state, monkeypatch, capsys):
    import torch.utils.cpp_extension as cpp_extension

    def fake_load(name, build_directory, **kwargs):
        (build.Path(build_directory) / f"{name}.so").write_bytes(b"compiled")
        (build.Path(build_directory) / "norm.cuda.o").write_bytes(b"object")

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(build, "toolchain_reason", lambda: None)
    assert build.main([]) == 2
    assert "MMFAST_CUDA_ARCHS" in capsys.readouterr().err
    monkeypatch.setenv("MMFAST_CUDA_ARCHS", "8.0;9.0a")
    prebuilt = fresh_state / "prebuilt"
    assert build.main(["--out", str(prebuilt)]) == 0
    (shipped,) = prebuilt.iterdir()
    assert sorted(p.name for p in shipped.iterdir()) == ["manifest.json", f"mmfast_cuda_{shipped.name}.so"]
    assert json.loads((shipped / "manifest.json").read_text())["archs"] == ["8.0", "9.0a"]


def test_build_key_depends_on_archs_and_sources(monkeypatch):
    key = build.build_key(["9.0a"])
    assert key == build.build_key(["9.0a"]) and key != build.build_key(["8.0", "9.0a"])
    monkeypatch.setattr(build, "_source_hash", "something else")
    assert build.build_key(["9.0a"]) != key


def test_every_source_of_the_library_exists_and_every_binding_is_built():
    src = build.source_dir()
    assert all((src / name).is_file() for name in build.SOURCES + build.HEADERS)
    assert {p.name for p in src.glob("*_ops.cpp")} <= set(build.SOURCES)


# ---- availability and fallback ------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without CUDA")
def test_status_says_why_not_without_cuda(fresh_state):
    status = build.status()
    assert status["available"] is False
    assert status["why"] in ("torch is a CPU build", "torch is a ROCm build", "no CUDA device")


def test_turned_off_by_environment(fake_hopper, monkeypatch):
    monkeypatch.setenv("MMFAST_CUDA", "0")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert build.unavailable_reason(CUDA0) == "turned off by MMFAST_CUDA=0"


def test_arch_list_without_code_for_the_device(fake_hopper, monkeypatch):
    monkeypatch.setenv("MMFAST_CUDA_ARCHS", "8.0")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert build.unavailable_reason(CUDA0) == "MMFAST_CUDA_ARCHS=8.0 has no code for compute capability 9.0"


def test_failed_build_falls_back_with_one_log_line(fake_hopper, monkeypatch, caplog):
    def broken_build(archs, root, verbose=False):
        assert archs == ["9.0a"]
        raise RuntimeError("Error building extension 'mmfast_cuda'\nnvcc fatal: boom")

    monkeypatch.setattr(build, "_probe", lambda index: None)  # a toolchain is "there"
    monkeypatch.setattr(build, "build", broken_build)
    with caplog.at_level(logging.WARNING, logger="mmfast.cuda"):
        assert build.load(CUDA0) is False
        assert build.load(CUDA0) is False  # no second attempt, no second line
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["mmfast: CUDA C++ path unavailable (build or load failed: RuntimeError: "
                     "Error building extension 'mmfast_cuda'); the Triton backends run instead"]
    assert build.unavailable_reason(CUDA0).startswith("build or load failed")


def test_import_mmfast_loads_no_build_machinery(tmp_path):
    code = ("import sys, mmfast; print(sorted(m for m in sys.modules if 'cpp_extension' in m "
            "or m.startswith('mmfast.cuda') or m == 'mmfast.csrc'))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ---- dispatch: the cuda backend only where measured faster ----------------------------------

NORM = op_family("norm")


def _call(dtype=torch.bfloat16, hidden=4096, param_dtype=None):
    return Call(device=CUDA0, dtype=dtype, facts={"hidden": hidden, "param_dtypes": (param_dtype or dtype,)})


def _table(tmp_path, monkeypatch, device=FAKE_GPU):
    table = {"device": device, "wins": {"norm": [
        {"backend": "cuda", "dtypes": ["bfloat16"], "hidden": [1024, 8192]},
        {"backend": "triton", "hidden": [1, 1023]},
    ]}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(tuning.ENV_VAR, str(path))


def test_without_a_table_triton_stays_the_default(fake_hopper, monkeypatch):
    monkeypatch.setattr(build, "unavailable_reason", lambda device: None)
    assert NORM.select(_call()).name == "triton"


def test_table_picks_cuda_only_where_it_measured_faster(fake_hopper, monkeypatch):
    _table(fake_hopper, monkeypatch)
    monkeypatch.setattr(build, "unavailable_reason", lambda device: None)
    assert NORM.select(_call()).name == "cuda"
    assert NORM.select(_call(hidden=8192)).name == "cuda"
    assert NORM.select(_call(hidden=512)).name == "triton"        # the table says triton there
    assert NORM.select(_call(hidden=8200)).name == "triton"       # no entry
    assert NORM.select(_call(dtype=torch.float16)).name == "triton"
    # Measured faster, but the call is outside what the kernel takes: fp32 weight for bf16 x.
    assert NORM.select(_call(param_dtype=torch.float32)).name == "triton"


def test_table_of_another_device_is_ignored(fake_hopper, monkeypatch):
    _table(fake_hopper, monkeypatch, device="Some Other GPU")
    monkeypatch.setattr(build, "unavailable_reason", lambda device: None)
    assert NORM.select(_call()).name == "triton"


def test_failed_build_leaves_triton_and_forcing_cuda_says_why(fake_hopper, monkeypatch):
    _table(fake_hopper, monkeypatch)
    monkeypatch.setattr(build, "_failure", "build or load failed: RuntimeError: boom")
    assert NORM.select(_call()).name == "triton"
    with pytest.raises(mmfast.NoBackendError, match="CUDA C\\+\\+ path unavailable: build or load failed"):
        NORM.select(_call(), backend="cuda")


def test_forcing_cuda_ignores_the_table(fake_hopper, monkeypatch):
    monkeypatch.setattr(build, "unavailable_reason", lambda device: None)
    assert NORM.select(_call(), backend="cuda").name == "cuda"
    with pytest.raises(mmfast.NoBackendError, match="hidden size 8193 > 8192"):
        NORM.select(_call(hidden=8193), backend="cuda")


def test_on_cpu_the_cuda_backend_is_refused_with_its_reason():
    with pytest.raises(mmfast.NoBackendError, match="backend 'cuda' .* device cpu not supported"):
        mmfast.ops.rms_norm(torch.ones(2, 8), backend="cuda")


def test_group_norm_takes_cuda_where_measured_and_where_it_fits(fake_hopper, monkeypatch):
    table = {"device": FAKE_GPU, "wins": {"group_norm": [{"backend": "cuda", "spatial": [64, 1 << 20]}]}}
    path = fake_hopper / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(tuning.ENV_VAR, str(path))
    monkeypatch.setattr(build, "unavailable_reason", lambda device: None)
    family = op_family("group_norm")

    def call(spatial=4096, group_channels=10, layout="nchw", param_dtype=torch.float16):
        facts = {"channels": 320, "group_channels": group_channels, "spatial": spatial,
                 "param_dtypes": (param_dtype,)}
        return Call(device=CUDA0, dtype=torch.float16, layout=layout, facts=facts)

    assert family.select(call()).name == "cuda"
    assert family.select(call(layout="channels_last")).name == "cuda"
    assert family.select(call(spatial=16)).name == "triton"
    assert family.select(call(layout="channels_last", group_channels=512)).name == "triton"
    assert family.select(call(param_dtype=torch.float32)).name == "triton"


def test_scheduler_step_takes_cuda_only_for_what_the_kernel_does(fake_hopper, monkeypatch):
    table = {"device": FAKE_GPU, "wins": {"scheduler_step": [{"backend": "cuda"}]}}
    path = fake_hopper / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(tuning.ENV_VAR, str(path))
    monkeypatch.setattr(build, "unavailable_reason", lambda device: None)
    family = op_family("scheduler_step")

    def call(**facts):
        facts = {"float64": False, "one_dtype": True, "rescale": False, "corrector": False, "numel": 1 << 16, **facts}
        return Call(device=CUDA0, dtype=torch.bfloat16, facts=facts)

    assert family.select(call()).name == "cuda"
    assert family.select(call(rescale=True)).name == "triton"
    assert family.select(call(corrector=True)).name == "triton"  # UniPC's corrector: Triton only
    assert family.select(call(one_dtype=False)).name == "triton"
