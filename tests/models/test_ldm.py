"""mmfast's LatentDiffusionModel against diffusers' StableDiffusion pipelines: a tiny random
pipeline saved with save_pretrained, loaded with LatentDiffusionModel.from_pretrained, and
final latents compared for the same prompt embeddings and seed.

fp32 throughout, so the tolerance is fp32 accumulation-order noise over a few steps. The
Triton interpreter needs ~10 s per UNet evaluation of even this tiny model on a CPU, so
the comparisons run the UNet's mmfast blocks on their PyTorch backend and only the fused
scheduler step on Triton (``torch_blocks``); one test runs every kernel on Triton for a
single guided step.
"""

import json
import shutil

import pytest
import torch

import mmfast

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from mmfast.models import LatentDiffusionModel  # noqa: E402
from tests.models.faults import break_weights  # noqa: E402

TEXT_DIM = 32
TOKENS = 8


def _tiny_pipeline(scheduler_class: str):
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=2, cross_attention_dim=TEXT_DIM, attention_head_dim=(1, 2),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=2, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=100, hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=TOKENS, bos_token_id=0, eos_token_id=2, pad_token_id=1))
    scheduler = getattr(diffusers, scheduler_class)(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        **({"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
           if scheduler_class == "DDIMScheduler" else {}))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


@pytest.fixture(scope="module", params=["DDIMScheduler", "EulerDiscreteScheduler"])
def saved(request, tmp_path_factory):
    pipe = _tiny_pipeline(request.param)
    path = tmp_path_factory.mktemp(request.param)
    pipe.save_pretrained(path, safe_serialization=True)
    return pipe, path


@pytest.fixture(scope="module")
def model(saved):
    return LatentDiffusionModel.from_pretrained(saved[1])


@pytest.fixture
def torch_blocks():
    """mmfast's blocks on their PyTorch backend, the fused guided step on Triton."""
    with mmfast.set_backend("torch"), mmfast.set_backend("triton", op="scheduler_step"):
        yield


def _embeds(batch=2, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TOKENS, TEXT_DIM, generator=gen), torch.randn(batch, TOKENS, TEXT_DIM, generator=gen)


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def _text_to_image(saved, model, batch, steps):
    pipe, _ = saved
    cond, uncond = _embeds(batch)
    kwargs = dict(num_inference_steps=steps, guidance_scale=5.0, height=16, width=16)
    expected = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, output_type="latent",
                    generator=torch.Generator().manual_seed(7), **kwargs).images
    actual = model.generate(cond, negative_prompt_embeds=uncond, generator=torch.Generator().manual_seed(7),
                            progress=False, **kwargs)
    assert actual.shape == (batch, 4, 8, 8)
    _close(actual, expected)


def test_text_to_image_latents_match_diffusers(saved, model, torch_blocks):
    _text_to_image(saved, model, batch=2, steps=3)


def test_triton_kernels_end_to_end(saved, model):
    if "DDIM" not in saved[1].name:
        pytest.skip("one scheduler is enough for the slow all-Triton run")
    _text_to_image(saved, model, batch=1, steps=1)


def test_token_ids_and_decode_match_diffusers(saved, model, torch_blocks):
    """input_ids through the CLIP text encoder, no guidance, decoded to images."""
    pipe, _ = saved
    ids = torch.tensor([[0, 5, 17, 2, 1, 1, 1, 1]])
    cond = pipe.text_encoder(ids)[0]
    expected = pipe(prompt_embeds=cond, num_inference_steps=2, guidance_scale=1.0, height=16, width=16,
                    output_type="pt", generator=torch.Generator().manual_seed(1)).images
    actual = model.generate(input_ids=ids, num_inference_steps=2, guidance_scale=1.0, output_type="pt",
                            generator=torch.Generator().manual_seed(1), progress=False)
    assert actual.shape == (1, 3, 16, 16)
    _close(actual, expected)


def test_image_to_image_matches_diffusers(saved, model, torch_blocks):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe, _ = saved
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    cond, uncond = _embeds(batch=1)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    kwargs = dict(num_inference_steps=4, strength=0.5, guidance_scale=3.0)
    expected = img2img(prompt_embeds=cond, negative_prompt_embeds=uncond, image=image, output_type="latent",
                       generator=torch.Generator().manual_seed(5), **kwargs).images
    actual = model.generate(cond, negative_prompt_embeds=uncond, image=image, progress=False,
                            generator=torch.Generator().manual_seed(5), **kwargs)
    _close(actual, expected)


