"""mmfast.patch on tiny random-weight Qwen2-VL / Qwen2.5-VL models: patched outputs match
the unpatched ones, the state_dict is kept, and undo restores bit-identical behaviour."""

import pytest
import torch

import mmfast

transformers = pytest.importorskip("transformers")

GRID = torch.tensor([[1, 4, 8], [2, 4, 4]])  # an image and a 2-frame video, in patches
TEXT = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 128,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}}


def _qwen25():
    return transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
        text_config=TEXT, image_token_id=120, video_token_id=121, vision_start_token_id=122,
        vision_config={"depth": 2, "hidden_size": 64, "num_heads": 2, "intermediate_size": 96,
                       "out_hidden_size": 64, "patch_size": 4, "window_size": 16, "fullatt_block_indexes": [1]}))


def _qwen2():
    return transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(
        text_config=TEXT, image_token_id=120, video_token_id=121, vision_start_token_id=122,
        vision_config={"depth": 2, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 2, "hidden_size": 64,
                       "patch_size": 4}))


def _outputs(model, pixels, ids):
    with torch.no_grad():
        vision = model.model.visual(pixels, grid_thw=GRID)
        logits = model(input_ids=ids).logits
    return vision.pooler_output, vision.last_hidden_state, logits


def _own_forwards(model):
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("build,replaced", [
    (_qwen25, {"Qwen2_5_VLVisionAttention", "Qwen2_5_VLRMSNorm", "Qwen2_5_VisionTransformerPretrainedModel",
               "Qwen2_5_VLMLP", "Qwen2MLP", "Qwen2_5_VLAttention"}),
    (_qwen2, {"VisionAttention", "LayerNorm", "Qwen2VLRMSNorm", "Qwen2VisionTransformerPretrainedModel",
              "VisionMlp", "Qwen2MLP", "Qwen2VLAttention"}),
])
def test_patch_matches_and_undo_restores(build, replaced):
    torch.manual_seed(0)
    model = build().eval()
    vision = model.config.vision_config
    pixels = torch.randn(int(GRID.prod(-1).sum()),
                         vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2)
    ids = torch.randint(0, 100, (2, 7))
    before = _outputs(model, pixels, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    handle = mmfast.patch(model)
    patched_classes = {type(model.get_submodule(name)).__name__ for name, _ in handle.replaced}
    assert patched_classes == replaced
    for got, want in zip(_outputs(model, pixels, ids), before):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    assert model.state_dict().keys() == state.keys()

    handle.undo()
    assert _own_forwards(model) == []
    for got, want in zip(_outputs(model, pixels, ids), before):
        assert torch.equal(got, want)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


# Qwen2.5-VL-7B's vision width (hidden 1280, 16 heads of 80, SwiGLU 3420) at depth 4.
WIDE = {"depth": 4, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420, "out_hidden_size": 3584,
        "patch_size": 14, "window_size": 112, "fullatt_block_indexes": [3]}


@pytest.mark.parametrize("wide", [False, pytest.param(True, marks=pytest.mark.gpu)])
def test_patch_the_vision_tower_alone_in_bf16(wide, device):
    torch.manual_seed(0)
    if wide:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        config = transformers.Qwen2_5_VLConfig(vision_config=WIDE).vision_config
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(config)
        grid = torch.tensor([[1, 32, 32], [1, 16, 46], [4, 16, 16]])  # 448 px, 224x644 px, 8-frame video
        replaced = 1 + 4 + 2 * 4 + 1 + 4
    else:
        tower, grid = _qwen25().model.visual, GRID
        replaced = 1 + 2 + 2 * 2 + 1 + 2  # tower, attentions, norms, merger norm, MLPs
    tower, grid = tower.to(device).eval(), grid.to(device)
    config = tower.config
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * config.patch_size ** 2, device=device)
    # The Triton interpreter cannot run bf16 tl.dot: on a CPU the attention goes to SDPA
    # (rotary and norms stay on Triton); on a GPU everything runs Triton.
    attention_backend = "sdpa" if device.type == "cpu" else None
    with torch.no_grad(), mmfast.set_backend(attention_backend, op="attention"):
        exact = tower.float()(pixels, grid_thw=grid).pooler_output
        tower.to(torch.bfloat16)
        before = tower(pixels, grid_thw=grid).pooler_output
        with mmfast.patch(tower) as handle:
            assert len(handle.replaced) == replaced
            got = tower(pixels, grid_thw=grid).pooler_output
        after = tower(pixels, grid_thw=grid).pooler_output
    assert torch.equal(after, before)
    # Within bf16 tolerance: no worse than twice HF's own bf16 error, plus a bf16 unit.
    err, err_hf = (got.float() - exact).abs().max(), (before.float() - exact).abs().max()
    assert err <= 2 * err_hf + exact.abs().max() * 2 ** -8, (err, err_hf)
