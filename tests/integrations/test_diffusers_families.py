"""mmfast.patch on tiny random diffusers models: UNet2DConditionModel, SD3 and DiT
transformers, and a pipeline. Patched outputs match unpatched ones; undo restores exactly."""

import pytest
import torch

import mmfast
from tests.integrations.diffusers_models import (
    dit_inputs, sd3_inputs, tiny_dit, tiny_sd3, tiny_unet, unet_inputs)

pytest.importorskip("diffusers")


def _processors(model):
    return {name: m.processor for name, m in model.named_modules() if type(m).__name__ == "Attention"}


def _check_patch_and_undo(model, inputs, expected_family):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    processors = _processors(model)
    with torch.no_grad():
        before = model(**inputs).sample
        handle = mmfast.patch(model)
        assert handle.family == expected_family
        assert {type(p).__name__ for p in _processors(model).values()} <= {"AttnProcessor", "JointAttnProcessor"}
        patched = model(**inputs).sample
        handle.undo()
        after = model(**inputs).sample
    # fp32 everywhere: differences are summation order only.
    torch.testing.assert_close(patched, before, rtol=1e-4, atol=1e-5)
    assert torch.equal(after, before)
    assert all(_processors(model)[n] is p for n, p in processors.items())
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    return handle


def test_unet2d_condition(device):
    model = tiny_unet().to(device)
    inputs = {k: v.to(device) for k, v in unet_inputs().items()}
    # Text padding: the last three text tokens masked, as with a padded prompt (the mask
    # reaches the processors as an additive bias: the variable-length path).
    inputs["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 1, 0, 0, 0]], device=device)
    _check_patch_and_undo(model, inputs, "diffusers-unet2d-condition")


def test_sd3_transformer(device):
    model = tiny_sd3().to(device)
    _check_patch_and_undo(model, {k: v.to(device) for k, v in sd3_inputs().items()}, "diffusers-sd3-transformer")


def test_dit_transformer(device):
    model = tiny_dit().to(device)
    _check_patch_and_undo(model, {k: v.to(device) for k, v in dit_inputs().items()}, "diffusers-dit-transformer")


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2).eval()


def test_autoencoder_kl():
    """encode (posterior mean) then decode, patched vs unpatched; torch backends (the kernels
    are checked in tests/ops, and through the VAE in tests/nn/test_vae.py)."""
    model = _tiny_vae()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    silu = model.decoder.conv_act
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad(), mmfast.set_backend("torch"):
        before = model(x).sample
        handle = mmfast.patch(model)
        assert handle.family == "diffusers-autoencoder-kl"
        names = dict(handle.replaced)
        assert "decoder.mid_block.attentions.0" in names and "encoder.down_blocks.0.resnets.0" in names
        assert "decoder.up_blocks.1.resnets.1" in names  # the decoder's "group" blocks: no time embedding
        assert "decoder.conv_norm_out" in names and isinstance(model.decoder.conv_act, torch.nn.Identity)
        patched = model(x).sample
        handle.undo()
        after = model(x).sample
    torch.testing.assert_close(patched, before, rtol=1e-4, atol=1e-5)
    assert torch.equal(after, before)
    assert model.decoder.conv_act is silu
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_pipeline_patches_its_denoiser_vae_and_scheduler_and_undoes():
    from diffusers import DDIMScheduler, DiTPipeline

    pipe = DiTPipeline(transformer=tiny_dit(), vae=_tiny_vae(), scheduler=DDIMScheduler())
    step = pipe.scheduler.step
    vae_processors = _processors(pipe.vae)
    handle = mmfast.patch(pipe)
    assert handle.family == "diffusers-pipeline"
    names = [name for name, _ in handle.replaced]
    assert "transformer_blocks.0.attn1" in names
    assert {type(p).__name__ for p in _processors(pipe.transformer).values()} == {"AttnProcessor"}
    assert "decoder.mid_block.attentions.0" in names and "forward" in vars(pipe.vae.decoder.mid_block.attentions[0])
    assert "step" in vars(pipe.scheduler) and pipe.scheduler.step != step  # the fused step
    with pytest.raises(ValueError, match="already patched"):
        mmfast.patch(pipe)
    handle.undo()
    assert {type(p).__name__ for p in _processors(pipe.transformer).values()} == {"AttnProcessor2_0"}
    assert "step" not in vars(pipe.scheduler) and pipe.scheduler.step == step
    assert _processors(pipe.vae) == vae_processors
    assert not any("forward" in vars(m) for m in pipe.vae.modules())


