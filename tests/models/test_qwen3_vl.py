"""mmfast's Qwen3-VL loads a tiny random Hugging Face checkpoint and matches it: logits and
greedy generate ids for a left-padded batch holding images of three sizes and a two-frame
video (so both DeepStack paths, images and videos, reach the decoder), the vision tower
alone, the interleaved M-RoPE, checkpoints both ways, presets, and bad input."""

import dataclasses

import pytest
import torch

import mmfast
import mmfast.models
from mmfast.models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from mmfast.models.qwen3_vl_presets import qwen3_vl_preset
from tests.integrations.hf_tiny import VIDEO, qwen3_vl_config, qwen3_vl_inputs

transformers = pytest.importorskip("transformers")


@pytest.fixture
def reference_kernels():
    # Generation runs the model once per token and backward doubles a forward: under the
    # Triton interpreter either would take most of this file's budget. The kernels run
    # inside the model in test_logits_match_hugging_face.
    with mmfast.set_backend("torch"):
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.Qwen3VLForConditionalGeneration(qwen3_vl_config()).eval()
    directory = tmp_path_factory.mktemp("qwen3_vl")
    hf.save_pretrained(directory)
    return hf, directory


def _ours(inputs):
    return {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}  # mmfast finds the runs from the ids


def test_logits_match_hugging_face(checkpoint):
    """Default backends: the Triton kernels (under the interpreter on a CPU) in float32."""
    hf, directory = checkpoint
    ours = mmfast.models.from_pretrained(directory)
    assert isinstance(ours, Qwen3VLForConditionalGeneration)
    inputs = qwen3_vl_inputs()
    with torch.no_grad():
        want = hf(**inputs).logits
        got = ours(**_ours(inputs))
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(got[~valid]) == 0


def test_deepstack_reaches_the_decoder(checkpoint, reference_kernels):
    """Without its DeepStack features the model's logits move: the adds are not a no-op."""
    _, directory = checkpoint
    ours = Qwen3VLForConditionalGeneration.from_pretrained(directory)
    inputs = _ours(qwen3_vl_inputs())
    with torch.no_grad():
        full = ours(**inputs)
        for merger in ours.model.visual.deepstack_merger_list:
            merger.linear_fc2.weight.zero_()
            merger.linear_fc2.bias.zero_()
        without = ours(**inputs)
    valid = inputs["attention_mask"].bool()
    assert (full[valid] - without[valid]).abs().max() > 1e-3


def test_vision_tower_matches_hugging_face(checkpoint, reference_kernels):
    hf, directory = checkpoint
    ours = Qwen3VLForConditionalGeneration.from_pretrained(directory).model.visual
    inputs = qwen3_vl_inputs()
    for pixels, grid in ((inputs["pixel_values"], inputs["image_grid_thw"]),
                         (inputs["pixel_values_videos"], inputs["video_grid_thw"])):
        with torch.no_grad():
            want = hf.model.visual(pixels, grid_thw=grid)
            got = ours(pixels, grid, return_hidden_states=True)
        torch.testing.assert_close(got.merged, want.pooler_output, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=1e-5, atol=1e-5)
        assert len(got.deepstack) == len(want.deepstack_features) == 2
        for g, w in zip(got.deepstack, want.deepstack_features):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_greedy_generation_matches_hugging_face(checkpoint, reference_kernels):
    hf, directory = checkpoint
    ours = Qwen3VLForConditionalGeneration.from_pretrained(directory)
    inputs = qwen3_vl_inputs()
    with torch.no_grad():
        want = hf.generate(**inputs, do_sample=False, max_new_tokens=6)
    got = ours.generate(**_ours(inputs), max_new_tokens=6)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The second prompt alone, unpadded (one image of 6x4 patches), continues the same way.
    mask = inputs["attention_mask"]
    n, images = int(mask[1].sum()), 16 + 32  # patches of the first prompt's two images
    single = ours.generate(inputs["input_ids"][1:, -n:], pixel_values=inputs["pixel_values"][images:],
                           image_grid_thw=inputs["image_grid_thw"][2:], max_new_tokens=6)
    torch.testing.assert_close(single[0, -6:], got[1, -6:], rtol=0, atol=0)


def test_interleaved_mrope_tables_match_hugging_face(checkpoint):
    from mmfast.models.qwen2_decoder import mrope_cos_sin, rope_inv_freq

    hf, _ = checkpoint
    rotary = hf.model.language_model.rotary_emb
    positions = torch.randint(0, 50, (3, 1, 9))
    want_cos, want_sin = rotary(torch.empty(0), positions)
    inv_freq = rope_inv_freq(16, 10000.0)
    cos, sin = mrope_cos_sin(positions[:, 0], inv_freq, (2, 3, 3), interleaved=True)
    torch.testing.assert_close(torch.cat([cos, cos], -1), want_cos[0], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([sin, sin], -1), want_sin[0], rtol=0, atol=0)


