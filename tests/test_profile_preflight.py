"""``mmfast profile`` stops before building anything when a run cannot work, with one line:
a missing library (naming the extra), a --backend this device cannot run, a --resolution
the tower does not take, a preset that does not fit in memory (naming the numbers and a
preset that fits). The memory estimate is checked against the real models' sizes, the
tiny presets build without library warnings, and a large build shows a progress bar."""

import logging

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

import mmfast.profile as profile  # noqa: E402
from mmfast.cli import main  # noqa: E402
from mmfast.profile import build_progress, ldm, memory, preflight, vlm  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


class Built(Exception):
    """Raised by a stand-in for a build: reaching it means the checks let the run through."""


@pytest.fixture
def no_build(monkeypatch):
    """Any build fails the test with Built (the checks must stop the run before it)."""
    def build(*args, **kwargs):
        raise Built(args, kwargs)
    monkeypatch.setattr(vlm, "build", build)
    monkeypatch.setattr(ldm, "build", build)


def _error(argv, capsys) -> str:
    """The one error line of ``mmfast profile *argv``, which must exit before building."""
    with pytest.raises(SystemExit) as exit_info:
        code = main(["profile", *argv])
        raise SystemExit(code)
    assert exit_info.value.code in (1, 2)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err and err[-1].startswith("mmfast profile: error: "), err
    assert not any("Traceback" in line for line in err)
    return err[-1]


# ---- libraries ------------------------------------------------------------------------


@pytest.mark.parametrize("kind, missing", [("vlm", "transformers"), ("ldm", "diffusers"), ("ldm", "transformers")])
def test_missing_library_names_the_extra(kind, missing, monkeypatch, capsys, no_build):
    real = preflight.importlib.util.find_spec
    monkeypatch.setattr(preflight.importlib.util, "find_spec",
                        lambda name, *a: None if name == missing else real(name, *a))
    line = _error([kind], capsys)
    assert f"mmfast profile {kind} needs {missing}" in line and "pip install 'mmfast[hf]'" in line


# ---- --backend ------------------------------------------------------------------------


@pytest.mark.skipif(HAS_CUDA, reason="Triton runs compiled on a GPU")
def test_triton_backend_on_a_cpu_without_interpreter_is_refused_up_front(monkeypatch, capsys, no_build):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    line = _error(["vlm", "--backend", "triton"], capsys)
    assert "--backend triton: cannot run on this machine (cpu, float32)" in line and "TRITON_INTERPRET=1" in line


def test_a_backend_that_can_run_passes_the_check(capsys, no_build):
    with pytest.raises(Built):
        main(["profile", "vlm", "--backend", "torch"])


# ---- --resolution ---------------------------------------------------------------------


def test_fixed_resolution_is_refused_before_building(capsys, no_build):
    line = _error(["vlm", "--model", "llava", "--resolution", "64"], capsys)
    assert "--resolution: llava's vision tower takes" in line


# ---- memory -----------------------------------------------------------------------------


def _count(*modules) -> int:
    return sum(p.numel() for p in {id(p): p for m in modules for p in m.parameters()}.values())


@pytest.mark.parametrize("model", list(vlm.MODELS))
def test_vlm_estimate_counts_what_the_build_holds(model):
    spec = vlm.MODELS[model]
    ours, reference, _ = vlm.build(spec, "tiny", None, torch.device("cpu"), torch.float16)
    estimate = memory.estimate_vlm(spec, "tiny", torch.float16)
    assert estimate.parameters == _count(ours, reference)
    held = sum(p.numel() * p.element_size() for m in (ours, reference) for p in m.parameters())
    assert estimate.weight_bytes == held  # BLIP-2's Q-Former stays float32 on both sides
    assert estimate.total_bytes == int(held * (1 + memory.MARGIN))


@pytest.mark.parametrize("preset", ["tiny", "sd3-tiny"])
def test_ldm_estimate_counts_what_the_build_holds(preset):
    ours, pipe, _ = ldm.build(preset, None, torch.device("cpu"), torch.float32)
    estimate = memory.estimate_ldm(preset, torch.float32)
    assert estimate.parameters == _count(ours, *ldm.reference_modules(pipe))
    assert estimate.weight_bytes == 4 * estimate.parameters


def test_available_ram_is_plausible():
    free = memory.available_ram()
    assert 0 < free < 2**50


def _machine_with(monkeypatch, gib: float):
    monkeypatch.setattr(memory, "available_bytes", lambda device: (int(gib * memory.GIB), "of RAM available"))


