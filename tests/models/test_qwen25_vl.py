"""mmfast's Qwen2.5-VL loads a tiny random Hugging Face checkpoint and matches it: logits
for a padded batch of text + images of two sizes, and greedy generation."""

import inspect

import pytest
import torch

import mmfast
from mmfast.models.qwen25_vl import Qwen25VLForConditionalGeneration

transformers = pytest.importorskip("transformers")

IMAGE, VIDEO, START, END, PAD = 120, 121, 122, 123, 0
PATCH_DIM = 3 * 2 * 4 * 4  # channels * temporal patch * patch^2
# Two images: 4x4 patches (4 tokens after the 2x2 merge) and 4x8 patches (8 tokens); the
# second spans two 16-pixel windows, so the tower's window attention is exercised.
GRIDS = torch.tensor([[1, 4, 4], [1, 4, 8]])


def _config():
    return transformers.Qwen2_5_VLConfig(
        text_config={"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                     "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": PAD},
        vision_config={"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 48, "out_hidden_size": 64,
                       "patch_size": 4, "window_size": 16, "fullatt_block_indexes": [1]},
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)


@pytest.fixture
def reference_kernels():
    # Generation runs the model once per token, and backward doubles a forward: under the
    # Triton interpreter either would take most of this file's time budget. The kernels
    # (forward and backward) are tested on their own, and inside the model by
    # test_logits_match_hugging_face.
    with mmfast.set_backend("torch"):
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = _config()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    directory = tmp_path_factory.mktemp("qwen25_vl")
    hf.save_pretrained(directory)
    return hf, directory


def _prompts():
    """Left-padded batch: [text, image 0, text] and [text, image 1, text, more text]."""
    g = torch.Generator().manual_seed(1)
    text = lambda n: torch.randint(3, 100, (n,), generator=g)  # noqa: E731
    first = torch.cat([text(3), torch.tensor([START] + [IMAGE] * 4 + [END]), text(4)])
    second = torch.cat([text(2), torch.tensor([START] + [IMAGE] * 8 + [END]), text(7)])
    length = max(len(first), len(second))
    ids = torch.full((2, length), PAD)
    mask = torch.zeros(2, length, dtype=torch.long)
    for row, seq in enumerate((first, second)):
        ids[row, length - len(seq):] = seq
        mask[row, length - len(seq):] = 1
    pixels = torch.randn(int(GRIDS.prod(-1).sum()), PATCH_DIM, generator=g)
    return ids, mask, pixels


def _hf_inputs(ids, mask, pixels, grids=GRIDS):
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_grid_thw": grids,
            "mm_token_type_ids": (ids == IMAGE).int()}


def test_logits_match_hugging_face(checkpoint):
    hf, directory = checkpoint
    ours = mmfast.models.from_pretrained(directory)
    assert isinstance(ours, Qwen25VLForConditionalGeneration)
    ids, mask, pixels = _prompts()
    with torch.no_grad():
        want = hf(**_hf_inputs(ids, mask, pixels)).logits
        got = ours(ids, mask, pixel_values=pixels, image_grid_thw=GRIDS)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(got[~valid]) == 0


def _seconds(hf, fractional: list[float]) -> torch.Tensor:
    """second_per_grid_ts for a test: fractional, unless the installed transformers truncates
    them to whole seconds in get_rope_index (`int(...)`, as 5.17 does; later releases fixed
    it, and mmfast follows the fix): then whole seconds, on which both agree."""
    source = inspect.getsource(type(hf.model).get_rope_index)
    truncates = "int(next(second_per_grid_ts))" in source
    return torch.tensor([float(round(s + 0.5)) for s in fractional] if truncates else fractional)


