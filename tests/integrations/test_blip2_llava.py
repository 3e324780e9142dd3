"""mmfast.patch on tiny random BLIP-2 and LLaVA models: the patched modules match their
unpatched outputs, and undo restores the instances exactly."""

import pytest
import torch

import mmfast

transformers = pytest.importorskip("transformers")


def test_blip2_qformer_patched_matches_and_undo_restores():
    from transformers import Blip2Config, Blip2Model

    config = Blip2Config(
        vision_config=dict(hidden_size=24, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        qformer_config=dict(hidden_size=32, num_attention_heads=4, intermediate_size=37, num_hidden_layers=2,
                            encoder_hidden_size=24),
        text_config=dict(model_type="opt", hidden_size=32, ffn_dim=37, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=99, word_embed_proj_dim=32),
        num_query_tokens=5,
    )
    model = Blip2Model(config).eval()
    image = torch.randn(2, 11, 24)
    image_mask = torch.ones(2, 11, dtype=torch.long)
    image_mask[1, 8:] = 0

    def run():
        queries = model.query_tokens.expand(2, -1, -1)
        return model.qformer(query_embeds=queries, encoder_hidden_states=image,
                             encoder_attention_mask=image_mask).last_hidden_state

    with torch.no_grad():
        before = run()
        handle = mmfast.patch(model)
        assert [name for name, _ in handle.replaced] == ["qformer"]
        patched = run()
        handle.undo()
        after = run()
    torch.testing.assert_close(patched, before, atol=3e-5, rtol=1e-4)
    assert torch.equal(after, before) and "forward" not in model.qformer.__dict__


def test_llava_tower_and_projector_patched_match_and_undo_restores():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=24, intermediate_size=37, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                                vocab_size=99),
    )
    model = LlavaForConditionalGeneration(config).eval()
    projector = model.model.multi_modal_projector
    x = torch.randn(2, 5, 24)
    pixels = torch.randn(2, 3, 28, 28)

    def run():
        tower = model.model.vision_tower(pixels).last_hidden_state
        return projector(x), tower

    with torch.no_grad():
        before = run()
        handle = mmfast.patch(model)
        replaced = dict(handle.replaced)
        assert replaced["model.multi_modal_projector"] == "projector gelu"
        assert replaced["model.vision_tower.encoder.layers.0.self_attn"] == "mmfast attention"
        assert replaced["model.language_model.layers.0.self_attn"] == "mmfast attention implementation"
        for name in replaced:  # every name resolves on the model
            model.get_submodule(name)
        patched = run()
        handle.undo()
        after = run()
    torch.testing.assert_close(patched, before, atol=3e-5, rtol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(after, before)) and "forward" not in projector.__dict__