# ---- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("height, width, name", [(17, 16, "height"), (16, 0, "width")])
def test_resolution_the_vae_cannot_take(model, height, width, name, torch_blocks):
    cond, uncond = _embeds(batch=1)
    with pytest.raises(ValueError, match=f"{name}: .* multiple of the VAE's downsampling factor 2"):
        model.generate(cond, negative_prompt_embeds=uncond, num_inference_steps=1, height=height, width=width,
                       progress=False)


def test_bad_generate_arguments(model, torch_blocks):
    cond, uncond = _embeds(batch=1)
    with pytest.raises(ValueError, match="negative_prompt_embeds: .*without a tokenizer"):
        model.generate(cond, num_inference_steps=1, guidance_scale=5.0, progress=False)
    with pytest.raises(ValueError, match="prompt_embeds: last dimension 7 is not the UNet's cross_attention_dim"):
        model.generate(torch.zeros(1, TOKENS, 7), num_inference_steps=1, guidance_scale=1.0, progress=False)
    with pytest.raises(ValueError, match="image: height 15 is not a multiple"):
        model.generate(cond, negative_prompt_embeds=uncond, image=torch.rand(1, 3, 15, 16), progress=False,
                       num_inference_steps=1)
    with pytest.raises(ValueError, match=r"image: values must lie in \[0, 1\]"):
        model.generate(cond, negative_prompt_embeds=uncond, image=torch.rand(1, 3, 16, 16) * 2 - 1,
                       progress=False, num_inference_steps=1)
    with pytest.raises(ValueError, match="output_type"):
        model.generate(cond, negative_prompt_embeds=uncond, output_type="pil", progress=False)


def _broken_copy(saved, tmp_path):
    target = tmp_path / "pipe"
    shutil.copytree(saved[1], target)
    return target


def test_missing_component_and_pickle_only_weights(saved, tmp_path):
    path = _broken_copy(saved, tmp_path)
    shutil.rmtree(path / "vae")
    with pytest.raises(FileNotFoundError, match="vae: .* has no vae/ folder"):
        LatentDiffusionModel.from_pretrained(path)
    (path / "unet" / "diffusion_pytorch_model.safetensors").rename(path / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="unet: no safetensors weights .*pickle"):
        LatentDiffusionModel.from_pretrained(path)


def test_mismatched_tensors_are_named(saved, tmp_path):
    path = _broken_copy(saved, tmp_path)
    break_weights(path / "unet" / "diffusion_pytorch_model.safetensors", "conv_in.bias", "conv_out.weight")
    with pytest.raises(ValueError, match=r"unet: .*missing keys: conv_in\.bias.*unexpected keys: extra\.weight"
                                         r".*shape mismatches: conv_out\.weight: checkpoint \(2, "):
        LatentDiffusionModel.from_pretrained(path)


