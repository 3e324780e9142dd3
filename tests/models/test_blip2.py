"""mmfast's BLIP-2 loads tiny random Hugging Face Blip2ForConditionalGeneration checkpoints
(OPT and Qwen2 language models) and matches them: logits, greedy generation on a padded
batch, gradients; sampling is reproducible; bad inputs and checkpoints fail by name."""

import shutil

import pytest
import torch

import mmfast
from mmfast.models.blip2 import Blip2Config, Blip2ForConditionalGeneration
from mmfast.models.checkpoint import CheckpointError

transformers = pytest.importorskip("transformers")

IMAGE, PAD, QUERIES, VOCAB = 120, 1, 3, 128


def _config(text_config):
    vision = transformers.Blip2VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=8, patch_size=4)
    qformer = transformers.Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=48)
    return transformers.Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text_config,
                                    num_query_tokens=QUERIES, image_token_index=IMAGE)


def _checkpoint(tmp_path_factory, name, text_config):
    torch.manual_seed(0)
    hf = transformers.Blip2ForConditionalGeneration(_config(text_config)).eval()
    with torch.no_grad():  # HF zero-inits query_tokens and biases: make every tensor count
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp(name)
    hf.save_pretrained(directory)
    return hf, directory


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    text = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                  num_attention_heads=2, max_position_embeddings=40, pad_token_id=PAD,
                                  bos_token_id=2, eos_token_id=2)
    hf, directory = _checkpoint(tmp_path_factory, "blip2_opt", text)
    return hf, directory, Blip2ForConditionalGeneration.from_pretrained(directory)


def _batch(images=2, text=(5, 3)):
    """Two prompts [image placeholders, text], the second left-padded to the first's length."""
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.full((2, QUERIES), IMAGE), torch.randint(3, 100, (2, text[0]), generator=g)], dim=1)
    mask = torch.ones_like(ids)
    pad = text[0] - text[1]
    ids[1] = torch.cat([torch.full((pad,), PAD), ids[1, :-pad]])
    mask[1, :pad] = 0
    return ids, mask, torch.randn(images, 3, 8, 8, generator=g)


def test_logits_match_hugging_face_on_a_padded_batch(opt):
    hf, directory, ours = opt
    assert isinstance(mmfast.models.from_pretrained(directory), Blip2ForConditionalGeneration)
    ids, mask, pixels = _batch()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = ours(ids, mask, pixel_values=pixels)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    assert not got[~valid].any()
    larger = torch.randn(1, 3, 12, 16)  # another size: the position table is interpolated as HF does
    with torch.no_grad():
        torch.testing.assert_close(ours.vision_model(larger, interpolate_pos_encoding=True).last_hidden_state,
                                   hf.vision_model(larger, interpolate_pos_encoding=True).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


def test_half_precision_keeps_the_qformer_in_float32(opt):
    # As Hugging Face does; the error against float32 is within 2x of Hugging Face's own.
    hf, directory, _ = opt
    ours = Blip2ForConditionalGeneration.from_pretrained(directory, dtype=torch.float16)
    hf16 = transformers.Blip2ForConditionalGeneration.from_pretrained(directory, dtype=torch.float16).eval()
    assert ours.qformer.layernorm.weight.dtype == ours.query_tokens.dtype == torch.float32
    assert ours.language_projection.weight.dtype == torch.float16
    ids, mask, pixels = _batch()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[mask.bool()]
        hf_error = (hf16(input_ids=ids, attention_mask=mask, pixel_values=pixels.half()).logits[mask.bool()].float()
                    - want).abs().max()
        our_error = (ours(ids, mask, pixel_values=pixels)[mask.bool()].float() - want).abs().max()
    assert our_error <= 2 * hf_error, (our_error, hf_error)


def test_greedy_generation_matches_hugging_face(opt):
    hf, _, ours = opt
    ids, mask, pixels = _batch()
    got = ours.generate(ids, mask, pixel_values=pixels, max_new_tokens=5, eos_token_id=[])
    want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5,
                       min_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)
    # Captioning: no prompt, the placeholders and BOS are built as transformers builds them.
    got = ours.generate(pixel_values=pixels, max_new_tokens=3, eos_token_id=[])
    want = hf.generate(pixel_values=pixels, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert torch.equal(got, want)


def test_qwen2_language_model(tmp_path_factory):
    text = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    eos_token_id=2, pad_token_id=PAD)
    hf, directory = _checkpoint(tmp_path_factory, "blip2_qwen2", text)
    ours = Blip2ForConditionalGeneration.from_pretrained(directory)
    ids, mask, pixels = _batch()
    with torch.no_grad():  # unpadded: HF's Qwen2 forward numbers padding too
        want = hf(input_ids=ids[:1], pixel_values=pixels[:1]).logits
        torch.testing.assert_close(ours(ids[:1], pixel_values=pixels[:1]), want, rtol=1e-5, atol=1e-5)
    got = ours.generate(ids, mask, pixel_values=pixels, max_new_tokens=4, eos_token_id=[])
    want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4,
                       min_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(opt):
    _, _, ours = opt
    ids, mask, pixels = _batch()

    def run(seed, **kw):
        return ours.generate(ids, mask, pixel_values=pixels, max_new_tokens=4, eos_token_id=[], do_sample=True,
                             generator=torch.Generator().manual_seed(seed), **kw)

    first = run(0, temperature=3.0, top_p=0.95)
    assert torch.equal(first, run(0, temperature=3.0, top_p=0.95))
    assert not torch.equal(first[:, ids.shape[1]:], run(1, temperature=3.0, top_p=0.95)[:, ids.shape[1]:])
    greedy = ours.generate(ids, mask, pixel_values=pixels, max_new_tokens=4, eos_token_id=[])
    assert torch.equal(run(2, temperature=3.0, top_k=1), greedy)
    with pytest.raises(ValueError, match="top_p"):
        run(0, top_p=1.5)


