"""mmfast.patch on a tiny random Mllama text model with a cross-attention layer: logits
match with Mllama's mask (converted to a KeyStartMask), a mask of another form keeps
Hugging Face's forward, and undo restores the instance exactly."""

import pytest
import torch

import mmfast

transformers = pytest.importorskip("transformers")


def _tiny_mllama():
    from transformers import MllamaForCausalLM
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig

    config = MllamaTextConfig(vocab_size=99, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=48, num_hidden_layers=2, cross_attention_layers=[1],
                              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = "sdpa"
    model = MllamaForCausalLM(config).eval()
    layer = model.model.layers[1]
    with torch.no_grad():
        layer.cross_attn_attn_gate.fill_(0.7)
        layer.cross_attn_mlp_gate.fill_(-0.4)
    return model


def _inputs(dense):
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    additive, rows = _prepare_cross_attention_mask(dense, num_vision_tokens=3, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    return dict(input_ids=torch.randint(0, 99, (2, 7), generator=gen),
                cross_attention_states=torch.randn(2, dense.shape[2] * dense.shape[3] * 3, 64, generator=gen),
                cross_attention_mask=additive, full_text_row_masked_out_mask=rows, use_cache=False)


def _mllama_dense_mask():
    # Sample 0: images at text positions 1 and 4 (2 tiles, 1 tile); sample 1: one image at 3.
    positions = torch.tensor([[1, 4], [3, -1]])
    tiles = torch.tensor([[2, 1], [1, 0]])
    t = torch.arange(7)[None, :, None, None]
    follows = (positions[:, None, :, None] >= 0) & (positions[:, None, :, None] <= t)
    return (follows & (torch.arange(2) < tiles[:, None, :, None])).long()


@pytest.fixture
def calls(monkeypatch):
    """Counts the cross_attention calls of the patched layers."""
    from mmfast.nn import gated_cross_attention

    seen = []
    real = gated_cross_attention.cross_attention
    monkeypatch.setattr(gated_cross_attention, "cross_attention", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    return seen


def test_patched_logits_match_and_undo_restores(calls):
    model = _tiny_mllama()
    inputs = _inputs(_mllama_dense_mask())
    with torch.no_grad():
        before = model(**inputs).logits
        handle = mmfast.patch(model)
        assert [name for name, _ in handle.replaced] == ["model.layers.1"]
        patched = model(**inputs).logits
        assert len(calls) == 1 and type(calls[0]["mask"]).__name__ == "KeyStartMask"
        handle.undo()
        after = model(**inputs).logits
    torch.testing.assert_close(patched, before, atol=1e-4, rtol=1e-4)
    assert torch.equal(after, before)


def test_mask_of_another_form_keeps_hf_forward(calls):
    model = _tiny_mllama()
    dense = _mllama_dense_mask()
    dense[0, 6, 0] = 0  # the last token stops seeing image 0: not "images up to the position"
    inputs = _inputs(dense)
    with torch.no_grad():
        before = model(**inputs).logits
        with mmfast.patch(model):
            patched = model(**inputs).logits
    assert torch.equal(patched, before) and not calls
