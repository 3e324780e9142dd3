"""mmfast's OPT decoder against Hugging Face's OPTForCausalLM in the layouts BLIP-2's
checkpoints do not exercise: post-LayerNorm blocks (OPT-350m) with project_in /
project_out, and LayerNorms without affine parameters; packed prompts of different
lengths, then cached steps."""

import pytest
import torch

from mmfast.models.opt_decoder import OPTDecoder

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("layout", [
    dict(do_layer_norm_before=False, word_embed_proj_dim=16),
    dict(do_layer_norm_before=True, layer_norm_elementwise_affine=False, enable_bias=False),
])
def test_matches_hugging_face_opt(layout):
    config = transformers.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=32, **layout)
    torch.manual_seed(0)
    hf = transformers.OPTForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = OPTDecoder(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=32, **layout).eval()
    state = {k.removeprefix("model.decoder."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    ours.load_state_dict(state, strict=True)
    assert (ours.final_layer_norm is None) == (not layout["do_layer_norm_before"])

    # Two prompts, the second left-padded by 2, then two cached steps of one token each.
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    lengths = [7, 5]
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, use_cache=True)
        cu = torch.tensor([0, 7, 12], dtype=torch.int32)
        cache = ours.new_cache(2, 9)
        positions = torch.cat([torch.arange(n) for n in lengths])
        hidden = ours(ours.embed_tokens(ids[mask.bool()]), positions, cu, 7, cache=cache, new_lengths=lengths)
        torch.testing.assert_close(hf.lm_head(hidden), want.logits[mask.bool()], rtol=1e-5, atol=1e-5)

        past, full_mask, position = want.past_key_values, mask, torch.tensor(lengths)
        for step in range(2):
            token = torch.tensor([[11 + step], [40 + step]])
            full_mask = torch.cat([full_mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            want = hf(input_ids=token, attention_mask=full_mask, past_key_values=past, use_cache=True)
            past = want.past_key_values
            hidden = ours(ours.embed_tokens(token[:, 0]), position, torch.arange(3, dtype=torch.int32), 1,
                          cache=cache, new_lengths=[1, 1])
            position = position + 1
            torch.testing.assert_close(hf.lm_head(hidden), want.logits[:, 0], rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_named():
    ours = OPTDecoder(vocab_size=16, hidden_size=8, ffn_dim=8, num_hidden_layers=1, num_attention_heads=2)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"inputs_embeds: expected packed \[T, 8\]"):
        ours(torch.randn(3, 4), torch.arange(3), cu, 3)
    with pytest.raises(ValueError, match=r"position_ids: expected \[3\]"):
        ours(torch.randn(3, 8), torch.arange(4), cu, 3)
    with pytest.raises(ValueError, match="num_attention_heads: 3 does not divide hidden_size 8"):
        OPTDecoder(vocab_size=16, hidden_size=8, ffn_dim=8, num_hidden_layers=1, num_attention_heads=3)