def test_llava_samples_too():
    from mmfast.models.llava import LlavaForConditionalGeneration

    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, image_size=8, patch_size=4),
        text_config=transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                             num_attention_heads=2, eos_token_id=2),
        image_token_index=60).to_dict()
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(config).eval()
    ids = torch.tensor([[5, 60, 60, 60, 60, 7, 8]])
    pixels = torch.randn(1, 3, 8, 8)

    def run(seed, **kw):
        return llava.generate(ids, pixel_values=pixels, max_new_tokens=5, eos_token_id=[],
                              generator=torch.Generator().manual_seed(seed), **kw)

    sampled = run(0, do_sample=True, temperature=5.0)
    assert sampled.shape == (1, 12) and torch.equal(sampled, run(0, do_sample=True, temperature=5.0))
    assert torch.equal(run(1, do_sample=True, top_k=1), run(1))


def test_backward_reaches_every_parameter_and_matches_hugging_face(opt):
    hf, directory, _ = opt
    ours = Blip2ForConditionalGeneration.from_pretrained(directory)
    ids, mask, pixels = _batch()
    weight = torch.randn(*ids.shape, VOCAB, generator=torch.Generator().manual_seed(3)) * mask[..., None]
    (ours(ids, mask, pixel_values=pixels) * weight).sum().backward()
    for name, p in ours.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    (hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits * weight).sum().backward()
    hf_params = dict(hf.named_parameters())
    for name in ("query_tokens", "vision_model.embeddings.position_embedding",
                 "vision_model.encoder.layers.0.self_attn.qkv.bias",
                 "qformer.encoder.layer.0.crossattention.attention.key.weight", "language_projection.weight",
                 "language_model.model.decoder.layers.0.fc1.weight",
                 "language_model.model.decoder.embed_positions.weight"):
        got = dict(ours.named_parameters())[name].grad
        torch.testing.assert_close(got, hf_params[name].grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    hf.zero_grad()


def test_labels_give_hugging_faces_loss_through_the_fused_path(opt):
    hf, directory, _ = opt
    ours = Blip2ForConditionalGeneration.from_pretrained(directory)
    ids, mask, pixels = _batch()
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE), -100)
    got = ours(ids, mask, pixel_values=pixels, labels=labels)
    assert got.logits is None
    want = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-6)
    got.loss.backward()
    want.backward()
    name = "language_model.model.decoder.layers.1.fc2.weight"
    torch.testing.assert_close(dict(ours.named_parameters())[name].grad, dict(hf.named_parameters())[name].grad,
                               rtol=1e-4, atol=1e-6)
    hf.zero_grad()


def test_bad_inputs_are_named(opt):
    _, _, ours = opt
    ids, mask, pixels = _batch()
    with pytest.raises(ValueError, match=f"{2 * QUERIES} image tokens.*1 images x {QUERIES} query tokens"):
        ours(ids, mask, pixel_values=pixels[:1])
    with pytest.raises(ValueError, match="no pixel_values"):
        ours(ids, mask)
    with pytest.raises(ValueError, match="pixel_values: image size 12x12 does not match"):
        ours(ids, mask, pixel_values=torch.randn(2, 3, 12, 12))
    with pytest.raises(ValueError, match="max_position_embeddings 40"):
        ours.generate(ids, mask, pixel_values=pixels, max_new_tokens=40)


def test_encoder_decoder_text_model_is_refused():
    config = _config(transformers.T5Config(vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=2)).to_dict()
    with pytest.raises(ValueError, match="model_type 't5' is an encoder-decoder"):
        Blip2ForConditionalGeneration(config)


def test_missing_and_mismatched_tensors_are_named(opt, tmp_path):
    from safetensors.torch import load_file, save_file

    _, directory, _ = opt
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    tensors = load_file(directory / "model.safetensors")
    del tensors["qformer.layernorm.bias"]
    tensors["language_projection.weight"] = tensors["language_projection.weight"][:, :-1].contiguous()
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): qformer.layernorm.bias") as error:
        Blip2ForConditionalGeneration.from_pretrained(tmp_path)
    assert error.value.mismatched == [("language_projection.weight", [32, 31], torch.Size([32, 32]))]


def test_tiny_preset_saves_what_transformers_loads(tmp_path):
    torch.manual_seed(0)
    ours = Blip2ForConditionalGeneration.from_preset("tiny").eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    q = ours.config.num_query_tokens
    ids = torch.cat([torch.full((1, q), ours.config.image_token_index), torch.tensor([[2, 17, 33]])], dim=1)
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pixel_values=pixels), hf(input_ids=ids, pixel_values=pixels).logits,
                                   rtol=1e-5, atol=1e-5)


def test_real_size_preset_is_the_released_model():
    # Salesforce/blip2-opt-2.7b's config.json lists these; the rest are transformers' defaults.
    published = transformers.Blip2Config(
        num_query_tokens=32, image_token_index=50265,
        text_config=dict(model_type="opt", vocab_size=50304, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                         num_attention_heads=32, word_embed_proj_dim=2560, eos_token_id=50118))
    with torch.device("meta"):
        ours = Blip2ForConditionalGeneration.from_preset("opt-2.7b")
        hf = transformers.Blip2ForConditionalGeneration(published)
    shapes = lambda m: {k: tuple(t.shape) for k, t in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(hf)
    assert ours.config.text_config["eos_token_id"] == 50118
    with pytest.raises(ValueError, match="unknown BLIP-2 preset 'huge'"):
        Blip2Config.preset("huge")
