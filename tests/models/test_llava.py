"""mmfast's LLaVA loads a tiny random Hugging Face LlavaForConditionalGeneration (CLIP
tower + Llama decoder) and matches it: logits for text + images, greedy generation, and
a clear error when the image tokens and the images disagree."""

import copy
import pytest
import torch

import mmfast
from mmfast.models.llava import LlavaForConditionalGeneration

transformers = pytest.importorskip("transformers")

IMAGE, PAD = 120, 0
IMAGE_TOKENS = 4  # (8 / 4)^2 patches; the CLS token is dropped ("default" strategy)


def _config(**overrides):
    towers = dict(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, image_size=8,
            patch_size=4, hidden_act="quick_gelu"),
        text_config=transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=PAD))
    return transformers.LlavaConfig(**{**towers, **overrides}, image_token_index=IMAGE)


def _checkpoint(tmp_path_factory, name, **overrides):
    config = _config(**overrides)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(config).eval()
    directory = tmp_path_factory.mktemp(name)
    hf.save_pretrained(directory)
    return hf, directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory, "llava")


def _prompt(images=2):
    """[text, image 0, text, image 1, text] for two sequences (batch 2, no padding)."""
    g = torch.Generator().manual_seed(1)
    text = lambda n: torch.randint(3, 100, (2, n), generator=g)  # noqa: E731
    image = torch.full((2, IMAGE_TOKENS), IMAGE)
    ids = torch.cat([text(3), image, text(2), image, text(4)], dim=1)
    pixels = torch.randn(2 * images, 3, 8, 8, generator=g)
    return ids, pixels


def test_logits_match_hugging_face(checkpoint):
    hf, directory = checkpoint
    ours = mmfast.models.from_pretrained(directory)
    assert isinstance(ours, LlavaForConditionalGeneration)
    ids, pixels = _prompt()
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pixel_values=pixels)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_siglip_qwen2_full_strategy_and_layer_list(tmp_path_factory):
    # The other tower and decoder: SigLIP (no CLS token: "full" keeps all 4 patches) and
    # Qwen2 (q/k/v biases); the features concatenate the embeddings and the last layer.
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=8, patch_size=4)
    text = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    hf, directory = _checkpoint(tmp_path_factory, "llava_siglip", vision_config=vision, text_config=text,
                                vision_feature_select_strategy="full", vision_feature_layer=[0, -1])
    ours = LlavaForConditionalGeneration.from_pretrained(directory)
    assert ours.model.language_model.layers[0].self_attn.q_proj.bias is not None
    ids = torch.cat([torch.tensor([[5, 6]]), torch.full((1, IMAGE_TOKENS), IMAGE), torch.tensor([[7]])], dim=1)
    pixels = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pixel_values=pixels), hf(input_ids=ids, pixel_values=pixels).logits,
                                   rtol=1e-4, atol=1e-4)


def test_greedy_generation_matches_hugging_face(checkpoint):
    # Left padding: the second prompt loses its first two tokens, so the cache holds
    # sequences of different lengths (its packed path); positions count from each
    # prompt's first real token, as transformers' generate does.
    hf, directory = checkpoint
    ours = LlavaForConditionalGeneration.from_pretrained(directory)
    ids, pixels = _prompt()
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = PAD, 0
    # Both sides stop at the config's end-of-sequence token and pad after it.
    got = ours.generate(ids, mask, pixel_values=pixels, max_new_tokens=5, pad_token_id=PAD)
    want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5, do_sample=False,
                       pad_token_id=PAD)
    assert torch.equal(got, want)


def test_image_token_count_mismatch_raises(checkpoint):
    _, directory = checkpoint
    ours = LlavaForConditionalGeneration.from_pretrained(directory)
    ids, pixels = _prompt()
    with pytest.raises(ValueError, match="8 image tokens.*3 images x 4 features"):
        ours(ids[:1], pixel_values=pixels[:3])
    with pytest.raises(ValueError, match="no pixel_values"):
        ours(ids)


