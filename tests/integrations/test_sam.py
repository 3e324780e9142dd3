"""SAM's image encoder patched vs unpatched, on tiny random-weight transformers models
(head dim 64, windows padded as SAM pads 64 -> 70, a global layer): outputs, hidden
states, gradients of every parameter and of the pixels, in float32 with the torch
backend and with the Triton kernels (under the interpreter on CPU); undo() exact;
attention weights asked for fall back to Hugging Face; a wrong image size names
pixel_values. SAM-HQ (whose image encoder is the same code) is patched by the same table."""

import copy

import pytest
import torch

import mmfast
from tests.integrations.hf_tiny import torch_backend_on_one_thread  # noqa: F401 (autouse)

transformers = pytest.importorskip("transformers")

# 8 x 8 patch grid, windows of 3: padded to 9 x 9 (as 64 -> 70 at 1024 px), 9 windows;
# layer 1 global. Head dim 64 (SAM's, all sizes).
VISION = dict(hidden_size=128, num_attention_heads=2, num_hidden_layers=2, mlp_dim=192, output_channels=16,
              image_size=128, patch_size=16, window_size=3, global_attn_indexes=[1], num_pos_feats=8)


def _randomise(model):
    # SAM initialises its relative-position tables and absolute positions to zeros: give
    # them values, or the bias under test would be 0.
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name or name.endswith("pos_embed"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _vision_model(attn="sdpa", hq=False, **overrides):
    torch.manual_seed(0)
    config_class, model_class = ((transformers.SamHQVisionConfig, transformers.SamHQVisionModel) if hq
                                 else (transformers.SamVisionConfig, transformers.SamVisionModel))
    config = config_class(**{**VISION, **overrides}, attn_implementation=attn)
    return _randomise(model_class(config)).eval()


def _sam_model(attn="sdpa"):
    torch.manual_seed(0)
    width = VISION["output_channels"]
    prompt = dict(hidden_size=width, image_size=VISION["image_size"], patch_size=VISION["patch_size"],
                  image_embedding_size=VISION["image_size"] // VISION["patch_size"], mask_input_channels=4)
    decoder = dict(hidden_size=width, mlp_dim=32, num_attention_heads=2, iou_head_hidden_dim=16)
    config = transformers.SamConfig(vision_config={**VISION}, prompt_encoder_config=prompt,
                                    mask_decoder_config=decoder, attn_implementation=attn)
    return _randomise(transformers.SamModel(config)).eval()


def _pixels(batch=2):
    return torch.randn(batch, 3, VISION["image_size"], VISION["image_size"], generator=torch.Generator().manual_seed(7))


def _outputs(model, pixels):
    out = model(pixel_values=pixels, output_hidden_states=True)
    return (out.last_hidden_state, *out.hidden_states)


@pytest.mark.parametrize("attn,hq", [("sdpa", False), ("eager", False), ("sdpa", True)],
                         ids=["sdpa", "eager", "sam-hq"])
def test_vision_model_outputs_and_hidden_states(attn, hq):
    model = _vision_model(attn, hq)
    pixels = _pixels()
    with torch.no_grad():
        before = _outputs(model, pixels)
        handle = mmfast.patch(model)
        assert handle.family == "sam"
        replaced = dict(handle.replaced)
        assert "vision_encoder.layers.0.attn" in replaced and "vision_encoder.layers.1.attn" in replaced
        assert "vision_encoder.patch_embed" in replaced
        got = _outputs(model, pixels)
        handle.undo()
        after = _outputs(model, pixels)
    assert len(got) == len(before) == VISION["num_hidden_layers"] + 2
    for g, b, a in zip(got, before, after):
        torch.testing.assert_close(g, b, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # undo() exact
    assert not any("forward" in m.__dict__ for m in model.modules())


def _grads(model, pixels, patched, backend):
    model.zero_grad()
    pixels = pixels.clone().requires_grad_()
    handle = mmfast.patch(model) if patched else None
    try:
        with mmfast.set_backend(backend, op="attention_rel_pos"):
            out = model(pixel_values=pixels).last_hidden_state
        out.square().mean().backward()
    finally:
        if handle is not None:
            handle.undo()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), pixels.grad, grads


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_match(backend):
    # Training mode (dropout is 0 in SAM's configs); every parameter's gradient, the
    # relative-position tables' included, and the pixels'.
    model = _vision_model().train()
    pixels = _pixels()
    out, dpix, grads = _grads(model, pixels, True, backend)
    out_ref, dpix_ref, grads_ref = _grads(model, pixels, False, "torch")
    torch.testing.assert_close(out, out_ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(dpix, dpix_ref, rtol=1e-4, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    assert any("rel_pos_h" in n for n in grads) and any("rel_pos_w" in n for n in grads)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_triton_backend_runs_the_fused_kernel(monkeypatch):
    # The triton backend is the one taken (not a silent fallback), here under the
    # interpreter: outputs equal to Hugging Face's.
    import sys

    function = sys.modules["mmfast.ops.attention_rel_pos"].AttentionRelPosFunction
    calls = []
    original = function.apply
    monkeypatch.setattr(function, "apply", lambda *a: calls.append(a[0].shape) or original(*a))
    model = _vision_model()
    pixels = _pixels(1)
    with torch.no_grad():
        want = model(pixel_values=pixels).last_hidden_state
        with mmfast.patch(model), mmfast.set_backend("triton", op="attention_rel_pos"):
            got = model(pixel_values=pixels).last_hidden_state
    # Layer 0: 9 windows of 3 x 3; layer 1: global over 8 x 8.
    assert calls == [torch.Size([9, 9, 2, 64]), torch.Size([1, 64, 2, 64])]
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_sam_model_image_embeddings_and_masks():
    model = _sam_model()
    pixels = _pixels(1)
    points = torch.tensor([[[[40.0, 60.0]]]])
    with torch.no_grad():
        before = model(pixel_values=pixels, input_points=points)
        embeddings_before = model.get_image_embeddings(pixels)
        with mmfast.patch(model) as handle:
            assert handle.family == "sam"
            assert any(name.startswith("vision_encoder.layers.") for name, _ in handle.replaced)
            got = model(pixel_values=pixels, input_points=points)
            embeddings = model.get_image_embeddings(pixels)
    torch.testing.assert_close(embeddings, embeddings_before, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got.pred_masks, before.pred_masks, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got.iou_scores, before.iou_scores, rtol=2e-5, atol=2e-5)


def test_attention_weights_fall_back_to_hugging_face():
    model = _vision_model("eager")
    pixels = _pixels(1)
    with torch.no_grad():
        want = model(pixel_values=pixels, output_attentions=True)
        with mmfast.patch(model):
            got = model(pixel_values=pixels, output_attentions=True)
    assert len(got.attentions) == VISION["num_hidden_layers"]
    for g, w in zip(got.attentions, want.attentions):
        assert g is not None
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0, atol=0)


def test_no_relative_positions_uses_plain_attention():
    model = _vision_model(use_rel_pos=False)
    pixels = _pixels(1)
    with torch.no_grad():
        want = model(pixel_values=pixels).last_hidden_state
        with mmfast.patch(model):
            got = model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_deepcopy_and_state_dict_round_trip():
    model = _vision_model()
    pixels = _pixels(1)
    with torch.no_grad():
        want = model(pixel_values=pixels).last_hidden_state
        handle = mmfast.patch(model)
        state = model.state_dict()
        twin = copy.deepcopy(model)
        twin.load_state_dict(state, assign=True)
        torch.testing.assert_close(twin(pixel_values=pixels).last_hidden_state, want, rtol=2e-5, atol=2e-5)
        twin._mmfast_patch_handle.undo()
        assert not any("forward" in m.__dict__ for m in twin.modules())
        handle.undo()
    assert state.keys() == model.state_dict().keys()


@pytest.mark.parametrize("shape", [(1, 3, 96, 128), (1, 3, 128, 112), (1, 1, 128, 128)], ids=["h96", "w112", "c1"])
def test_wrong_image_size_names_pixel_values(shape):
    model = _vision_model()
    with mmfast.patch(model), pytest.raises(ValueError, match=r"pixel_values: expected \[batch, 3, 128, 128\]"):
        model(pixel_values=torch.randn(shape))


def test_patched_model_compiles_without_graph_breaks():
    # fullgraph=True through the patched attention (the custom ops' fakes, HF's get_rel_pos
    # and the output-capture check); aot_eager: no C++ build on a CPU.
    model = _vision_model()
    pixels = _pixels(1)
    with torch.no_grad():
        want = model(pixel_values=pixels).last_hidden_state
        with mmfast.patch(model), mmfast.set_backend("triton", op="attention_rel_pos"):
            got = torch.compile(model, backend="aot_eager", fullgraph=True)(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
