"""mmfast.patch on a tiny random Idefics2 model: the perceiver resampler matches before and
after, and undo restores the instance exactly."""

import pytest
import torch

import mmfast

transformers = pytest.importorskip("transformers")


def _tiny_idefics2():
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration

    config = Idefics2Config(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        perceiver_config=dict(hidden_size=48, resampler_n_latents=5, resampler_depth=2, resampler_n_heads=4,
                              resampler_head_dim=16, num_key_value_heads=2),
        text_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=99),
    )
    model = Idefics2ForConditionalGeneration(config).eval()
    torch.nn.init.normal_(model.model.connector.perceiver_resampler.latents)
    return model


def test_patched_perceiver_matches_and_undo_restores():
    model = _tiny_idefics2()
    resampler = model.model.connector.perceiver_resampler
    context = torch.randn(2, 9, 48)
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[0, 6:] = 0
    with torch.no_grad():
        before = resampler(context, attention_mask)
        handle = mmfast.patch(model)
        assert [name for name, _ in handle.replaced] == ["model.connector.perceiver_resampler"]
        patched = resampler(context, attention_mask)
        handle.undo()
        after = resampler(context, attention_mask)
    torch.testing.assert_close(patched, before, atol=2e-5, rtol=1e-4)
    assert torch.equal(after, before)
    assert "forward" not in resampler.__dict__
