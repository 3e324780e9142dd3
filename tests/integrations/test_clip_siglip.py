"""mmfast.patch on tiny random CLIP and SigLIP models: the patched instance matches the
unpatched one, its state_dict is unchanged, other instances are untouched, undo restores
bit-identical outputs; unknown models get an error listing the families."""

import pytest
import torch

import mmfast

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8)
TEXT = dict(hidden_size=64, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)


def _vision_model(name, **overrides):
    if name == "clip":
        config = transformers.CLIPVisionConfig(**{**TINY, **overrides}, hidden_act="quick_gelu")
        return transformers.CLIPVisionModel(config)
    return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**{**TINY, **overrides}))


def _dual_model(name):
    if name == "clip":
        config = transformers.CLIPConfig(text_config=TEXT, vision_config={**TINY, "hidden_act": "quick_gelu"},
                                         projection_dim=16)
        return transformers.CLIPModel(config)
    config = transformers.SiglipConfig(text_config=TEXT, vision_config=TINY)
    return transformers.SiglipModel(config)


def _outputs(model, pixels, **kw):
    out = model(pixel_values=pixels, **kw)
    return out.last_hidden_state, out.pooler_output


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_patched_matches_and_undo_restores(name):
    torch.manual_seed(0)
    model, other = _vision_model(name).eval(), _vision_model(name).eval()
    pixels = torch.randn(2, 3, 32, 32)
    odd = torch.randn(1, 3, 24, 40)  # another size: interpolated position table
    with torch.no_grad():
        before = _outputs(model, pixels)
        before_odd = _outputs(model, odd, interpolate_pos_encoding=True)
        state = {k: v.clone() for k, v in model.state_dict().items()}

        handle = mmfast.patch(model)
        kinds = {what for _, what in handle.replaced}
        assert {"fused patch+position embedding", "mmfast attention", "mmfast layer_norm"} <= kinds
        assert not any("forward" in m.__dict__ for m in other.modules())
        for got, want in zip(_outputs(model, pixels) + _outputs(model, odd, interpolate_pos_encoding=True),
                             before + before_odd):
            torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert model.state_dict().keys() == state.keys()

        handle.undo()
        assert not any("forward" in m.__dict__ for m in model.modules())
        for got, want in zip(_outputs(model, pixels), before):
            assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_dual_encoder_patches_both_towers(name):
    # The vision tower module by module; the text tower (tests/integrations/
    # test_clip_siglip_text.py) as a whole, its inner modules untouched.
    torch.manual_seed(0)
    model = _dual_model(name).eval()
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.randint(0, TEXT["vocab_size"], (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixels)
        with mmfast.patch(model) as handle:
            vision = [n for n, _ in handle.replaced if n != "text_model"]
            assert vision and all(n.startswith("vision_model.") for n in vision)
            for n, _ in handle.replaced:  # names resolve on the model
                model.get_submodule(n)
            assert ("text_model", f"mmfast {name} text tower") in handle.replaced
            assert not any("forward" in m.__dict__ for m in model.text_model.children())
            got = model(input_ids=ids, pixel_values=pixels)
        for field in ("image_embeds", "text_embeds", "logits_per_image"):
            torch.testing.assert_close(getattr(got, field), getattr(before, field), rtol=2e-4, atol=2e-4)


def test_patched_tower_trains():
    # Gradients through the patched modules match those of the unpatched model.
    torch.manual_seed(0)
    model = _vision_model("clip", num_hidden_layers=1, image_size=16).train()
    pixels = torch.randn(2, 3, 16, 16)
    grads = []
    for patched in (True, False):
        model.zero_grad()
        handle = mmfast.patch(model) if patched else None
        out = model(pixel_values=pixels)
        (out.last_hidden_state.square().mean() + out.pooler_output.sum()).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        if handle is not None:
            handle.undo()
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-4, msg=name)


def test_unknown_model_lists_supported_families():
    with pytest.raises(TypeError, match=r"no family recognises model of type Linear.*clip: CLIPVisionModel"):
        mmfast.patch(torch.nn.Linear(2, 2))


# ---- GPU-only: a ViT-B-sized tower in bf16 -----------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_patched_bf16_tower_is_as_accurate_as_hugging_face(name):
    # Against the float32 model with the same weights, the patched bf16 tower may err at
    # most twice as much as Hugging Face's own bf16 forward (the flash-attention rule).
    torch.manual_seed(0)
    size = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=12,
                image_size=224, patch_size=16)
    exact = _vision_model(name, **size).cuda().eval()
    model = _vision_model(name, **size).cuda().eval()
    model.load_state_dict(exact.state_dict())
    model.to(torch.bfloat16)
    pixels = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.no_grad():
        want = _outputs(exact, pixels)
        hf = _outputs(model, pixels.bfloat16())
        with mmfast.patch(model):
            ours = _outputs(model, pixels.bfloat16())
    for got, eager, ref in zip(ours, hf, want):
        err, err_eager = (got.float() - ref).abs().max().item(), (eager.float() - ref).abs().max().item()
        assert err <= 2 * err_eager + 1e-3, (err, err_eager)