def test_unsupported_processors_are_left_alone():
    from diffusers.models.attention_processor import AttnProcessor

    model = tiny_dit()
    model.transformer_blocks[0].attn1.set_processor(AttnProcessor())
    handle = mmfast.patch(model)
    assert type(model.transformer_blocks[0].attn1.processor) is AttnProcessor
    assert type(model.transformer_blocks[1].attn1.processor).__name__ == "AttnProcessor"  # mmfast's
    assert model.transformer_blocks[1].attn1.processor.__module__.startswith("mmfast")
    handle.undo()


@pytest.mark.gpu
def test_patched_unet_step_captures_in_a_cuda_graph(device):
    # The patched denoiser step syncs nowhere without a mask: one CUDA graph per resolution.
    model = tiny_unet().to(device=device, dtype=torch.float16).to(memory_format=torch.channels_last)
    inputs = {k: (v.to(device, torch.float16) if v.is_floating_point() else v.to(device))
              for k, v in unet_inputs(batch=2).items()}
    with torch.no_grad():
        expected = model(**inputs).sample
        mmfast.patch(model)
        model(**inputs)  # warm-up: compiles the kernels outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(**inputs).sample
        graph.replay()
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


def test_patched_pipeline_generates_the_same_image():
    # Two DDIM steps with guidance through DiTPipeline: patched denoiser and fused
    # scheduler step against the stock pipeline, same seed.
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4).eval()
    # DiTPipeline's "no class" label is ImageNet's 1000.
    pipe = DiTPipeline(transformer=tiny_dit(num_classes=1000), vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe(class_labels=[3], num_inference_steps=2, guidance_scale=4.0, output_type="np",
                    generator=torch.Generator().manual_seed(5)).images

    expected = generate()
    with mmfast.patch(pipe):
        got = generate()
    assert abs(got - expected).max() < 1e-4


def test_pipeline_patches_its_clip_text_encoder():
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=99, hidden_size=24, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=9)).eval()
    pipe = StableDiffusionPipeline(unet=tiny_unet(), vae=_tiny_vae(), text_encoder=text, tokenizer=None,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    ids = torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pipe.text_encoder(ids)[0]
        handle = mmfast.patch(pipe)
        assert any("forward" in vars(m) for m in pipe.text_encoder.modules())  # the mmfast text tower
        torch.testing.assert_close(pipe.text_encoder(ids)[0], before, rtol=1e-5, atol=1e-5)
        handle.undo()
        assert not any("forward" in vars(m) for m in pipe.text_encoder.modules())
        assert torch.equal(pipe.text_encoder(ids)[0], before)


def _tiny_clip_text():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(vocab_size=99, hidden_size=24, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=9)).eval()


def test_pipeline_of_text_components_only_gets_its_text_encoder_patched():
    # Regression: a pipeline without a denoiser was refused ("holds no denoiser").
    from diffusers import DiffusionPipeline

    class TextOnly(DiffusionPipeline):
        def __init__(self, text_encoder, tokenizer):
            super().__init__()
            self.register_modules(text_encoder=text_encoder, tokenizer=tokenizer)

    pipe = TextOnly(text_encoder=_tiny_clip_text(), tokenizer=None)
    ids = torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pipe.text_encoder(ids)[0]
        with mmfast.patch(pipe) as handle:
            assert handle.family == "diffusers-pipeline" and handle.replaced
            assert any("forward" in vars(m) for m in pipe.text_encoder.modules())
            torch.testing.assert_close(pipe.text_encoder(ids)[0], before, rtol=1e-5, atol=1e-5)
        assert not any("forward" in vars(m) for m in pipe.text_encoder.modules())

    class Nothing(DiffusionPipeline):
        def __init__(self, tokenizer):
            super().__init__()
            self.register_modules(tokenizer=tokenizer)

    with pytest.raises(TypeError, match="holds no component mmfast supports"):
        mmfast.patch(Nothing(tokenizer=None))
