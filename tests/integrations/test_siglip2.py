"""mmfast.patch on tiny random SigLIP2 (NaFlex) models: the packed vision path matches the
unpatched padded one on every real patch (outputs, pooled features, gradients), computes
no padded token, falls back to Hugging Face's forward for hidden states and attention
weights, undoes exactly, and names the argument of a NaFlex batch that disagrees."""

import copy

import pytest
import torch

import mmfast
from mmfast.integrations.transformers import _naflex

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Siglip2VisionModel"):
    pytest.skip("this transformers has no SigLIP2", allow_module_level=True)

PATCH = 4
VISION = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
              num_channels=3, patch_size=PATCH, num_patches=16)  # a 4x4 learned position grid
TEXT = dict(hidden_size=64, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
SHAPES = [(3, 5), (6, 2), (2, 2)]  # patch grids of three images of different aspect ratios
LENGTH = 16


def _vision_model(**overrides):
    torch.manual_seed(0)
    config = transformers.Siglip2VisionConfig(**{**VISION, **overrides})
    return transformers.Siglip2VisionModel(config).eval()


def _batch(shapes=SHAPES, length=LENGTH, seed=1):
    gen = torch.Generator().manual_seed(seed)
    features = VISION["num_channels"] * PATCH * PATCH
    pixels = torch.zeros(len(shapes), length, features)
    mask = torch.zeros(len(shapes), length, dtype=torch.long)
    for b, (h, w) in enumerate(shapes):
        pixels[b, : h * w] = torch.randn(h * w, features, generator=gen)
        mask[b, : h * w] = 1
    return pixels, mask, torch.tensor(shapes)


def _real(tensor, mask):
    return tensor[mask.bool()]


def test_packed_matches_padded_on_real_patches_and_undo_restores():
    model = _vision_model()
    pixels, mask, shapes = _batch()
    with torch.no_grad():
        want = model(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes)
        handle = mmfast.patch(model)
        assert handle.family == "siglip2"
        assert ("", "NaFlex batch packed (no padded token computed)") in handle.replaced
        got = model(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes)
        torch.testing.assert_close(_real(got.last_hidden_state, mask), _real(want.last_hidden_state, mask),
                                   rtol=2e-4, atol=2e-4)
        assert torch.all(got.last_hidden_state[~mask.bool()] == 0)  # padding: not computed
        torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=2e-4, atol=2e-4)
        handle.undo()
        again = model(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(again.last_hidden_state, want.last_hidden_state)


def test_padded_tokens_are_not_computed():
    model = _vision_model()
    pixels, mask, shapes = _batch()
    rows = []
    mmfast.patch(model)
    hook = model.encoder.layers[0].mlp.fc1.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[-2]))
    with torch.no_grad():
        model(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes)
    hook.remove()
    assert rows == [sum(h * w for h, w in SHAPES)]  # 15 + 12 + 4 real patches, not 3 x 16


def test_gradients_match():
    model, reference = _vision_model(), _vision_model()
    mmfast.patch(model)
    pixels, mask, shapes = _batch()
    for m in (model, reference):
        out = m(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes)
        (_real(out.last_hidden_state, mask).square().sum() + out.pooler_output.sum()).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=name)


def test_hidden_states_and_attentions_run_the_padded_forward():
    model = _vision_model()
    pixels, mask, shapes = _batch()
    with torch.no_grad():
        want = model(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes,
                     output_hidden_states=True, output_attentions=True)
        with mmfast.patch(model):
            got = model(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes,
                        output_hidden_states=True, output_attentions=True)
    assert len(got.hidden_states) == len(want.hidden_states) == VISION["num_hidden_layers"] + 1
    for g, w in zip(got.hidden_states + got.attentions, want.hidden_states + want.attentions):
        torch.testing.assert_close(g, w, rtol=2e-4, atol=2e-4)


def test_dual_model_image_and_text_features():
    torch.manual_seed(0)
    model = transformers.Siglip2Model(transformers.Siglip2Config(text_config=TEXT, vision_config=VISION)).eval()
    pixels, mask, shapes = _batch()
    ids = torch.randint(0, TEXT["vocab_size"], (3, 7))
    inputs = dict(input_ids=ids, pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes)
    with torch.no_grad():
        want = model(**inputs)
        with mmfast.patch(model) as handle:
            got = model(**inputs)
            names = [name for name, _ in handle.replaced]
            assert "vision_model" in names and any(n.startswith("text_model.") for n in names)
    for key in ("logits_per_image", "image_embeds", "text_embeds"):
        torch.testing.assert_close(getattr(got, key), getattr(want, key), rtol=2e-4, atol=2e-4, msg=key)


def test_state_dict_assign_deepcopy_and_return_tuple():
    model = _vision_model()
    pixels, mask, shapes = _batch()
    with torch.no_grad():
        want = model(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes).pooler_output
    mmfast.patch(model)
    fresh = _vision_model()
    fresh.load_state_dict({k: v * 1.0 for k, v in model.state_dict().items()})
    model.load_state_dict(fresh.state_dict(), assign=True)  # new Parameter objects reach the packed path
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for m in (model, twin):
            got = m(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes, return_dict=False)
            assert isinstance(got, tuple)
            torch.testing.assert_close(got[1], want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("backend, dtype, hidden", [
    ("torch", torch.float32, 64), ("triton", torch.float32, 128), ("triton", torch.float16, 144),  # head dims 32, 64, 72
])
def test_backends_and_head_dims(backend, dtype, hidden):
    model = _vision_model(hidden_size=hidden)
    pixels, mask, shapes = _batch()
    with torch.no_grad():
        want = model(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes).last_hidden_state
        model.to(dtype)
        mmfast.patch(model)
        with mmfast.set_backend(backend, op="attention"):
            got = model(pixel_values=pixels.to(dtype), pixel_attention_mask=mask,
                        spatial_shapes=shapes).last_hidden_state
    tol = 2e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(_real(got, mask).float(), _real(want, mask), rtol=tol, atol=tol)


def test_resized_positions_match_hugging_face():
    table = torch.randn(16, 8)
    shapes = ((3, 5), (6, 2), (3, 5))
    got = _naflex.resized_positions(table, shapes)
    want = transformers.models.siglip2.modeling_siglip2.Siglip2VisionEmbeddings.resize_positional_embeddings(
        table.reshape(4, 4, 8), torch.tensor(shapes), max_length=16)
    torch.testing.assert_close(got, torch.cat([want[b, : h * w] for b, (h, w) in enumerate(shapes)]))


@pytest.mark.parametrize("case, argument", [
    ("mask_longer", "pixel_attention_mask"),
    ("mask_hole", "pixel_attention_mask"),
    ("mask_shape", "pixel_attention_mask"),
    ("grid_too_big", "spatial_shapes"),
    ("grid_zero", "spatial_shapes"),
    ("shapes_rows", "spatial_shapes"),
    ("features", "pixel_values"),
])
def test_bad_naflex_batch_names_the_argument(case, argument):
    model = _vision_model()
    mmfast.patch(model)
    pixels, mask, shapes = _batch()
    if case == "mask_longer":
        mask[0, 15] = 1
    elif case == "mask_hole":
        mask[1, 3] = 0
    elif case == "mask_shape":
        mask = mask[:, :8]
    elif case == "grid_too_big":
        shapes[2] = torch.tensor([5, 4])
    elif case == "grid_zero":
        shapes[2] = torch.tensor([0, 4])
    elif case == "shapes_rows":
        shapes = shapes[:2]
    else:
        pixels = pixels[..., :-1]
    with pytest.raises(ValueError, match=argument), torch.no_grad():
        model(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes)