def test_training_step_backward(checkpoint, reference_kernels):
    """Every parameter gets a gradient: the position grid and the DeepStack mergers too."""
    _, directory = checkpoint
    model = Qwen3VLForConditionalGeneration.from_pretrained(directory).train()
    inputs = qwen3_vl_inputs()
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    logits = model(**_ours(inputs))
    valid = mask[:, 1:]
    torch.nn.functional.cross_entropy(logits[:, :-1][valid], ids[:, 1:][valid]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_save_pretrained_round_trip_and_presets(tmp_path):
    torch.manual_seed(0)
    tiny = Qwen3VLForConditionalGeneration(dataclasses.replace(qwen3_vl_preset("tiny"), tie_word_embeddings=True))
    tiny.save_pretrained(tmp_path, max_shard_size="200KB")
    loaded = mmfast.models.from_pretrained(tmp_path)
    assert loaded.config.to_dict() == tiny.config.to_dict()
    assert loaded.lm_head.weight is loaded.model.language_model.embed_tokens.weight
    for (name, a), b in zip(tiny.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    # The directory is a transformers checkpoint too, and transformers computes the same.
    hf = transformers.Qwen3VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    config = tiny.config
    ids = torch.tensor([[5, config.vision_start_token_id, *[config.image_token_id] * 4,
                         config.vision_end_token_id, 6, 7]])
    pixels, grid = torch.randn(16, 3 * 2 * 16 * 16), torch.tensor([[1, 4, 4]])
    with torch.no_grad(), mmfast.set_backend("torch"):
        want = hf(input_ids=ids, pixel_values=pixels, image_grid_thw=grid,
                  mm_token_type_ids=(ids == config.image_token_id).int()).logits
        got = loaded(ids, pixel_values=pixels, image_grid_thw=grid)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_qwen3_vl_8b_preset_has_the_checkpoint_shapes():
    """Every parameter of the preset has the name and shape transformers gives the released
    config (both built on the meta device); 8.77 billion parameters."""
    with torch.device("meta"):
        ours = Qwen3VLForConditionalGeneration.from_preset("qwen3-vl-8b")
        config = transformers.Qwen3VLConfig(**ours.config.to_dict())
        hf = transformers.Qwen3VLForConditionalGeneration(config)
    shapes = {name: p.shape for name, p in ours.named_parameters()}
    assert shapes == {name: p.shape for name, p in hf.named_parameters()}
    assert round(sum(p.numel() for p in ours.parameters()) / 1e9, 2) == 8.77
    assert ours.model.visual.head_dim == 72 and ours.model.visual.num_grid_per_side == 48
    with pytest.raises(ValueError, match="unknown Qwen3-VL preset"):
        qwen3_vl_preset("qwen3-vl-235b")


def test_released_config_layout():
    """transformers 4.57's config.json of the released checkpoints: rope settings in
    rope_scaling + rope_theta, the vision model_type 'qwen3_vl'."""
    released = {"architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655,
                "text_config": {"head_dim": 128, "hidden_size": 4096, "num_hidden_layers": 36, "eos_token_id": 151645,
                                "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                                 "rope_type": "default"},
                                "rope_theta": 5000000, "vocab_size": 151936},
                "vision_config": {"deepstack_visual_indexes": [8, 16, 24], "depth": 27, "model_type": "qwen3_vl",
                                  "num_position_embeddings": 2304, "out_hidden_size": 4096}}
    config = Qwen3VLConfig.from_dict(released)
    assert (config.rope_theta, config.mrope_section, config.eos_token_id) == (5000000.0, (24, 20, 20), 151645)
    assert config.vision["deepstack_visual_indexes"] == (8, 16, 24)
    assert transformers.Qwen3VLConfig(**config.to_dict()).text_config.rope_parameters["rope_theta"] == 5000000.0
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        Qwen3VLConfig.from_dict({"text_config": {"rope_scaling": {"rope_type": "yarn"}}})


def test_bad_input(checkpoint):
    _, directory = checkpoint
    ours = Qwen3VLForConditionalGeneration.from_pretrained(directory)
    inputs = _ours(qwen3_vl_inputs())
    with pytest.raises(ValueError, match=r"grid_thw: describes 80 patches .*pixel_values holds \(72, 96\)"):
        ours.model.visual(inputs["pixel_values"], torch.tensor([[1, 4, 4], [1, 4, 8], [1, 8, 4]]))
    with pytest.raises(ValueError, match="second_per_grid_ts"):
        ours(**inputs, second_per_grid_ts=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="video_grid_thw: expected"):
        ours(**{**inputs, "video_grid_thw": torch.tensor([2, 4, 4])})
    # A video's frames must be separate placeholder runs (a timestamp between them).
    ids = inputs["input_ids"].clone()
    run = (ids[0] == VIDEO).nonzero().flatten()
    ids[0, run[3] + 1:run[4]] = VIDEO  # the end, timestamp and start tokens between the frames
    with pytest.raises(ValueError, match="video 0 .* placeholder tokens, its grid"):
        ours(**{**inputs, "input_ids": ids})
