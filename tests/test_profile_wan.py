"""``mmfast profile ldm`` on the Wan presets (mmfast.profile.ldm_wan): the tiny preset end
to end writes its JSON with the video figures (per-step denoising, VAE decode); a WanPipeline
checkpoint; the dispatch by preset prefix; the memory estimate of the real presets; bad
video sizes stop before any timing."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from mmfast.cli import main  # noqa: E402
from mmfast.profile import ldm, ldm_wan, memory, preflight  # noqa: E402

COMMON = ["--repeats", "2", "--warmup", "0", "--backend", "torch", "--dtype", "float32", "--top", "3",
          "--steps", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _results(out):
    written = sorted(out.glob("profile_ldm_*.json"))
    assert len(written) == 1, written
    return json.loads(written[0].read_text())


def test_wan_tiny_end_to_end(tmp_path, capsys):
    assert main(["profile", "ldm", "--preset", "wan-tiny", "--out", str(tmp_path), *COMMON]) == 0
    printed = capsys.readouterr().out
    assert "batch 1, 32 x 32 px, 5 frames, float32" in printed
    assert "denoising per step s" in printed and "VAE decode s" in printed
    data = _results(tmp_path)
    assert data["preset"] == "wan-tiny" and data["resolution"] == [32, 32] and data["frames"] == 5
    assert data["guidance"] == 5.0 and data["steps"] == 1  # WanPipeline's guidance
    assert [side["name"] for side in data["sides"]] == ["mmfast", "diffusers WanPipeline"]
    assert data["measurement"]["rounds"] == 2
    for side in data["sides"]:
        m = side["metrics"]
        for key in ("end_to_end_s", "denoise_s", "step_s", "decode_s"):
            assert len(m[key]["samples"]) == 2 and m[key]["median"] > 0, key
        # one step: the step time is the denoising time; decode is the rest of the call
        assert m["step_s"]["samples"] == m["denoise_s"]["samples"]
        for total, denoise, decode in zip(m["end_to_end_s"]["samples"], m["denoise_s"]["samples"],
                                          m["decode_s"]["samples"]):
            assert decode == pytest.approx(total - denoise)
    assert any("WanPipeline" in note for note in data["notes"])


def test_wan_checkpoint_and_frames(tmp_path):
    from mmfast.models import WanVideoModel

    WanVideoModel.from_preset("wan-tiny", text_encoder=False).save_pretrained(tmp_path / "wan")
    assert ldm.workload(None, str(tmp_path / "wan")) is ldm_wan
    assert main(["profile", "ldm", "--checkpoint", str(tmp_path / "wan"), "--resolution", "16", "--frames", "1",
                 "--out", str(tmp_path), *COMMON]) == 0
    data = _results(tmp_path)
    assert data["resolution"] == 16 and data["frames"] == 1 and data["checkpoint"] == str(tmp_path / "wan")


def test_dispatch_by_prefix():
    assert ldm.workload("wan2.1-1.3b", None) is ldm_wan
    assert ldm.workload("sd3-tiny", None) is ldm and ldm.workload("tiny", None) is ldm
    assert set(ldm_wan.PRESETS) <= set(ldm.PRESETS)
    presets = ("tiny", "sd3-medium", "wan-tiny", "flux-tiny", "flux.2-klein")
    assert [ldm.prefix(p) for p in presets] == ["", "sd3", "wan", "flux1", "flux2"]


# transformer (about 1.4B / 5.0B, as counted by the model test) + VAE (about 0.13B / 0.7B, this count)
@pytest.mark.parametrize("preset, billions", [("wan2.1-1.3b", 1.42 + 0.13), ("wan2.2-5b", 5.0 + 0.7)])
def test_estimate_of_the_real_presets(preset, billions):
    """Both sides' transformer and VAE (mmfast's are copies), counted on the meta device."""
    estimate = memory.estimate_ldm(preset, torch.bfloat16)
    assert estimate.parameters == pytest.approx(2 * billions * 1e9, rel=0.1)
    assert estimate.weight_bytes == 2 * estimate.parameters
    assert list(estimate.phases) == ["diffusers components", "mmfast denoiser", "mmfast VAE"]


def test_a_wan_preset_that_does_not_fit_suggests_the_smaller_one(monkeypatch, capsys):
    five_b = memory.estimate_ldm("wan2.2-5b", torch.bfloat16)
    monkeypatch.setattr(memory, "available_bytes", lambda device: (int(five_b.total_bytes * 0.9), "of RAM available"))
    with pytest.raises(SystemExit):
        raise SystemExit(main(["profile", "ldm", "--preset", "wan2.2-5b", "--dtype", "bfloat16"]))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--preset wan2.2-5b (bfloat16): needs about" in line and "--preset wan2.1-1.3b fits" in line
    assert preflight._family(type("Args", (), {"kind": "ldm", "preset": "wan2.2-5b"})()) == \
        ["wan2.2-5b", "wan2.1-1.3b", "wan-tiny"]


def test_bad_frame_count_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        raise SystemExit(main(["profile", "ldm", "--preset", "wan-tiny", "--frames", "4", "--out", str(tmp_path),
                               *COMMON]))
    assert "num_frames: 4 is not 4k + 1" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


def test_frames_for_an_image_model_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        raise SystemExit(main(["profile", "ldm", "--preset", "flux-tiny", "--frames", "5", "--out", str(tmp_path)]))
    assert "--frames: only for Wan presets and checkpoints" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


def test_preflight_counts_the_video_activations():
    """The estimate adds activations that grow with the video (frames, size, batch)."""
    def estimate(**given):
        args = type("Args", (), {"kind": "ldm", "batch": 1, "resolution": None, "frames": None, **given})()
        return preflight._estimate(args, "wan2.1-1.3b", torch.bfloat16)

    default, longer, bigger = estimate(), estimate(frames=81), estimate(resolution=(720, 1280), batch=2)
    weights_only = memory.estimate_ldm("wan2.1-1.3b", torch.bfloat16)
    assert default.weight_bytes == weights_only.weight_bytes
    assert 0 < default.activation_bytes < longer.activation_bytes < bigger.activation_bytes
    assert default.total_bytes == weights_only.total_bytes + default.activation_bytes
    assert "14040 video tokens" in default.activations  # 9 latent frames x 30 x 52 patches at 480 x 832


@pytest.mark.parametrize("argv, expected", [
    ([], {"preset": "tiny", "guidance": 7.5, "steps": 2, "frames": None}),
    (["--preset", "sd3-tiny"], {"guidance": 7.5, "steps": 2}),
    (["--preset", "wan-tiny"], {"guidance": 5.0, "steps": 2, "frames": 5}),
    (["--preset", "wan2.1-1.3b"], {"guidance": 5.0, "steps": 50, "frames": 33}),
    (["--preset", "wan2.2-5b", "--guidance", "3", "--frames", "9", "--steps", "4"],
     {"guidance": 3.0, "steps": 4, "frames": 9}),
])
def test_defaults_per_family_on_a_cpu(argv, expected):
    import mmfast.profile as profile

    args = profile.parser().parse_args(["ldm", *argv])
    profile._fill_defaults(args, on_gpu=False)
    assert {name: getattr(args, name) for name in expected} == expected
