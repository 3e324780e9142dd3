"""mmfast's StableDiffusion3Model against diffusers' StableDiffusion3 pipelines: tiny random
components built as diffusers' own SD3 pipeline tests build them, saved with
save_pretrained (with and without the T5 text encoder), loaded with from_pretrained, and
final latents compared for the same prompts and seed.

fp32 throughout, so the tolerance is fp32 accumulation-order noise over a few steps. As in
test_ldm, the comparisons run mmfast's blocks on their PyTorch backend and the fused
flow-match step on Triton (``torch_blocks``); one test runs every kernel on Triton (a
transformer with 32-wide heads, which Triton's attention takes) and checks that it did.
"""

import json
import shutil

import pytest
import torch

import mmfast

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from mmfast.models import LatentDiffusionModel, StableDiffusion3Model  # noqa: E402
from tests.models.faults import break_weights  # noqa: E402

CLIP_TOKENS = 8
SIDE = 16  # pixels: 8 x 8 latents, 64 image tokens


def _transformer(heads=4, head_dim=8):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
                                 attention_head_dim=head_dim, num_attention_heads=heads, caption_projection_dim=32,
                                 joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)


def _clip():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=100, hidden_act="gelu",
        projection_dim=32, max_position_embeddings=CLIP_TOKENS))


