"""``mmfast profile ldm`` on the FLUX presets and a FLUX checkpoint: the runs end to end on
tiny models (short: a fixed number of rounds), the per-model defaults (FLUX.1-dev: 1024 px,
28 steps, embedded guidance 3.5 on a GPU; klein: 4 steps, no guidance), the memory
estimate against what the build holds, and preflight's suggestion of a smaller preset of
the same generation."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

import mmfast.profile as profile  # noqa: E402
from mmfast.cli import main  # noqa: E402
from mmfast.profile import ldm, ldm_flux, memory  # noqa: E402

COMMON = ["--repeats", "2", "--backend", "torch", "--dtype", "float32", "--top", "3"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _results(out):
    written = sorted(out.glob("profile_ldm_*.json"))
    assert len(written) == 1, written
    data = json.loads(written[0].read_text())
    assert data["kind"] == "ldm" and data["gpu_numbers"] is False and data["device"] == "cpu"
    return data


@pytest.mark.parametrize("preset, reference, guidance", [("flux-tiny", "FluxPipeline", 3.5),
                                                         ("flux2-tiny", "Flux2KleinPipeline", 1.0)])
def test_flux_presets_end_to_end(tmp_path, preset, reference, guidance):
    assert main(["profile", "ldm", "--preset", preset, "--out", str(tmp_path), *COMMON]) == 0
    data = _results(tmp_path)
    assert (data["preset"], data["steps"], data["guidance"], data["resolution"]) == (preset, 2, guidance, 16)
    assert [side["name"] for side in data["sides"]] == ["mmfast", f"diffusers {reference}"]
    for side in data["sides"]:
        m = side["metrics"]
        assert len(m["it_per_s"]["samples"]) == 2 and m["it_per_s"]["median"] > 0
        assert all(0 < d < e for d, e in zip(m["denoise_s"]["samples"], m["end_to_end_s"]["samples"]))
    assert {"adaln", "attention"} <= {entry.split("=")[0] for entry in data["backends_ran"]}  # mmfast's blocks ran
    assert f"diffusers {reference}" in " ".join(data["notes"])


def test_flux_checkpoint_end_to_end(tmp_path):
    from diffusers import FluxPipeline

    from mmfast.models.flux_presets import flux_components

    FluxPipeline(**flux_components("flux-tiny"), text_encoder=None, tokenizer=None, text_encoder_2=None,
                 tokenizer_2=None).save_pretrained(tmp_path / "flux", safe_serialization=True)
    assert main(["profile", "ldm", "--checkpoint", str(tmp_path / "flux"), "--out", str(tmp_path / "out"),
                 "--repeats", "1", "--backend", "torch", "--dtype", "float32", "--top", "3"]) == 0
    data = _results(tmp_path / "out")
    assert data["preset"] is None and data["sides"][1]["name"] == "diffusers FluxPipeline"
    assert (data["steps"], data["guidance"]) == (2, 3.5)
    # Neither side loads text encoders: the estimate counts the transformer and VAE twice.
    stored = sum(t.numel() for name in ("transformer", "vae") for t in flux_components("flux-tiny")[name]
                 .state_dict().values())
    assert memory.estimate_checkpoint("ldm", str(tmp_path / "flux"), torch.float32).parameters == 2 * stored


@pytest.mark.parametrize("preset", ["flux-tiny", "flux2-tiny"])
def test_flux_estimate_counts_what_the_build_holds(preset):
    ours, pipe, _ = ldm.build(preset, None, torch.device("cpu"), torch.float32)
    estimate = memory.estimate_ldm(preset, torch.float32)
    held = {id(p): p.numel() for m in (ours, *ldm.reference_modules(pipe)) for p in m.parameters()}
    assert estimate.parameters == sum(held.values())
    assert estimate.weight_bytes == 4 * estimate.parameters


@pytest.mark.parametrize("preset, steps, guidance", [("flux.1-dev", 28, 3.5), ("flux.2-klein", 4, 1.0),
                                                     ("sd15", 30, 7.5)])
def test_gpu_defaults(preset, steps, guidance):
    args = profile.parser().parse_args(["ldm", "--preset", preset])
    profile._fill_defaults(args, on_gpu=True)
    assert (args.steps, args.guidance, args.batch, args.dtype) == (steps, guidance, 1, "bfloat16")


def test_flux1_dev_resolution_is_1024():
    from mmfast.models import FluxModel

    with torch.device("meta"):
        model = FluxModel.from_preset("flux.1-dev")
    assert ldm.default_resolution(model) == 1024


@pytest.mark.parametrize("preset, smaller", [("flux.1-dev", "flux-tiny"), ("flux.2-klein", "flux2-tiny")])
def test_a_flux_preset_that_does_not_fit_suggests_its_tiny_one(preset, smaller, monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_bytes", lambda device: (2 * memory.GIB, "of RAM available"))
    monkeypatch.setattr(ldm, "build", lambda *a, **k: pytest.fail("built a preset that does not fit"))
    with pytest.raises(SystemExit):
        main(["profile", "ldm", "--preset", preset, "--dtype", "bfloat16"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    need = memory.estimate_ldm(preset, torch.bfloat16)
    assert f"--preset {preset} (bfloat16): needs about {need.total_bytes / memory.GIB:.1f} GiB" in line
    assert f"--preset {smaller} fits" in line
    assert ldm_flux.family(preset) == ldm.prefix(smaller)