def test_video_and_image_logits_match_hugging_face(checkpoint):
    hf, directory = checkpoint
    ours = Qwen25VLForConditionalGeneration.from_pretrained(directory)
    g = torch.Generator().manual_seed(2)
    video_grid, seconds = torch.tensor([[2, 4, 4]]), _seconds(hf, [1.5])  # 2 temporal patches of 4x4
    ids = torch.tensor([[5, START, *[IMAGE] * 4, END, 6, START, *[VIDEO] * 8, END, 7, 8]])
    pixels, video = torch.randn(16, PATCH_DIM, generator=g), torch.randn(32, PATCH_DIM, generator=g)
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=pixels, image_grid_thw=GRIDS[:1], pixel_values_videos=video,
                  video_grid_thw=video_grid, second_per_grid_ts=seconds,
                  mm_token_type_ids=(ids == IMAGE).int() + 2 * (ids == VIDEO).int()).logits
        got = ours(ids, pixel_values=pixels, image_grid_thw=GRIDS[:1], pixel_values_videos=video,
                   video_grid_thw=video_grid, second_per_grid_ts=seconds)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_greedy_generation_matches_hugging_face(checkpoint, reference_kernels):
    hf, directory = checkpoint
    ours = Qwen25VLForConditionalGeneration.from_pretrained(directory)
    ids, mask, pixels = _prompts()
    with torch.no_grad():
        want = hf.generate(**_hf_inputs(ids, mask, pixels), do_sample=False, max_new_tokens=6)
    got = ours.generate(ids, mask, pixel_values=pixels, image_grid_thw=GRIDS, max_new_tokens=6)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # One unpadded prompt (the cache's padded path) continues the same way.
    n = int(mask[1].sum())
    single = ours.generate(ids[1:, -n:], pixel_values=pixels[16:], image_grid_thw=GRIDS[1:], max_new_tokens=6)
    torch.testing.assert_close(single[0, -6:], got[1, -6:], rtol=0, atol=0)
    # A sequence that ends continues with padding; the others go on unchanged.
    length, eos = ids.shape[1], int(got[0, ids.shape[1]])
    ended = ours.generate(ids, mask, pixel_values=pixels, image_grid_thw=GRIDS, max_new_tokens=6, eos_token_id=eos,
                          pad_token_id=PAD)
    assert ended[0, length] == eos and (ended[0, length + 1:] == PAD).all()
    if not (got[1, length:] == eos).any():
        torch.testing.assert_close(ended[1], got[1], rtol=0, atol=0)