def test_unknown_architecture(saved, tmp_path):
    path = _broken_copy(saved, tmp_path)
    index = json.loads((path / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DModel"]
    (path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="unet: unsupported architecture 'UNet2DModel'"):
        LatentDiffusionModel.from_pretrained(path)


# ---- the denoising loop for CUDA graphs ----------------------------------------------------------


def _graph_vs_host(model, device, steps=3, **kwargs):
    cond, uncond = (e.to(device) for e in _embeds(batch=1))
    common = dict(negative_prompt_embeds=uncond, num_inference_steps=steps, guidance_scale=4.0, progress=False,
                  **kwargs)
    for seed in (7, 8):  # the second call reuses the graph: table, counter and inputs start over
        expected = model.generate(cond, generator=torch.Generator().manual_seed(seed), **common)
        actual = model.generate(cond, generator=torch.Generator().manual_seed(seed), cuda_graph=True, **common)
        _close(actual, expected)


def test_device_schedule_loop_matches_host_loop(saved, model, torch_blocks, monkeypatch):
    """The CUDA graph's body (timestep and coefficients from the device table, in-place
    update of static tensors), run eagerly on the CPU, against the host loop."""
    monkeypatch.setattr(model, "_capture_graphs", False)
    _graph_vs_host(model, "cpu")
    _graph_vs_host(model, "cpu", image=torch.rand(1, 3, 16, 16), strength=0.7)  # starts part-way: new key


def test_cuda_graph_needs_cuda(model):
    if model.device.type == "cuda":
        pytest.skip("the model is on CUDA")
    with pytest.raises(ValueError, match="cuda_graph: needs the model on a CUDA device"):
        model.generate(*_embeds(batch=1)[:1], guidance_scale=1.0, cuda_graph=True, progress=False)


@pytest.mark.gpu
def test_cuda_graph_matches_host_loop(saved):
    model = LatentDiffusionModel.from_pretrained(saved[1], device="cuda")
    _graph_vs_host(model, "cuda", steps=4)
    assert model._graph_cache is not None and model._graph_cache[1] is not None


def _tiny_tokenizer(folder):
    """A character-level CLIP tokenizer: no merges, ids inside the tiny text encoder's vocab."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!",
                         model_max_length=TOKENS)


def test_text_prompt_through_the_tokenizer(saved, tmp_path, torch_blocks):
    """tokenizer/ loads from the pipeline directory; the default negative is the empty prompt."""
    from diffusers import StableDiffusionPipeline

    if "DDIM" not in saved[1].name:
        pytest.skip("the tokenizer does not depend on the scheduler")
    tokenizer = _tiny_tokenizer(tmp_path / "vocab")
    path = _broken_copy(saved, tmp_path)
    tokenizer.save_pretrained(path / "tokenizer")
    pipe = StableDiffusionPipeline(**{**saved[0].components, "tokenizer": tokenizer})
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=2, guidance_scale=3.0, height=16, width=16)
    expected = pipe(prompt=["a cat", "dog"], output_type="latent", generator=torch.Generator().manual_seed(4),
                    **kwargs).images
    model = LatentDiffusionModel.from_pretrained(path)
    actual = model.generate(prompt=["a cat", "dog"], generator=torch.Generator().manual_seed(4), progress=False,
                            **kwargs)
    _close(actual, expected)


def test_sharded_weights_load(saved, tmp_path):
    if "DDIM" not in saved[1].name:
        pytest.skip("sharding does not depend on the scheduler")
    pipe, _ = saved
    path = _broken_copy(saved, tmp_path)
    shutil.rmtree(path / "unet")
    pipe.unet.save_pretrained(path / "unet", safe_serialization=True, max_shard_size="100KB")
    assert (path / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model = LatentDiffusionModel.from_pretrained(path)
    expected = pipe.unet.state_dict()
    loaded = model.unet.state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)


def _same_weights(loaded, expected):
    assert loaded.state_dict().keys() == expected.state_dict().keys()
    for name, tensor in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_save_pretrained_loads_in_diffusers_and_back(saved, model, tmp_path, torch_blocks):
    """mmfast -> save_pretrained (sharded, with a tokenizer) -> diffusers' StableDiffusionPipeline
    gives equal final latents for a guided text prompt; -> mmfast gives the same model."""
    from diffusers import StableDiffusionPipeline

    if "Euler" not in saved[1].name:
        pytest.skip("one scheduler is enough to save")
    ours = LatentDiffusionModel(model.text_encoder, model.unet, model.vae, model.scheduler,
                                _tiny_tokenizer(tmp_path / "vocab"))
    path = ours.save_pretrained(tmp_path / "pipe", max_shard_size="100KB")
    assert (path / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    theirs = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    assert type(theirs.unet).__name__ == "UNet2DConditionModel" and type(theirs.scheduler) is type(model.scheduler)
    kwargs = dict(num_inference_steps=2, guidance_scale=3.0, height=16, width=16)
    expected = theirs(prompt=["a cat", "dog"], output_type="latent", generator=torch.Generator().manual_seed(4),
                      **kwargs).images
    actual = ours.generate(prompt=["a cat", "dog"], generator=torch.Generator().manual_seed(4), progress=False,
                           **kwargs)
    _close(actual, expected)
    back = mmfast.models.from_pretrained(path)
    assert isinstance(back, LatentDiffusionModel) and back.tokenizer.get_vocab() == ours.tokenizer.get_vocab()
    assert dict(back.scheduler.config) == dict(ours.scheduler.config)
    for name in ("text_encoder", "unet", "vae"):
        _same_weights(getattr(back, name), getattr(ours, name))
