"""CLIP / SigLIP text towers against Hugging Face: tiny random CLIPTextModel,
CLIPTextModelWithProjection and SiglipTextModel, their state_dicts loaded strictly into
mmfast's towers; outputs, hidden states and every parameter's gradient in fp32, with and
without padding; the packing of a padded batch; bad input."""

import pytest
import torch

from mmfast.nn import TextTransformer, TextTransformerWithProjection
from mmfast.nn.text import eos_positions, pack_padding

transformers = pytest.importorskip("transformers")

# Head dim 32 (hidden 64, 2 heads): the Triton attention backends take it.
TINY = dict(vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=12, bos_token_id=97, eos_token_id=98, pad_token_id=0)
EOS = 98


def _hf(kind: str, **overrides):
    torch.manual_seed(0)
    if kind == "siglip":
        return transformers.SiglipTextModel(transformers.SiglipTextConfig(**TINY, **overrides)).eval()
    config = transformers.CLIPTextConfig(**{**TINY, "projection_dim": 16, **overrides})
    cls = transformers.CLIPTextModelWithProjection if kind == "clip_projection" else transformers.CLIPTextModel
    return cls(config).eval()


def _ours(hf):
    build = TextTransformerWithProjection if "Projection" in type(hf).__name__ else TextTransformer
    tower = build.from_config(hf.config)
    missing, unexpected = tower.load_state_dict(hf.state_dict(), strict=True)
    assert not missing and not unexpected
    return tower


def _batch():
    # Row 0 is right-padded, row 1 full, row 2 left-padded (keys of its first two tokens hidden).
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 90, (3, 9), generator=g)
    ids[0, 5], ids[1:, -1] = EOS, EOS
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 6:] = 0
    mask[2, :2] = 0
    return ids, mask