def test_sampling_is_reproducible_with_a_generator(checkpoint, reference_kernels):
    _, directory = checkpoint
    ours = Qwen25VLForConditionalGeneration.from_pretrained(directory)
    ids, mask, pixels = _prompts()
    runs = [ours.generate(ids, mask, pixel_values=pixels, image_grid_thw=GRIDS, max_new_tokens=4, do_sample=True,
                          top_k=20, top_p=0.9, temperature=0.8, eos_token_id=[],
                          generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (2, ids.shape[1] + 4)


def test_image_count_and_size_mismatch_errors(checkpoint):
    _, directory = checkpoint
    ours = Qwen25VLForConditionalGeneration.from_pretrained(directory)
    ids, mask, pixels = _prompts()
    with pytest.raises(ValueError, match="image_grid_thw: describes 3 images, but input_ids hold 2"):
        ours(ids, mask, pixel_values=torch.cat([pixels, pixels[:16]]), image_grid_thw=torch.cat([GRIDS, GRIDS[:1]]))
    with pytest.raises(ValueError, match="more images"):
        ours(ids, mask, pixel_values=pixels[:16], image_grid_thw=GRIDS[:1])
    with pytest.raises(ValueError, match="has 4 placeholder tokens, its grid"):
        ours(ids, mask, pixel_values=pixels, image_grid_thw=GRIDS.flip(0))
    with pytest.raises(ValueError, match="than the 0 that image_grid_thw describes"):
        ours(ids, mask)


def test_rope_index_matches_hugging_face_with_video_and_padding(checkpoint):
    from mmfast.models.mrope_index import mrope_position_ids

    hf, _ = checkpoint
    # Sequence 0: image (4x4 patches), text, video (3 frames of 4x4); sequence 1: text, video (1 frame of 8x4).
    video_grids, images = torch.tensor([[3, 4, 4], [1, 8, 4]]), GRIDS[:1]
    first = [5, START, *[IMAGE] * 4, END, 6, 7, START, *[VIDEO] * 12, END, 8]
    second = [9, 10, START, *[VIDEO] * 8, END, 11, 12]
    ids = torch.full((2, len(first)), PAD)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = torch.tensor(first), 1
    ids[1, -len(second):], mask[1, -len(second):] = torch.tensor(second), 1
    seconds = _seconds(hf, [1.5, 0.5])
    types = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    want, want_delta = hf.model.get_rope_index(ids, types, image_grid_thw=images, video_grid_thw=video_grids,
                                               second_per_grid_ts=seconds, attention_mask=mask)
    got, delta = mrope_position_ids(ids, image_token_id=IMAGE, video_token_id=VIDEO, spatial_merge_size=2,
                                    tokens_per_second=hf.config.vision_config.tokens_per_second,
                                    image_grid_thw=images, video_grid_thw=video_grids, second_per_grid_ts=seconds,
                                    attention_mask=mask)
    assert int(got[0, 0].max()) > 12  # the video's time ids are spread out (tokens_per_second * seconds)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(delta, want_delta.view(2, 1), rtol=0, atol=0)


def test_training_step_backward(checkpoint, reference_kernels):
    _, directory = checkpoint
    model = Qwen25VLForConditionalGeneration.from_pretrained(directory).train()
    ids, mask, pixels = _prompts()
    logits = model(ids, mask, pixel_values=pixels, image_grid_thw=GRIDS)
    valid = mask.bool()[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1][valid], ids[:, 1:][valid])
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_save_pretrained_round_trip_and_presets(tmp_path):
    from mmfast.models.presets import qwen25_vl_preset

    import dataclasses

    torch.manual_seed(0)
    tiny = Qwen25VLForConditionalGeneration(dataclasses.replace(qwen25_vl_preset("tiny"), tie_word_embeddings=True))
    tiny.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = mmfast.models.from_pretrained(tmp_path)
    assert loaded.config.to_dict() == tiny.config.to_dict()
    assert loaded.lm_head.weight is loaded.model.language_model.embed_tokens.weight
    for (name, a), b in zip(tiny.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    # The directory is a transformers checkpoint too: its strict config accepts it.
    transformers = pytest.importorskip("transformers")
    assert transformers.AutoConfig.from_pretrained(tmp_path).model_type == "qwen2_5_vl"
    half = Qwen25VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    # Released sizes: parameter counts of the published checkpoints (built on the meta device).
    for name, billions, tied in (("3b", 3.75, True), ("7b", 8.29, False)):
        with torch.device("meta"):
            model = Qwen25VLForConditionalGeneration.from_preset(name)
        assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions, name
        assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) == tied
    with pytest.raises(ValueError, match="unknown Qwen2.5-VL preset"):
        qwen25_vl_preset("70b")


def test_legacy_config_layout():
    from mmfast.models.qwen25_vl import CHECKPOINT_RULES, Qwen25VLConfig
    from mmfast.models.checkpoint import map_name

    legacy = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "hidden_size": 64, "vocab_size": 99,
              "rope_theta": 5000.0, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
              "vision_config": {"depth": 1, "out_hidden_size": 64, "tokens_per_second": 2}}
    config = Qwen25VLConfig.from_dict(legacy)
    assert (config.hidden_size, config.vocab_size, config.rope_theta, config.mrope_section) == (64, 99, 5000.0,
                                                                                                (2, 3, 3))
    assert map_name("model.layers.0.mlp.up_proj.weight", CHECKPOINT_RULES) == \
        "model.language_model.layers.0.mlp.up_proj.weight"
    assert map_name("visual.blocks.0.norm1.weight", CHECKPOINT_RULES) == "model.visual.blocks.0.norm1.weight"
    assert map_name("model.language_model.norm.weight", CHECKPOINT_RULES) == "model.language_model.norm.weight"
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        Qwen25VLConfig.from_dict({"rope_scaling": {"rope_type": "yarn"}})


