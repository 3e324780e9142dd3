"""mmfast.patch on tiny random-weight Qwen3-VL models, beyond the drop-in differential set
(tests/integrations/test_dropin_differential.py runs the "qwen3_vl" case of hf_tiny through
forward, hidden states, attentions, gradients, generate and the weights lifecycle):
what is replaced, the DeepStack add, bad grids, and the Triton kernels (under the
interpreter on a CPU) at the head dims of the released vision tower (72) and of a
power-of-two one (64), in float32 and float16."""

from __future__ import annotations

import pytest
import torch

import mmfast
from tests.integrations.hf_tiny import qwen3_vl_config, qwen3_vl_inputs

transformers = pytest.importorskip("transformers")
modeling = pytest.importorskip("transformers.models.qwen3_vl.modeling_qwen3_vl")


def _model(attn="sdpa", seed=0, **overrides):
    torch.manual_seed(seed)
    return transformers.Qwen3VLForConditionalGeneration(qwen3_vl_config(attn, **overrides)).eval()


def _own_forwards(model):
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


def test_what_is_replaced_and_undo_restores_bit_for_bit():
    model, inputs = _model(), qwen3_vl_inputs()
    with torch.no_grad(), mmfast.set_backend("torch"):
        before = model(**inputs, output_hidden_states=True)
        handle = mmfast.patch(model)
        classes = {type(model.get_submodule(name)).__name__ for name, _ in handle.replaced}
        assert classes == {"Qwen3VLVisionModel", "Qwen3VLVisionAttention", "LayerNorm", "Qwen3VLVisionMLP",
                           "Qwen3VLVisionPatchMerger", "Qwen3VLTextRMSNorm", "Qwen3VLTextMLP", "Qwen3VLTextAttention",
                           "Qwen3VLTextModel"}
        # Every merger: the final one and one per DeepStack layer.
        mergers = [name for name, what in handle.replaced if what.startswith("merger")]
        assert mergers == ["model.visual.merger", "model.visual.deepstack_merger_list.0",
                           "model.visual.deepstack_merger_list.1"]
        got = model(**inputs, output_hidden_states=True)
        handle.undo()
        after = model(**inputs, output_hidden_states=True)
    assert _own_forwards(model) == [] and "_deepstack_process" not in model.model.language_model.__dict__
    torch.testing.assert_close(got.logits, before.logits, rtol=2e-5, atol=2e-5)
    assert torch.equal(after.logits, before.logits)
    for a, b in zip(after.hidden_states, before.hidden_states):
        assert torch.equal(a, b)


def test_the_vision_tower_alone_with_its_deepstack_features():
    """Qwen3VLVisionModel patched on its own: merged tokens, the last block's states and
    every DeepStack feature."""
    tower, inputs = _model().model.visual, qwen3_vl_inputs()
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    with torch.no_grad(), mmfast.set_backend("torch"):
        want = tower(pixels, grid_thw=grid)
        with mmfast.patch(tower) as handle:
            assert handle.family == "qwen3_vl"
            got = tower(pixels, grid_thw=grid)
    assert len(want.deepstack_features) == 2
    for g, w in zip([got.pooler_output, got.last_hidden_state, *got.deepstack_features],
                    [want.pooler_output, want.last_hidden_state, *want.deepstack_features]):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)


def test_deepstack_add_equals_hugging_face_bit_for_bit_with_gradients():
    from mmfast.integrations.transformers.qwen3_vl import _deepstack_process

    text = _model().model.language_model
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(3, 11, generator=gen) < 0.4
    mask[0, 0] = True  # a visual token at the very start
    results = []
    for fn in (modeling.Qwen3VLTextModel._deepstack_process, _deepstack_process):
        hidden = torch.randn(3, 11, 64, generator=torch.Generator().manual_seed(4), requires_grad=True)
        embeds = torch.randn(int(mask.sum()), 64, generator=torch.Generator().manual_seed(5), requires_grad=True)
        out = fn(text, hidden, mask, embeds)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(6)))
        results.append((out, hidden.grad, embeds.grad))
    for got, want in zip(results[1], results[0]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("where", ["model", "tower"])
def test_grids_that_do_not_match_the_pixels_name_the_arguments(where):
    model, inputs = _model(), qwen3_vl_inputs()
    mmfast.patch(model)
    wrong = inputs["image_grid_thw"].clone()
    wrong[1, 2] = 6  # 4x6 patches where the pixels hold 4x8
    with torch.no_grad(), pytest.raises(ValueError, match=r"grid_thw: describes 64 patches .* pixel_values"):
        if where == "model":
            model(**{**inputs, "image_grid_thw": wrong})
        else:
            model.model.visual(inputs["pixel_values"], grid_thw=wrong)
    with torch.no_grad(), pytest.raises(ValueError, match="grid_thw: h and w must be multiples"):
        model.model.visual(inputs["pixel_values"], grid_thw=torch.tensor([[1, 5, 4], [1, 4, 8], [1, 6, 4]]))


def _head_dim_config(head_dim: int) -> dict:
    """Two heads of ``head_dim`` in the vision tower and in the language model."""
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]  # t, h, w pairs of the text M-RoPE
    return {"vision": {"hidden_size": 2 * head_dim, "num_heads": 2, "intermediate_size": 96},
            "text": {"head_dim": head_dim, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                               "mrope_section": section, "mrope_interleaved": True}}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [72, 64])
def test_triton_kernels_under_the_interpreter(head_dim, dtype):
    """The whole model with every op on its Triton backend: logits and the vision tower's
    output within the project's rule (error against the float64 model at most about twice
    that of the unpatched model in the same dtype)."""
    model, inputs = _model(**_head_dim_config(head_dim)), qwen3_vl_inputs()
    exact_model = _model(**_head_dim_config(head_dim)).double()

    def run(model, dtype):
        given = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.no_grad():
            out = model(**given)
            # The tower's output for the second image (transformers 5.17's output has no
            # `image_outputs`; get_image_features is the same call in every supported release).
            tower = model.model.get_image_features(given["pixel_values"], given["image_grid_thw"])
        mask = inputs["attention_mask"][..., None]  # padded rows: mmfast leaves 0, sdpa what it computes
        return out.logits.double() * mask, tower.pooler_output[1].double()

    with mmfast.set_backend("torch"):
        exact = run(exact_model, torch.float64)
    model.to(dtype)
    want = run(model, dtype)
    with mmfast.patch(model), mmfast.set_backend("triton"):
        got = run(model, dtype)
    for g, w, e in zip(got, want, exact):
        err, err_hf = (g - e).abs().max(), (w - e).abs().max()
        assert err <= 2 * err_hf + 1e-5 * e.abs().max(), (err.item(), err_hf.item())