def test_backward_matches_hugging_face(checkpoint):
    # Gradients reach the decoder, the projector and the tower layers the features use.
    # The project's rule: against transformers run in float64, mmfast's fp32 error is at
    # most about twice transformers' own fp32 error.
    hf, directory = checkpoint
    ours = LlavaForConditionalGeneration.from_pretrained(directory)
    exact = copy.deepcopy(hf).double()
    ids, pixels = _prompt()
    weight = torch.randn(*ids.shape, 128, generator=torch.Generator().manual_seed(3))
    (ours(ids, pixel_values=pixels) * weight).sum().backward()
    (hf(input_ids=ids, pixel_values=pixels).logits * weight).sum().backward()
    (exact(input_ids=ids, pixel_values=pixels.double()).logits * weight.double()).sum().backward()
    hf_params, exact_params = dict(hf.named_parameters()), dict(exact.named_parameters())
    for name in ("model.language_model.layers.0.self_attn.q_proj.weight",
                 "model.multi_modal_projector.linear_1.weight",
                 "model.vision_tower.encoder.layers.0.mlp.fc1.weight",
                 "model.vision_tower.embeddings.patch_embedding.weight"):
        want = exact_params[name].grad
        ours_error = (dict(ours.named_parameters())[name].grad.double() - want).abs().max().item()
        eager_error = (hf_params[name].grad.double() - want).abs().max().item()
        floor = 4 * torch.finfo(torch.float32).eps * want.abs().max().item()
        assert ours_error <= 2 * eager_error + floor, (name, ours_error, eager_error, floor)
    hf.zero_grad()


SIGLIP_QWEN2 = dict(
    vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=2, image_size=8, patch_size=4),
    text_config=dict(model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    vision_feature_select_strategy="full", vision_feature_layer=[0, -1], image_token_index=IMAGE)


@pytest.mark.parametrize("source", ["tiny", "siglip_qwen2"])
def test_save_pretrained_loads_in_transformers_and_back(source, tmp_path):
    # CLIP + Llama (the tiny preset, sharded) and SigLIP + tied Qwen2 with a layer list:
    # what mmfast writes, transformers loads with equal logits and mmfast loads back exactly.
    torch.manual_seed(0)
    if source == "tiny":
        ours, side, tokens, shard = LlavaForConditionalGeneration.from_preset("tiny").eval(), 28, 4, "100KB"
    else:
        ours, side, tokens, shard = LlavaForConditionalGeneration(SIGLIP_QWEN2).eval(), 8, 4, "5GB"
    ours.save_pretrained(tmp_path, max_shard_size=shard)
    assert (tmp_path / "model.safetensors.index.json").is_file() == (source == "tiny")
    image = ours.config.image_token_index
    ids = torch.cat([torch.tensor([[5, 6]]), torch.full((1, tokens), image), torch.tensor([[7, 8]])], dim=1)
    pixels = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(2))
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, pixel_values=pixels).logits, ours(ids, pixel_values=pixels),
                                   rtol=1e-4, atol=1e-4)
    back = mmfast.models.from_pretrained(tmp_path)
    assert isinstance(back, LlavaForConditionalGeneration) and back.config.to_dict() == ours.config.to_dict()
    assert back.state_dict().keys() == ours.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    if source == "siglip_qwen2":
        assert back.lm_head.weight is back.model.language_model.embed_tokens.weight


def test_real_size_preset_is_the_released_model():
    # llava-hf/llava-1.5-7b-hf: 7,063,427,072 parameters; transformers builds the same
    # tensors from the config mmfast writes (both on the meta device: no memory).
    from mmfast.models.llava import LlavaConfig

    with torch.device("meta"):
        ours = LlavaForConditionalGeneration.from_preset("llava-1.5-7b")
        hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**ours.config.to_dict()))
    assert sum(p.numel() for p in ours.parameters()) == 7_063_427_072
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    assert (hf.config.vision_feature_layer, hf.config.image_token_index) == (-2, 32000)
    with pytest.raises(ValueError, match="unknown LLaVA preset 'huge'"):
        LlavaConfig.preset("huge")