@pytest.mark.gpu
def test_cuda_bf16_kernels_within_twice_eager_error():
    """On a GPU, with head dims the Triton kernels take (64): mmfast's bf16 logits are
    within twice the error of the PyTorch-reference ops in bf16, both against float64."""
    import copy
    import dataclasses

    from mmfast.models.presets import qwen25_vl_preset

    tiny = qwen25_vl_preset("tiny")
    config = dataclasses.replace(
        tiny, hidden_size=256, intermediate_size=512, num_attention_heads=4, mrope_section=(8, 12, 12),
        vision={**tiny.vision, "hidden_size": 128, "num_heads": 2, "intermediate_size": 256})
    torch.manual_seed(0)
    model = Qwen25VLForConditionalGeneration(config).cuda().eval()
    image, start, end = config.image_token_id, config.vision_start_token_id, 254  # 254: any text token
    first = torch.tensor([5, start, *[image] * 16, end, 6, 7, 8])
    ids = torch.zeros(2, len(first), dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = first, 1
    ids[1, 5:], mask[1, 5:] = torch.randint(1, 200, (len(first) - 5,)), 1
    inputs = dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), pixel_values=torch.randn(64, 1176).cuda(),
                  image_grid_thw=torch.tensor([[1, 8, 8]]).cuda())
    with torch.no_grad():
        exact = copy.deepcopy(model).double()
        with mmfast.set_backend("torch"):
            want = exact(**inputs)
            eager = copy.deepcopy(model).bfloat16()(**inputs).double()
        got = model.bfloat16()(**inputs).double()
    valid = mask.bool().cuda()
    err, eager_err = (got - want)[valid].abs().max(), (eager - want)[valid].abs().max()
    floor = torch.finfo(torch.bfloat16).eps * want[valid].abs().max()
    assert err <= 2 * eager_err + floor, (float(err), float(eager_err))


def test_kv_cache_bad_input():
    from mmfast.models.kv_cache import KVCache

    cache = KVCache(1, 2, 4, 1, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="new_lengths: expected 2 entries"):
        cache.plan([1])
    cache.advance(cache.plan([3, 1]))
    with pytest.raises(ValueError, match="exceed the capacity 4"):
        cache.plan([2, 0])


def test_batched_image_and_video_generation_matches_hugging_face(checkpoint, reference_kernels):
    # One generate call: an image (4x8 patches) in the first prompt, a two-frame video
    # (2x4x4 patches, 1.5 s per temporal patch) in the second, prompts of different
    # lengths, left-padded: the M-RoPE positions of each kind, per sequence, in one cache.
    hf, directory = checkpoint
    ours = Qwen25VLForConditionalGeneration.from_pretrained(directory)
    g = torch.Generator().manual_seed(4)
    text = lambda n: torch.randint(3, 100, (n,), generator=g).tolist()  # noqa: E731
    first = text(2) + [START] + [IMAGE] * 8 + [END] + text(3)
    second = text(5) + [START] + [VIDEO] * 8 + [END] + text(1) + text(4)
    length = max(len(first), len(second))
    ids, mask = torch.full((2, length), PAD), torch.zeros(2, length, dtype=torch.long)
    for row, seq in enumerate((first, second)):
        ids[row, length - len(seq):], mask[row, length - len(seq):] = torch.tensor(seq), 1
    image_grid, video_grid, seconds = GRIDS[1:], torch.tensor([[2, 4, 4]]), torch.tensor([1.5])
    pixels, video = torch.randn(32, PATCH_DIM, generator=g), torch.randn(32, PATCH_DIM, generator=g)
    with torch.no_grad():
        want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=image_grid,
                           pixel_values_videos=video, video_grid_thw=video_grid, second_per_grid_ts=seconds,
                           mm_token_type_ids=(ids == IMAGE).int() + 2 * (ids == VIDEO).int(), do_sample=False,
                           max_new_tokens=8)
    got = ours.generate(ids, mask, pixel_values=pixels, image_grid_thw=image_grid, pixel_values_videos=video,
                        video_grid_thw=video_grid, second_per_grid_ts=seconds, max_new_tokens=8)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got[0, length:] == 2).any()  # the first ends (eos 2) and continues with padding, as in transformers
