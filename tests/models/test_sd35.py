"""StableDiffusion3Model on SD3.5-style transformers (RMSNorm q/k norms, dual attention in
the first block) against diffusers' StableDiffusion3Pipeline: saved with save_pretrained,
loaded with from_pretrained, equal final latents (the helpers of test_sd3). Also the
sd35 presets' configurations."""

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from mmfast.models import StableDiffusion3Model  # noqa: E402
from tests.models.test_sd3 import SIDE, _close, _embeds, _tiny_pipeline, one_thread, torch_blocks  # noqa: E402,F401
from tests.nn.test_sd35_blocks import randomise_norm_weights  # noqa: E402


def _sd35_pipeline(heads, head_dim):
    """test_sd3's tiny pipeline with an SD3.5 transformer: 2 blocks, the first with dual attention."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = _tiny_pipeline(with_t5=False)
    torch.manual_seed(1)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=head_dim,
        num_attention_heads=heads, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
        out_channels=4, qk_norm="rms_norm", dual_attention_layers=(0,))
    pipe = StableDiffusion3Pipeline(**{**pipe.components, "transformer": randomise_norm_weights(transformer).eval()})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _loaded(pipe, path):
    pipe.save_pretrained(path, safe_serialization=True)
    ours = StableDiffusion3Model.from_pretrained(path)
    blocks = ours.transformer.transformer_blocks
    assert [type(b).__module__ for b in blocks] == ["mmfast.nn.dit"] * 2 and blocks[0].use_dual_attention
    return ours


def test_sd35_guided_latents_match_diffusers(tmp_path, torch_blocks):
    pipe = _sd35_pipeline(heads=4, head_dim=8)
    ours = _loaded(pipe, tmp_path)
    kwargs = dict(num_inference_steps=2, guidance_scale=5.0, height=SIDE, width=SIDE)
    expected = pipe(output_type="latent", generator=torch.Generator().manual_seed(4), **_embeds(batch=2),
                    **kwargs).images
    actual = ours.generate(generator=torch.Generator().manual_seed(4), progress=False, **_embeds(batch=2), **kwargs)
    _close(actual, expected)


def test_sd35_triton_kernels_end_to_end(tmp_path):
    """Every mmfast kernel on Triton (interpreted on a CPU): attention with 32-wide heads
    (joint and attn2), the q/k rms_norm, adaLN, GELU and the fused step, one guided step."""
    from mmfast.profile.measure import record_backends

    pipe = _sd35_pipeline(heads=1, head_dim=32)
    ours = _loaded(pipe, tmp_path)
    e = _embeds(tokens=4)
    kwargs = dict(num_inference_steps=1, guidance_scale=4.0, height=8, width=8)
    expected = pipe(output_type="latent", generator=torch.Generator().manual_seed(7), **e, **kwargs).images
    ran = set()
    with record_backends(ran):
        actual = ours.generate(generator=torch.Generator().manual_seed(7), progress=False, **e, **kwargs)
    _close(actual, expected)
    assert {op for op, _ in ran} >= {"attention", "norm", "adaln", "scheduler_step"}, ran
    assert all(backend.startswith("triton") for _, backend in ran), ran


@pytest.mark.parametrize("name, layers, heads, dual", [("sd35-medium", 24, 24, 13), ("sd35-large", 38, 38, 0)])
def test_sd35_presets_swap_every_block(name, layers, heads, dual):
    """The published configs, built on the meta device (no memory): every block becomes
    mmfast's, the dual-attention ones included."""
    from diffusers import SD3Transformer2DModel

    from mmfast.models.sd3_presets import SD3_PRESETS
    from mmfast.nn.sd3_transformer import use_mmfast_mmdit_blocks

    config = SD3_PRESETS[name]["transformer"]
    assert config["qk_norm"] == "rms_norm" and config["num_layers"] == layers
    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
        use_mmfast_mmdit_blocks(model)
    blocks = model.transformer_blocks
    assert all(type(b).__module__ == "mmfast.nn.dit" for b in blocks) and blocks[0].attn.heads == heads
    assert sum(b.use_dual_attention for b in blocks) == dual


def test_profile_ldm_takes_the_sd35_presets(tmp_path, monkeypatch):
    """`mmfast profile ldm --preset sd35-medium` end to end, the preset shrunk to sd3-tiny's
    sizes (keeping its q/k norms and dual attention): the CLI path the real one takes."""
    import json

    from mmfast.cli import main
    from mmfast.models.sd3_presets import SD3_PRESETS
    from mmfast.nn import sd3_transformer

    swapped = []
    swap = sd3_transformer.use_mmfast_mmdit_blocks
    monkeypatch.setattr(sd3_transformer, "use_mmfast_mmdit_blocks", lambda model: swapped.extend(swap(model)))

    tiny = SD3_PRESETS["sd3-tiny"]
    shrunk = {**tiny, "transformer": {**tiny["transformer"], "qk_norm": "rms_norm", "dual_attention_layers": (0,)}}
    monkeypatch.setitem(SD3_PRESETS, "sd35-medium", shrunk)
    assert main(["profile", "ldm", "--preset", "sd35-medium", "--steps", "1", "--out", str(tmp_path), "--repeats",
                 "1", "--backend", "torch", "--dtype", "float32", "--top", "5"]) == 0
    data = json.loads((tmp_path / "profile_ldm_sd35-medium.json").read_text())
    assert data["preset"] == "sd35-medium" and data["sides"][1]["name"] == "diffusers StableDiffusion3Pipeline"
    assert {"transformer_blocks.0", "transformer_blocks.1"} <= set(swapped)  # block 0: dual attention