def _tiny_pipeline(with_t5: bool, heads=4, head_dim=8):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    t5 = (T5EncoderModel(T5Config(vocab_size=100, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                  relative_attention_num_buckets=8)) if with_t5 else None)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=2, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    pipe = StableDiffusion3Pipeline(
        transformer=_transformer(heads, head_dim), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=_clip(), text_encoder_2=_clip(), text_encoder_3=t5, tokenizer=None, tokenizer_2=None,
        tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # as from_pretrained leaves them (T5 has dropout)
    return pipe.to(torch.float32)


@pytest.fixture(scope="module", params=["t5", "no_t5"])
def saved(request, tmp_path_factory):
    pipe = _tiny_pipeline(with_t5=request.param == "t5")
    path = tmp_path_factory.mktemp(f"sd3_{request.param}")
    pipe.save_pretrained(path, safe_serialization=True)
    return pipe, path


@pytest.fixture(scope="module")
def model(saved):
    return StableDiffusion3Model.from_pretrained(saved[1])


@pytest.fixture(autouse=True)
def one_thread():
    # Far too small for intra-op threads: on a busy shared CPU they spin against other processes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def torch_blocks():
    """mmfast's blocks on their PyTorch backend, the fused guided step on Triton."""
    with mmfast.set_backend("torch"), mmfast.set_backend("triton", op="scheduler_step"):
        yield


def _embeds(batch=1, tokens=12, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(batch, tokens, 32, generator=gen),
            "pooled_prompt_embeds": torch.randn(batch, 64, generator=gen),
            "negative_prompt_embeds": torch.randn(batch, tokens, 32, generator=gen),
            "negative_pooled_prompt_embeds": torch.randn(batch, 64, generator=gen)}


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def _tiny_tokenizer(folder, pad_token):
    """A character-level CLIP tokenizer: no merges, ids inside the tiny encoders' vocab."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token,
                         model_max_length=CLIP_TOKENS)


@pytest.fixture(scope="module")
def with_tokenizers(saved, tmp_path_factory):
    """The saved pipeline plus CLIP tokenizers (tokenizer/, tokenizer_2/ in the directory);
    T5 gets a character-level tokenizer too, handed to both sides directly (a real T5
    tokenizer needs a downloaded vocabulary, and mmfast loads T5 tokenizers only)."""
    pipe, path = saved
    root = tmp_path_factory.mktemp("tokenizers")
    tokenizers = {"tokenizer": _tiny_tokenizer(root / "1", "<|endoftext|>"),
                  "tokenizer_2": _tiny_tokenizer(root / "2", "!"),
                  "tokenizer_3": _tiny_tokenizer(root / "3", "!") if pipe.text_encoder_3 is not None else None}
    target = tmp_path_factory.mktemp("with_tokenizers") / "pipe"
    shutil.copytree(path, target)
    index = json.loads((target / "model_index.json").read_text())
    for name in ("tokenizer", "tokenizer_2"):
        tokenizers[name].save_pretrained(target / name)
        index[name] = ["transformers", "CLIPTokenizer"]
    (target / "model_index.json").write_text(json.dumps(index))
    ours = StableDiffusion3Model.from_pretrained(target)
    assert type(ours.tokenizer).__name__ == "CLIPTokenizer" and ours.tokenizer_2.pad_token == "!"
    ours.tokenizer_3 = tokenizers["tokenizer_3"]
    from diffusers import StableDiffusion3Pipeline

    theirs = StableDiffusion3Pipeline(**{**pipe.components, **tokenizers})
    theirs.set_progress_bar_config(disable=True)
    return theirs, ours


# ---- equal to diffusers ----------------------------------------------------------------------


def test_text_prompt_with_guidance_matches_diffusers(with_tokenizers, torch_blocks):
    """Prompts through the tokenizers and all text encoders (T5 or its zeros), the empty
    negative prompt by default, guided denoising with the shifted flow-match schedule."""
    theirs, ours = with_tokenizers
    kwargs = dict(num_inference_steps=3, guidance_scale=5.0, height=SIDE, width=SIDE, max_sequence_length=6)
    expected = theirs(prompt=["a cat", "dog"], output_type="latent", generator=torch.Generator().manual_seed(4),
                      **kwargs).images
    actual = ours.generate(prompt=["a cat", "dog"], generator=torch.Generator().manual_seed(4), progress=False,
                           **kwargs)
    assert actual.shape == (2, 4, SIDE // 2, SIDE // 2)
    _close(actual, expected)


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_encode_text_matches_diffusers(with_tokenizers, clip_skip):
    theirs, ours = with_tokenizers
    expected = theirs.encode_prompt("a dog", None, None, do_classifier_free_guidance=False, clip_skip=clip_skip,
                                    max_sequence_length=5)
    embeds, pooled = ours.encode_text(ours.tokenize("a dog", max_sequence_length=5), clip_skip=clip_skip,
                                      max_sequence_length=5)
    assert embeds.shape == (1, CLIP_TOKENS + 5, 32) and pooled.shape == (1, 64)
    _close(embeds, expected[0])
    _close(pooled, expected[2])


def test_embeddings_without_guidance_decoded_match_diffusers(saved, model, torch_blocks):
    """prompt embeddings given, guidance_scale 1 (no guidance), decoded through the VAE
    with SD3's scaling and shift factors."""
    pipe, _ = saved
    e = _embeds(batch=2)
    kwargs = dict(num_inference_steps=2, guidance_scale=1.0, height=SIDE, width=SIDE)
    expected = pipe(prompt_embeds=e["prompt_embeds"], pooled_prompt_embeds=e["pooled_prompt_embeds"],
                    output_type="pt", generator=torch.Generator().manual_seed(1), **kwargs).images
    actual = model.generate(e["prompt_embeds"], e["pooled_prompt_embeds"], output_type="pt", progress=False,
                            generator=torch.Generator().manual_seed(1), **kwargs)
    assert actual.shape == (2, 3, SIDE, SIDE)
    _close(actual, expected)


def test_image_to_image_with_dynamic_shifting_matches_diffusers(saved, model, torch_blocks, monkeypatch):
    """StableDiffusion3Img2ImgPipeline's start (3 steps at strength 0.5 start at step 1,
    where SD1.5's rule gives 2), scale_noise, and the resolution-dependent mu."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Img2ImgPipeline

    pipe, _ = saved
    dynamic = dict(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256, base_shift=0.5,
                   max_shift=1.15)
    img2img = StableDiffusion3Img2ImgPipeline(**{**pipe.components,
                                                 "scheduler": FlowMatchEulerDiscreteScheduler(**dynamic)})
    img2img.set_progress_bar_config(disable=True)
    monkeypatch.setattr(model, "scheduler", FlowMatchEulerDiscreteScheduler(**dynamic))
    image = torch.rand(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(2))
    kwargs = dict(num_inference_steps=3, strength=0.5, guidance_scale=3.0)
    expected = img2img(image=image, height=SIDE, width=SIDE, output_type="latent",
                       generator=torch.Generator().manual_seed(5), **_embeds(), **kwargs).images
    actual = model.generate(image=image, progress=False, generator=torch.Generator().manual_seed(5), **_embeds(),
                            **kwargs)
    _close(actual, expected)
    assert len(model.scheduler.timesteps) == 3 and model.scheduler.begin_index == 1


def test_triton_kernels_end_to_end(tmp_path):
    """Every mmfast kernel on Triton (interpreted on a CPU): blocks, attention (32-wide
    heads), adaLN, GELU and the fused step, for one guided step."""
    from mmfast.profile.measure import record_backends

    pipe = _tiny_pipeline(with_t5=False, heads=1, head_dim=32)
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    ours = StableDiffusion3Model.from_pretrained(tmp_path)
    e = _embeds(tokens=4)
    kwargs = dict(num_inference_steps=1, guidance_scale=4.0, height=8, width=8)
    expected = pipe(output_type="latent", generator=torch.Generator().manual_seed(7), **e, **kwargs).images
    ran = set()
    with record_backends(ran):
        actual = ours.generate(generator=torch.Generator().manual_seed(7), progress=False, **e, **kwargs)
    _close(actual, expected)
    assert {op for op, _ in ran} >= {"attention", "adaln", "scheduler_step"}, ran
    assert all(backend.startswith("triton") for _, backend in ran), ran  # triton_short: short segments


def test_from_pretrained_routes_by_pipeline_class(saved):
    for load in (mmfast.models.from_pretrained, LatentDiffusionModel.from_pretrained):
        loaded = load(saved[1])
        assert type(loaded) is StableDiffusion3Model
        assert (loaded.text_encoder_3 is None) == (saved[0].text_encoder_3 is None)
    kinds = {type(b).__module__ for b in loaded.transformer.transformer_blocks}
    assert kinds == {"mmfast.nn.dit"} and type(loaded.transformer.norm_out).__module__ == "mmfast.nn.adaptive_norm"
    expected = saved[0].transformer.state_dict()
    assert loaded.transformer.state_dict().keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded.transformer.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


# ---- bad input ---------------------------------------------------------------------------


def test_bad_generate_arguments(model, torch_blocks):
    e = _embeds()
    one_step = dict(num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="height: 17 is not a positive multiple of the VAE's downsampling factor 2"):
        model.generate(height=17, width=SIDE, **e, **one_step)
    with pytest.raises(ValueError, match=r"image: width 9 is not a multiple"):
        model.generate(image=torch.rand(1, 3, SIDE, 9), **e, **one_step)
    with pytest.raises(ValueError, match="pooled_prompt_embeds: prompt_embeds and pooled_prompt_embeds come together"):
        model.generate(e["prompt_embeds"], guidance_scale=1.0, **one_step)
    with pytest.raises(ValueError, match="prompt_embeds: last dimension 7 is not the transformer's "
                                         "joint_attention_dim 32"):
        model.generate(torch.zeros(1, 4, 7), e["pooled_prompt_embeds"], guidance_scale=1.0, **one_step)
    with pytest.raises(ValueError, match="pooled_prompt_embeds: batch 1 differs from prompt_embeds' 2"):
        model.generate(torch.zeros(2, 4, 32), e["pooled_prompt_embeds"], guidance_scale=1.0, **one_step)
    with pytest.raises(ValueError, match="negative_pooled_prompt_embeds: batch 3 differs from "
                                         "negative_prompt_embeds' 2"):
        model.generate(**{**e, "negative_prompt_embeds": torch.zeros(2, 12, 32),
                          "negative_pooled_prompt_embeds": torch.zeros(3, 64)}, **one_step)
    with pytest.raises(ValueError, match=r"negative_prompt_embeds: shape \(1, 10, 32\) differs from the prompt's "
                                         r"\(1, 12, 32\)"):
        model.generate(**{**e, "negative_prompt_embeds": torch.zeros(1, 10, 32)}, **one_step)
    with pytest.raises(ValueError, match="negative_prompt_embeds: guidance_scale > 1 needs the unconditional side"):
        model.generate(e["prompt_embeds"], e["pooled_prompt_embeds"], guidance_scale=2.0, **one_step)
    with pytest.raises(NotImplementedError, match="skip_guidance_layers"):
        model.generate(skip_guidance_layers=[0], **e, **one_step)
    with pytest.raises(ValueError, match="strength: expected a value in"):
        model.generate(image=torch.rand(1, 3, SIDE, SIDE), strength=1.5, **e, **one_step)


def test_token_ids_must_fit_the_encoders(model):
    ids = torch.tensor([[0, 5, 17, 2, 1, 1, 1, 1]])
    if model.text_encoder_3 is None:
        with pytest.raises(ValueError, match="input_ids: T5 token ids were given but the model has no text_encoder_3"):
            model.encode_text((ids, ids, ids))
        embeds, pooled = model.encode_text(ids, max_sequence_length=3)
        assert embeds.shape == (1, CLIP_TOKENS + 3, 32) and bool((embeds[:, CLIP_TOKENS:] == 0).all())
    else:
        with pytest.raises(ValueError, match="input_ids: the model has a T5 text encoder"):
            model.encode_text(ids)
    with pytest.raises(ValueError, match=r"input_ids\[1\]: batch 2 differs"):
        model.encode_text((ids, ids.repeat(2, 1)))
    with pytest.raises(ValueError, match=r"input_ids\[0\]: expected an integer tensor"):
        model.encode_text(ids.float())
    e = _embeds()
    with pytest.raises(ValueError, match=r"negative_input_ids\[1\]: expected an integer tensor"):
        model.generate(e["prompt_embeds"], e["pooled_prompt_embeds"], negative_input_ids=(ids, "ids"),
                       num_inference_steps=1, progress=False)


def _copy(saved, tmp_path):
    target = tmp_path / "pipe"
    shutil.copytree(saved[1], target)
    return target


def test_missing_component(saved, tmp_path):
    path = _copy(saved, tmp_path)
    shutil.rmtree(path / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="text_encoder_2: .* has no text_encoder_2/ folder"):
        StableDiffusion3Model.from_pretrained(path)
    if saved[0].text_encoder_3 is not None:  # listed in model_index.json, so it must be there
        shutil.copytree(saved[1] / "text_encoder_2", path / "text_encoder_2")
        shutil.rmtree(path / "text_encoder_3")
        with pytest.raises(FileNotFoundError, match="text_encoder_3: .* has no text_encoder_3/ folder"):
            StableDiffusion3Model.from_pretrained(path)


def test_mismatched_tensors_are_named(saved, tmp_path):
    if saved[0].text_encoder_3 is None:
        pytest.skip("one directory is enough")
    path = _copy(saved, tmp_path)
    break_weights(path / "transformer" / "diffusion_pytorch_model.safetensors", "context_embedder.bias",
                  "proj_out.weight")
    with pytest.raises(ValueError, match=r"transformer: .*missing keys: context_embedder\.bias.*unexpected keys: "
                                         r"extra\.weight.*shape mismatches: proj_out\.weight: checkpoint \(2, "):
        StableDiffusion3Model.from_pretrained(path)


def test_unknown_classes(saved, tmp_path):
    if saved[0].text_encoder_3 is None:
        pytest.skip("one directory is enough")
    path = _copy(saved, tmp_path)
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    index_file.write_text(json.dumps({**index, "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    with pytest.raises(ValueError, match="transformer: unsupported architecture 'FluxTransformer2DModel'"):
        StableDiffusion3Model.from_pretrained(path)
    index_file.write_text(json.dumps({**index, "scheduler": ["diffusers", "DDIMScheduler"]}))
    with pytest.raises(ValueError, match="scheduler: unsupported architecture 'DDIMScheduler'"):
        StableDiffusion3Model.from_pretrained(path)
    index_file.write_text(json.dumps({**index, "_class_name": "FluxKontextPipeline"}))  # FluxPipeline is known
    with pytest.raises(ValueError, match="model_index.json: unknown architecture \\(FluxKontextPipeline\\)"):
        mmfast.models.from_pretrained(path)
    with pytest.raises(ValueError, match="model_index.json: unsupported pipeline class 'FluxKontextPipeline'"):
        LatentDiffusionModel.from_pretrained(path)
    index_file.write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="'StableDiffusionPipeline' is not a Stable Diffusion 3 pipeline"):
        StableDiffusion3Model.from_pretrained(path)


# ---- the denoising loop for CUDA graphs ----------------------------------------------------------


def _graph_vs_host(model, device, steps=3, **kwargs):
    e = {k: v.to(device) for k, v in _embeds().items()}
    common = dict(num_inference_steps=steps, guidance_scale=4.0, progress=False, **e, **kwargs)
    for seed in (7, 8):  # the second call reuses the graph: table, counter and inputs start over
        expected = model.generate(generator=torch.Generator().manual_seed(seed), **common)
        actual = model.generate(generator=torch.Generator().manual_seed(seed), cuda_graph=True, **common)
        _close(actual, expected)


def test_device_schedule_loop_matches_host_loop(saved, model, torch_blocks, monkeypatch):
    """The CUDA graph's body (timestep and coefficients from the device table, in-place
    update of static tensors), run eagerly on the CPU, against the host loop."""
    if saved[0].text_encoder_3 is None:
        pytest.skip("the text encoders play no part in the loop")
    monkeypatch.setattr(model, "_capture_graphs", False)
    _graph_vs_host(model, "cpu", height=SIDE, width=SIDE)
    _graph_vs_host(model, "cpu", image=torch.rand(1, 3, SIDE, SIDE), strength=0.7)  # starts part-way: new key


def test_cuda_graph_needs_cuda(model):
    if model.device.type == "cuda":
        pytest.skip("the model is on CUDA")
    with pytest.raises(ValueError, match="cuda_graph: needs the model on a CUDA device"):
        model.generate(**_embeds(), guidance_scale=1.0, cuda_graph=True, progress=False)


@pytest.mark.gpu
def test_cuda_graph_matches_host_loop(saved):
    model = StableDiffusion3Model.from_pretrained(saved[1], device="cuda")
    _graph_vs_host(model, "cuda", steps=4, height=SIDE, width=SIDE)
    assert model._graph_cache is not None and model._graph_cache[1] is not None


def test_presets_build():
    tiny = StableDiffusion3Model.from_preset("sd3-tiny", text_encoder_3=False)
    assert tiny.patch_size == 2 and tiny.text_encoder_3 is None and tiny.vae.config.shift_factor == 0.0609
    with mmfast.set_backend("torch"):
        latents = tiny.generate(**_embeds(), num_inference_steps=1, progress=False)
    assert latents.shape == (1, 4, 8, 8) and bool(latents.isfinite().all())
    with pytest.raises(ValueError, match="name: unknown Stable Diffusion 3 preset 'sd3-large'"):
        StableDiffusion3Model.from_preset("sd3-large")


def test_save_pretrained_loads_in_diffusers_and_back(with_tokenizers, tmp_path, torch_blocks):
    """mmfast -> save_pretrained (sharded, with the CLIP tokenizers; with and without T5) ->
    diffusers' StableDiffusion3Pipeline gives equal final latents; -> mmfast gives the same
    model. tokenizer_3 stays out: the tiny one is a CLIP tokenizer, which mmfast refuses there."""
    from diffusers import StableDiffusion3Pipeline

    _, loaded = with_tokenizers
    parts = ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
             "tokenizer_2")
    ours = StableDiffusion3Model(**{name: getattr(loaded, name) for name in parts})
    path = ours.save_pretrained(tmp_path / "pipe", max_shard_size="50KB")
    assert (path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    # diffusers loads a component recorded as absent only when told it is None (its own saves too).
    absent = {"tokenizer_3": None, **({"text_encoder_3": None} if ours.text_encoder_3 is None else {})}
    theirs = StableDiffusion3Pipeline.from_pretrained(path, **absent, local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    assert (theirs.text_encoder_3 is None) == (ours.text_encoder_3 is None)
    kwargs = dict(num_inference_steps=2, guidance_scale=3.0, height=SIDE, width=SIDE)
    expected = theirs(output_type="latent", generator=torch.Generator().manual_seed(6), **_embeds(), **kwargs).images
    actual = ours.generate(generator=torch.Generator().manual_seed(6), progress=False, **_embeds(), **kwargs)
    _close(actual, expected)
    back = mmfast.models.from_pretrained(path)
    assert isinstance(back, StableDiffusion3Model) and back.tokenizer_2.pad_token == "!" and back.tokenizer_3 is None
    assert dict(back.scheduler.config) == dict(ours.scheduler.config)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(ours, name) is None:
            assert getattr(back, name) is None
            continue
        expected_state, loaded_state = getattr(ours, name).state_dict(), getattr(back, name).state_dict()
        assert loaded_state.keys() == expected_state.keys(), name
        for key, tensor in expected_state.items():
            assert torch.equal(loaded_state[key], tensor), f"{name}.{key}"