def test_a_preset_that_does_not_fit_is_refused_naming_the_numbers(monkeypatch, capsys, no_build):
    _machine_with(monkeypatch, 2.0)
    line = _error(["vlm", "--preset", "llava-1.5-7b", "--dtype", "float32"], capsys)
    expected = memory.estimate_vlm(vlm.MODELS["llava"], "llava-1.5-7b", torch.float32)
    assert f"--preset llava-1.5-7b (float32): needs about {expected.total_bytes / memory.GIB:.1f} GiB" in line
    assert f"{expected.parameters / 1e9:.2f} B parameters" in line and "+ 25% for activations" in line
    assert "this machine has 2.0 GiB of RAM available" in line
    assert "--preset tiny fits" in line and "--force" in line


def test_the_largest_fitting_preset_is_suggested(monkeypatch, capsys, no_build):
    three_b = memory.estimate_vlm(vlm.MODELS["qwen2.5-vl"], "3b", torch.bfloat16).total_bytes
    _machine_with(monkeypatch, three_b / memory.GIB + 0.5)
    line = _error(["vlm", "--preset", "7b", "--dtype", "bfloat16"], capsys)
    assert "--preset 3b fits" in line


def test_force_builds_anyway_and_says_so(monkeypatch, capsys, no_build):
    _machine_with(monkeypatch, 1.0)
    with pytest.raises(Built) as built:
        main(["profile", "ldm", "--preset", "sd15", "--force"])
    assert "--force: building preset sd15, which needs about" in capsys.readouterr().out
    args, kwargs = built.value.args
    assert args[-1] == memory.estimate_ldm("sd15", torch.float32).phases  # the progress bar's steps


def test_a_preset_that_fits_is_built(monkeypatch, no_build):
    _machine_with(monkeypatch, 10_000)
    with pytest.raises(Built):
        main(["profile", "vlm", "--preset", "opt-2.7b"])


# ---- quiet builds, progress -----------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def library_warnings():
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("transformers", "diffusers")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.messages
    for logger in loggers:
        logger.removeHandler(handler)


@pytest.mark.parametrize("preset", ["tiny", "sd3-tiny"])
def test_ldm_tiny_builds_without_library_warnings(preset, library_warnings):
    ours, pipe, _ = ldm.build(preset, None, torch.device("cpu"), torch.float16)
    assert not library_warnings, library_warnings
    assert {p.dtype for m in (ours, *ldm.reference_modules(pipe)) for p in m.parameters()} == {torch.float16}


@pytest.mark.parametrize("model", list(vlm.MODELS))
def test_vlm_tiny_builds_without_library_warnings(model, library_warnings):
    vlm.build(vlm.MODELS[model], "tiny", None, torch.device("cpu"), torch.float32)
    assert not library_warnings, library_warnings


def test_cast_keeps_the_modules_a_class_keeps_in_float32():
    class Model(torch.nn.Module):
        _keep_in_fp32_modules = ["norm"]

        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.norm = torch.nn.LayerNorm(4)

    model = Model()
    ldm._to(model, torch.device("cpu"), torch.float16)
    assert model.proj.weight.dtype == torch.float16 and model.norm.weight.dtype == torch.float32


def _record_phases(monkeypatch) -> list:
    """(phase, parameters registered before it started) of each phase of the next build."""
    monkeypatch.setattr(build_progress, "LARGE", 1)
    seen = []
    real = build_progress._Bar.phase

    def phase(self, name):
        seen.append((name, self.bar.n))
        real(self, name)
    monkeypatch.setattr(build_progress._Bar, "phase", phase)
    return seen


def _starts(phases: dict) -> list[int]:
    sizes = list(phases.values())
    return [sum(sizes[:i]) for i in range(len(sizes))]


@pytest.mark.parametrize("model", list(vlm.MODELS))
def test_a_large_build_shows_progress(model, monkeypatch, capsys):
    seen = _record_phases(monkeypatch)
    spec = vlm.MODELS[model]
    phases = memory.estimate_vlm(spec, "tiny", torch.float32).phases
    vlm.build(spec, "tiny", None, torch.device("cpu"), torch.float32, phases)
    err = capsys.readouterr().err
    assert f"building {model}" in err and "transformers model" in err and "copying weights" in err
    # Each phase started where the ones before it end: every estimated parameter was registered.
    assert seen == list(zip(phases, _starts(phases)))
    assert torch.nn.modules.module._global_parameter_registration_hooks == {}  # the hook is removed


def test_a_small_build_is_silent(capsys):
    spec = vlm.MODELS["qwen2.5-vl"]
    vlm.build(spec, "tiny", None, torch.device("cpu"), torch.float32, {"mmfast model": 10})
    assert "building" not in capsys.readouterr().err


def test_banner_names_a_real_size_preset(monkeypatch, capsys, no_build):
    _machine_with(monkeypatch, 10_000)
    with pytest.raises(Built):
        profile.main(["vlm", "--preset", "opt-2.7b"])
    out = capsys.readouterr().out
    if not HAS_CUDA:
        assert "CPU numbers of preset opt-2.7b" in out and "small model" not in out