def _assert_close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["clip_projection", "siglip"])  # CLIPTextModel is inside the first
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "attention_mask"])
def test_tower_matches_hugging_face(kind, padded):
    hf = _hf(kind)
    ours = _ours(hf)
    ids, mask = _batch()
    mask = mask if padded else None
    # CLIP's causal padding rows are not compared (Hugging Face's own backends disagree
    # on them, see mmfast.nn.text); SigLIP's are, since it pools the last token.
    rows = mask.bool() if padded and kind != "siglip" else torch.ones(ids.shape, dtype=torch.bool)

    want = hf(ids, attention_mask=mask, output_hidden_states=True)
    got = ours(ids, mask, output_hidden_states=True)
    _assert_close(got.last_hidden_state[rows], want.last_hidden_state[rows])
    assert len(got.hidden_states) == len(want.hidden_states) == TINY["num_hidden_layers"] + 1
    for ours_state, hf_state in zip(got.hidden_states, want.hidden_states):
        _assert_close(ours_state[rows], hf_state[rows])
    pooled, hf_pooled = (got.text_embeds, want.text_embeds) if kind == "clip_projection" else \
        (got.pooler_output, want.pooler_output)
    _assert_close(pooled, hf_pooled)
    assert got[0] is pooled if kind == "clip_projection" else got[0] is got.last_hidden_state

    # Gradients of every parameter, from the rows compared and the pooled output.
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(got.last_hidden_state.shape, generator=g) * rows[..., None]
    pooled_weight = torch.randn(pooled.shape, generator=g)
    for out, emb in ((got, pooled), (want, hf_pooled)):
        ((out.last_hidden_state * weight).sum() + (emb * pooled_weight).sum()).backward()
    hf_grads = dict(hf.named_parameters())
    for name, param in ours.named_parameters():
        # Sums over tokens in fp32, in another order: the error scales with the largest entry.
        want_grad = hf_grads[name].grad
        atol = 1e-5 * max(1.0, want_grad.abs().max().item())
        torch.testing.assert_close(param.grad, want_grad, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")


def test_legacy_eos_rule_and_position_ids():
    # eos_token_id 2 (configs written before transformers PR #24773): CLIP pools at the
    # highest id. Explicit position_ids reach the position embedding.
    hf = _hf("clip", eos_token_id=2)
    ours = _ours(hf)
    ids, _ = _batch()
    positions = torch.arange(9).flip(0)[None].expand(3, -1)
    with torch.no_grad():
        want, got = hf(ids, position_ids=positions), ours(ids, position_ids=positions)
    _assert_close(got.pooler_output, want.pooler_output)
    assert torch.equal(eos_positions(ids, 2), ids.argmax(-1))
    assert eos_positions(ids, EOS).tolist() == [5, 8, 8]


def test_pack_padding_segments():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    causal = pack_padding(mask, causal=True)
    assert causal.order.tolist() == [0, 1, 2, 3, 5, 6, 7, 4]
    assert torch.equal(causal.order[causal.inverse], torch.arange(8))
    # Per row: valid queries on valid keys, padding queries on no key, padding keys alone.
    assert causal.packing.cu_seqlens.tolist() == [0, 2, 4, 4, 7, 8, 8]
    assert causal.packing.cu_seqlens_k.tolist() == [0, 2, 2, 4, 7, 7, 8]
    both_ways = pack_padding(mask.bool(), causal=False)
    # Per row: every query on the valid keys, padding keys alone.
    assert both_ways.packing.cu_seqlens.tolist() == [0, 4, 4, 8, 8]
    assert both_ways.packing.cu_seqlens_k.tolist() == [0, 2, 4, 7, 8]
    assert causal.packing.max_seqlen == both_ways.packing.max_seqlen == 4


def test_transformers_4_checkpoint_keys_load(tmp_path):
    # Stable Diffusion's text_encoder/ was saved with the text_model. prefix and position_ids;
    # the LDMs' loader reads it through adapt_checkpoint.
    from safetensors.torch import save_file

    from mmfast.models._pipeline_dir import load_weights

    hf = _hf("clip")
    old = {f"text_model.{k}": v.contiguous() for k, v in hf.state_dict().items()}
    old["text_model.embeddings.position_ids"] = torch.arange(12)[None]
    save_file(old, str(tmp_path / "model.safetensors"))
    tower = TextTransformer.from_config(hf.config)
    load_weights(tower, tmp_path)
    assert all(torch.equal(v, hf.state_dict()[k]) for k, v in tower.state_dict().items())
    projected = TextTransformerWithProjection.from_config(hf.config)
    state = {**{f"text_model.{k}": v for k, v in hf.state_dict().items()}, "text_projection.weight":
             torch.zeros(16, 64), "text_model.embeddings.position_ids": torch.arange(12)[None]}
    projected.load_state_dict(TextTransformerWithProjection.adapt_checkpoint(state), strict=True)


def test_bad_input_is_named():
    tower = _ours(_hf("clip"))
    ids, mask = _batch()
    with pytest.raises(TypeError, match="input_ids: expected an integer tensor"):
        tower(ids.float())
    with pytest.raises(ValueError, match="input_ids: 13 tokens, more than the 12 positions"):
        tower(torch.ones(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask: expected the shape of input_ids \(3, 9\)"):
        tower(ids, mask[:, :5])
    with pytest.raises(ValueError, match="config: expected a CLIP or SigLIP text config"):
        TextTransformer.from_config(transformers.CLIPVisionConfig())
    with pytest.raises(ValueError, match="eos_token_id: a CLIP text tower pools at its end token"):
        TextTransformer(style="clip", vocab_size=9, max_position_embeddings=4, hidden_size=8, num_layers=1,
                        num_heads=1, intermediate_size=8)
    with pytest.raises(ValueError, match="text_model: expected a CLIP text tower"):
        TextTransformerWithProjection(_ours(_hf("siglip")), 16)


# ---- GPU-only: a CLIP-L-sized text tower in bf16 ------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "attention_mask"])
def test_bf16_tower_is_as_accurate_as_hugging_face(padded):
    # Against the float32 model, the bf16 mmfast tower may err at most twice as much as
    # Hugging Face's own bf16 forward (the flash-attention rule), on the valid tokens.
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=4,
                                         num_attention_heads=12, max_position_embeddings=77)
    exact = transformers.CLIPTextModel(config).cuda().eval()
    hf = transformers.CLIPTextModel(config).cuda().eval()
    hf.load_state_dict(exact.state_dict())
    hf.to(torch.bfloat16)
    ours = TextTransformer.from_config(config).cuda().to(torch.bfloat16).eval()
    ours.load_state_dict(exact.state_dict())
    ids = torch.randint(0, 49000, (8, 77), device="cuda")
    ids[:, 40] = config.eos_token_id
    mask = None
    if padded:
        mask = (torch.arange(77, device="cuda") <= torch.randint(41, 77, (8, 1), device="cuda")).long()
    rows = torch.ones(ids.shape, dtype=torch.bool, device="cuda") if mask is None else mask.bool()
    with torch.no_grad():
        want, eager, got = exact(ids, mask), hf(ids, mask), ours(ids, mask)
    for name in ("last_hidden_state", "pooler_output"):
        ref, e, o = (getattr(x, name).float() for x in (want, eager, got))
        if name == "last_hidden_state":
            ref, e, o = ref[rows], e[rows], o[rows]
        err, err_eager = (o - ref).abs().max().item(), (e - ref).abs().max().item()
        assert err <= 2 * err_eager + 1e-3, (name, err, err_eager)
