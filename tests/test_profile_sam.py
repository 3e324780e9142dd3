"""``mmfast profile sam``: the SAM image encoder patched with mmfast.patch against the same
weights on transformers' sdpa and eager attention. The tiny preset runs end to end on a
CPU (the mmfast side on its ops' PyTorch backends) and writes its JSON; the sides give
the same embeddings; the defaults (sam-vit-b on a GPU, tiny on a CPU); the presets have
the real encoders' sizes; a preset that does not fit, or a resolution SAM does not take,
is refused before anything is built."""

import importlib.util
import json

import pytest
import torch

pytest.importorskip("transformers")

from mmfast.cli import main  # noqa: E402
from mmfast.profile import _fill_defaults, measure, memory, parser, sam  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    # The tiny encoder is far too small for intra-op threads; on a busy shared CPU they spin.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Built(Exception):
    """Raised by a stand-in for the build: reaching it means the checks let the run through."""


@pytest.fixture
def no_build(monkeypatch):
    def build(*args, **kwargs):
        raise Built(args, kwargs)
    monkeypatch.setattr(sam, "build", build)


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(["profile", *argv]))
    assert exit_info.value.code in (1, 2)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err and err[-1].startswith("mmfast profile: error: "), err
    return err[-1]


def test_tiny_end_to_end(tmp_path, capsys):
    assert main(["profile", "sam", "--repeats", "2", "--warmup", "0", "--batch", "2", "--backend", "torch",
                 "--dtype", "float32", "--top", "4", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "NOT GPU numbers" in printed and "image encoder per batch s (lower is better)" in printed
    data = json.loads((tmp_path / "profile_sam_tiny.json").read_text())
    assert data["kind"] == "sam" and data["preset"] == "tiny" and data["device"] == "cpu"
    assert data["batch"] == 2 and data["resolution"] == 128 and data["measurement"]["rounds"] == 2
    assert [side["name"] for side in data["sides"]] == ["mmfast", "transformers sdpa", "transformers eager"]
    for side in data["sides"]:
        encode, images = side["metrics"]["encode_s"], side["metrics"]["images_per_s"]
        assert encode["n"] == images["n"] == 2
        assert images["samples"] == pytest.approx([2 / s for s in encode["samples"]])
        assert side["metrics"]["peak_memory_gib"] is None  # no allocator statistics on a CPU
        assert 0 < len(side["ops"]) <= 4
    for side in data["sides"][1:]:
        assert side["mmfast_speedup"]["encode_s"]["median"] > 0
    assert data["speedup_basis"] == "reference encode_s / mmfast encode_s"
    # the fused op ran on the mmfast side, on the backend asked for
    assert "attention_rel_pos=torch" in data["backends_ran"]
    assert all(entry.endswith("=torch") for entry in data["backends_ran"])
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "profile_sam_tiny.png").exists()


def test_the_sides_give_the_same_embeddings():
    import mmfast

    ours, reference, eager, _ = sam.build("tiny", torch.device("cpu"), torch.float32)
    # what makes the comparison mean something: a bias that is not zero, images that differ
    assert all(p.abs().max() > 0 for name, p in reference.named_parameters() if "rel_pos" in name)
    pixels = sam.inputs(reference, 2, torch.device("cpu"), torch.float32)
    ran = set()
    with measure.record_backends(ran), mmfast.set_backend("torch"):
        embeddings = [side.encode() for side in sam.sides(ours, reference, eager, pixels)]
    assert ("attention_rel_pos", "torch") in ran  # the mmfast side is patched
    assert embeddings[0].shape == (2, 32, 8, 8)
    assert not torch.allclose(embeddings[0][0], embeddings[0][1], atol=1e-3)
    for other in embeddings[1:]:
        torch.testing.assert_close(embeddings[0], other, rtol=1e-4, atol=1e-5)


def test_defaults_are_sam_vit_b_on_a_gpu_and_tiny_on_a_cpu():
    for on_gpu, want in ((True, ("sam-vit-b", "bfloat16", True)), (False, ("tiny", "float32", False))):
        args = parser().parse_args(["sam"])
        _fill_defaults(args, on_gpu)
        assert (args.preset, args.dtype, args.compile_reference) == want
    args = parser().parse_args(["sam", "--preset", "sam-vit-h"])
    _fill_defaults(args, True)
    assert args.preset == "sam-vit-h" and args.checkpoint is None and args.cuda_graph is False


def test_presets_are_the_real_encoders():
    # SAM's ViT-B and ViT-H image encoders: 89.67 M and 637.03 M parameters, at 1024 px
    assert sam.image_size("sam-vit-b") == sam.image_size("sam-vit-h") == 1024
    for preset, millions in (("sam-vit-b", 89.67), ("sam-vit-h", 637.03)):
        estimate = memory.estimate_sam(preset, torch.bfloat16)
        assert round(estimate.parameters / 3 / 1e6, 2) == millions
        assert estimate.weight_bytes == 2 * estimate.parameters
    vit_h = sam.config("sam-vit-h")
    assert (vit_h.hidden_size, vit_h.num_hidden_layers, vit_h.num_attention_heads, vit_h.mlp_dim,
            list(vit_h.global_attn_indexes), vit_h.window_size, vit_h.output_channels) == (
        1280, 32, 16, 5120, [7, 15, 23, 31], 14, 256)


def test_estimate_counts_what_the_build_holds():
    ours, reference, eager, _ = sam.build("tiny", torch.device("cpu"), torch.float32)
    held = sum(p.numel() for model in (ours, reference, eager) for p in model.parameters())
    assert memory.estimate_sam("tiny", torch.float32).parameters == held


def test_the_estimate_grows_with_the_batch():
    # the eager side's global-layer scores: [batch, heads, 4096, 4096] twice in bfloat16, once in float32
    one, eight = (memory.estimate_sam("sam-vit-h", torch.bfloat16, batch) for batch in (1, 8))
    assert one.activation_bytes == 16 * 4096**2 * (2 + 2 + 4)
    assert eight.total_bytes - one.total_bytes == 7 * one.activation_bytes
    assert "attention scores of a global layer at batch 8" in eight.describe()


def test_sam_vit_h_that_does_not_fit_is_refused(monkeypatch, capsys, no_build):
    vit_b = memory.estimate_sam("sam-vit-b", torch.bfloat16).total_bytes
    monkeypatch.setattr(memory, "available_bytes",
                        lambda device: (vit_b + memory.GIB // 2, "of RAM available"))
    line = _error(["sam", "--preset", "sam-vit-h", "--dtype", "bfloat16"], capsys)
    need = memory.estimate_sam("sam-vit-h", torch.bfloat16)
    assert f"--preset sam-vit-h (bfloat16): needs about {need.total_bytes / memory.GIB:.1f} GiB" in line
    assert "--preset sam-vit-b fits" in line and "--force" in line
    with pytest.raises(Built):  # sam-vit-b fits the same machine
        main(["profile", "sam", "--preset", "sam-vit-b", "--dtype", "bfloat16"])


def test_a_resolution_sam_does_not_take_is_refused_before_building(capsys, no_build):
    line = _error(["sam", "--preset", "sam-vit-b", "--resolution", "512"], capsys)
    assert "--resolution: SAM's image encoder takes 1024 px images only" in line and "got 512" in line


def test_help_names_the_sam_kind(capsys):
    with pytest.raises(SystemExit):
        main(["profile", "sam", "--help"])
    text = capsys.readouterr().out
    assert "sam-vit-b" in text and "sam-vit-h" in text and "`" not in text


def test_without_transformers_the_command_names_the_extra(monkeypatch, capsys, no_build):
    from mmfast.profile import preflight

    real = preflight.importlib.util.find_spec
    monkeypatch.setattr(preflight.importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    line = _error(["sam"], capsys)
    assert "mmfast profile sam needs transformers" in line and "pip install 'mmfast[hf]'" in line