# ---- checkpoints ------------------------------------------------------------------------


def test_vlm_checkpoint_estimate_reads_the_safetensors_headers(tmp_path):
    from mmfast.models import Qwen25VLForConditionalGeneration

    model = Qwen25VLForConditionalGeneration.from_preset("tiny")
    model.save_pretrained(tmp_path)
    stored = sum(p.numel() for p in model.state_dict().values())  # tied weights are stored once or twice
    estimate = memory.estimate_checkpoint("vlm", str(tmp_path), torch.bfloat16)
    assert estimate.parameters == 2 * stored and estimate.weight_bytes == 2 * 2 * stored


def test_ldm_checkpoint_estimate_counts_copies(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from mmfast.models.sd3_presets import sd3_components

    parts = sd3_components("sd3-tiny", text_encoder_3=False)
    StableDiffusion3Pipeline(**parts, tokenizer=None, tokenizer_2=None, tokenizer_3=None).save_pretrained(
        tmp_path, safe_serialization=True)
    # What the files store: parameters and persistent buffers (the transformer's position table).
    counts = {name: sum(t.numel() for t in parts[name].state_dict().values())
              for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    estimate = memory.estimate_checkpoint("ldm", str(tmp_path), torch.float32)
    # mmfast rebuilds the transformer and VAE; SD3's text encoders are shared by both sides.
    assert estimate.parameters == 2 * (counts["transformer"] + counts["vae"]) + counts["text_encoder"] \
        + counts["text_encoder_2"]


def test_a_checkpoint_that_does_not_fit_is_refused(tmp_path, monkeypatch, capsys, no_build):
    from mmfast.models import Qwen25VLForConditionalGeneration

    Qwen25VLForConditionalGeneration.from_preset("tiny").save_pretrained(tmp_path)
    _machine_with(monkeypatch, 0.0001)
    line = _error(["vlm", "--checkpoint", str(tmp_path), "--dtype", "float32"], capsys)
    assert f"--checkpoint {tmp_path} (float32): needs about" in line and "--dtype bfloat16 halves" in line
    assert "--force builds it anyway" in line


def test_output_paths_are_checked_before_building(tmp_path, capsys, no_build):
    a_file = tmp_path / "results"
    a_file.write_text("")
    assert _error(["vlm", "--out", str(a_file)], capsys).endswith(f"--out: {a_file} is a file, not a directory")
    assert f"--trace: {tmp_path} is a directory" in _error(["ldm", "--trace", str(tmp_path)], capsys)


def test_without_transformers_the_command_names_the_extra_in_one_line():
    # A fresh interpreter where `import transformers` fails, as after a plain `pip install mmfast`.
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None; sys.modules['diffusers'] = None; "
            "from mmfast.cli import main; sys.exit(main(['profile', 'vlm']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == ("mmfast profile: error: mmfast profile vlm needs transformers, not installed here: "
                                   "pip install 'mmfast[hf]'")


def test_gpu_memory_is_what_cuda_reports_free(monkeypatch):
    # The CUDA branch on any machine: the free bytes of torch.cuda.mem_get_info, not the total.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * memory.GIB, 80 * memory.GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Some GPU")
    assert memory.available_bytes(torch.device("cuda", 0)) == (3 * memory.GIB, "free on cuda:0 (Some GPU)")


def test_ram_without_psutil_reads_meminfo(monkeypatch, tmp_path):
    import builtins
    import sys

    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` fails
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       25165824 kB\nMemFree:         1000000 kB\nMemAvailable:   12345678 kB\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(meminfo if path == "/proc/meminfo" else path,
                                                                          *a, **k))
    assert memory.available_ram() == 12345678 * 1024


def test_progress_never_runs_past_a_phase(monkeypatch):
    # mmfast's UNet registers more than it holds (diffusers' blocks, then mmfast's): the
    # bar waits at the phase's end instead of passing 100%.
    monkeypatch.setattr(build_progress, "LARGE", 1)
    with build_progress.building({"a": 10, "b": 5}, "x") as progress:
        progress.phase("a")
        torch.nn.Linear(10, 10)  # 110 parameters
        assert progress.bar.n == 10
        progress.phase("b")
        torch.nn.Linear(2, 1)  # 3
        assert progress.bar.n == 13
        progress.phase("c")  # a phase the estimate does not know: no parameters, the label only
        assert progress.bar.n == 15 and progress.bar.total == 15


@pytest.mark.parametrize("preset", ["tiny", "sd3-tiny"])
def test_ldm_build_phases_fill_the_bar(preset, monkeypatch):
    seen = _record_phases(monkeypatch)
    phases = memory.estimate_ldm(preset, torch.float32).phases
    ldm.build(preset, None, torch.device("cpu"), torch.float32, phases)
    assert seen == list(zip(phases, _starts(phases)))
