"""mmfast.patch on tiny random diffusers Wan models (WanTransformer3DModel: T2V, I2V, TI2V
per-token timesteps, fused projections; a WanPipeline end to end): patched vs unpatched on
the same instance, undo exact, state_dict unchanged; the Triton kernels under the
interpreter (fp32, fp16); mixed frame counts and sizes; bad rotary tables. Gradients,
load_state_dict(assign=True), meta builds, deepcopy and dtype moves are in
test_diffusers_differential.py (families "wan-transformer", "wan-i2v-transformer")."""

import pytest
import torch

import mmfast
from tests.integrations.wan_models import (
    TEXT_DIM, tiny_wan, tiny_wan_i2v, tiny_wan_pipeline, wan_inputs)

pytest.importorskip("diffusers")

# fp32 everywhere: patched and unpatched differ by summation order only.
TOL = dict(rtol=1e-4, atol=1e-5)


def _processors(model):
    return {name: m.processor for name, m in model.named_modules() if type(m).__name__ == "WanAttention"}


def _check_patch_and_undo(model, inputs, backend="torch"):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    processors = _processors(model)
    with torch.no_grad(), mmfast.set_backend(backend):
        before = model(**inputs).sample
        handle = mmfast.patch(model)
        assert handle.family == "diffusers-wan-transformer"
        assert {type(p).__name__ for p in _processors(model).values()} == {"FusedWanAttnProcessor"}
        patched = model(**inputs).sample
        replaced = dict(handle.replaced)
        handle.undo()
        after = model(**inputs).sample
    torch.testing.assert_close(patched, before, **TOL)
    assert torch.equal(after, before)
    assert all(_processors(model)[n] is p for n, p in processors.items())
    assert not any("forward" in vars(m) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    return replaced


def test_t2v_transformer_patch_and_undo():
    names = _check_patch_and_undo(tiny_wan(), wan_inputs())
    assert {"blocks.0", "blocks.1.attn1", "blocks.1.attn2", "blocks.0.ffn.net.0"} <= set(names)
    # torch's nn.GELU of the text projection (no ``proj``) is not diffusers' GELU: left alone.
    assert "condition_embedder.text_embedder.act_1" not in names


def test_i2v_transformer_with_its_image_context_branch():
    # diffusers splits the context as (image tokens, the last 512 text tokens).
    model = tiny_wan_i2v()
    names = _check_patch_and_undo(model, wan_inputs(batch=1, frames=2, text_tokens=512, image_tokens=5))
    assert "condition_embedder.image_embedder.ff.net.0" in names


def test_ti2v_per_token_timesteps():
    # Wan 2.2 TI2V: timestep [B, T], one modulation per token, on the fused block too.
    inputs = wan_inputs(batch=2, frames=2, height=4, width=4)
    inputs["timestep"] = torch.linspace(1.0, 900.0, 2 * 8).reshape(2, 8)
    names = _check_patch_and_undo(tiny_wan(), inputs)
    assert "blocks.0" in names and "blocks.1" in names


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ti2v_per_token_modulation_outputs_and_gradients(backend):
    """The fused block with temb [B, T, 6, C] (every token its own modulation row) against
    diffusers' block: output and the gradients of the hidden states, the per-token timestep
    embedding, the modulation table and the weights (fp32; triton under the interpreter)."""
    import copy

    from mmfast.nn.wan_transformer import wan_block_forward

    model = tiny_wan()
    inputs = wan_inputs(batch=2, frames=3, height=2, width=4, seed=5)
    inputs["timestep"] = torch.linspace(1.0, 900.0, 2 * 6).reshape(2, 6)  # 3 frames x 1 x 2 tokens each
    captured = {}

    def grab(module, args, kwargs):
        captured.update(zip(("hidden_states", "encoder_hidden_states", "temb", "rotary_emb"), args))

    hook = model.blocks[1].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    assert captured["temb"].shape == (2, 6, 6, 64)  # [B, T, 6, C]: per token
    block = model.blocks[1]
    twin = copy.deepcopy(block)

    def run(forward, module):
        leaves = {k: captured[k].detach().clone().requires_grad_() for k in ("hidden_states", "temb")}
        out = forward(module, leaves["hidden_states"], captured["encoder_hidden_states"], leaves["temb"],
                      captured["rotary_emb"])
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        (out * weight).sum().backward()
        grads = {k: v.grad for k, v in leaves.items()}
        grads.update({n: p.grad for n, p in module.named_parameters()})
        return out.detach(), grads

    want, want_grads = run(type(block).forward, block)
    with mmfast.set_backend(backend):
        got, got_grads = run(wan_block_forward, twin)
    torch.testing.assert_close(got, want, **TOL)
    assert want_grads.keys() == got_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_per_token_modulation_must_match_the_tokens():
    from mmfast.nn.wan_transformer import wan_block_forward

    model = tiny_wan()
    block = model.blocks[0]
    hidden = torch.randn(1, 6, 64)
    with pytest.raises(ValueError, match=r"temb: per-token modulation \[B, T, 6, C\] must match"):
        wan_block_forward(block, hidden, torch.randn(1, 3, 16), torch.randn(1, 5, 6, 64), None)


def test_fused_projections():
    model = tiny_wan_i2v()
    model.fuse_qkv_projections()
    assert model.blocks[0].attn1.fused_projections
    _check_patch_and_undo(model, wan_inputs(batch=1, frames=2, text_tokens=512, image_tokens=3))


def test_cross_attention_without_norm():
    _check_patch_and_undo(tiny_wan(cross_attn_norm=False), wan_inputs(batch=1))


def test_mixed_frame_counts_and_sizes_on_one_patched_instance():
    model = tiny_wan()
    shapes = [(1, 2, 2), (5, 4, 6), (2, 10, 4), (3, 8, 8)]  # frames, height, width (latent)
    with torch.no_grad(), mmfast.set_backend("torch"):
        want = [model(**wan_inputs(batch=1, frames=f, height=h, width=w, seed=f)).sample for f, h, w in shapes]
        with mmfast.patch(model):
            got = [model(**wan_inputs(batch=1, frames=f, height=h, width=w, seed=f)).sample for f, h, w in shapes]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernels_against_diffusers(dtype):
    """The Triton kernels (under the interpreter on CPU): the flash-attention rule against
    the unpatched model in float64, the unpatched model in ``dtype`` as the yardstick."""
    if dtype == torch.float16 and not torch.cuda.is_available():
        try:  # diffusers' fp16 Conv3d on this CPU build
            torch.nn.functional.conv3d(torch.ones(1, 1, 1, 1, 1, dtype=dtype), torch.ones(1, 1, 1, 1, 1, dtype=dtype))
        except RuntimeError as e:
            pytest.skip(f"fp16 Conv3d on CPU: {e}")
    model = tiny_wan()
    inputs = wan_inputs(batch=1, frames=2, height=4, width=6)

    def run(dt):
        model.to(dt)
        cast = {k: v.to(dt) if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.no_grad():
            return model(**cast).sample.double()

    exact, eager = run(torch.float64), run(dtype)
    with mmfast.patch(model), mmfast.set_backend("triton"):
        got = run(dtype)
    err, err_eager = (got - exact).abs().max().item(), (eager - exact).abs().max().item()
    assert err <= 2 * err_eager + 1e-5 * exact.abs().max().item(), f"{err:.3e} vs eager {err_eager:.3e}"


def test_custom_processor_is_left_alone_and_masks_run_diffusers():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    class Custom(WanAttnProcessor):
        pass

    model = tiny_wan()
    custom = Custom()
    model.blocks[0].attn2.set_processor(custom)
    handle = mmfast.patch(model)
    assert model.blocks[0].attn2.processor is custom
    attn = model.blocks[1].attn2
    x, ctx = torch.randn(2, 6, 64), torch.randn(2, 5, 64)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])[:, None, None, :]
    with torch.no_grad():
        got = attn(x, ctx, mask)
        handle.undo()
        want = attn(x, ctx, mask)
    torch.testing.assert_close(got, want, **TOL)


def test_rotary_axes_that_do_not_sum_to_the_head_dim():
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    model = tiny_wan()
    model.rope = WanRotaryPosEmbed(24, (1, 2, 2), 32)  # tables for head dim 24; the heads are 32 wide
    mmfast.patch(model)
    match = "rotary_emb: freqs_cos: .* sum to 24, expected the head dim 32"
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        model(**wan_inputs(batch=1))


def test_rotary_tables_for_other_tokens():
    model = tiny_wan()
    mmfast.patch(model)
    attn = model.blocks[0].attn1
    tables = model.rope(torch.zeros(1, 4, 2, 4, 4))  # 8 tokens
    with torch.no_grad(), pytest.raises(ValueError, match=r"rotary_emb: freqs_cos: expected \[1 or B, T, 1, D\]"):
        attn(torch.randn(1, 9, 64), None, None, tables)


def test_i2v_attention_without_context():
    model = tiny_wan_i2v()
    mmfast.patch(model)
    with torch.no_grad(), pytest.raises(ValueError, match="encoder_hidden_states"):
        model.blocks[0].attn2(torch.randn(1, 4, 64))


def test_pipeline_generates_the_same_video():
    pipe = tiny_wan_pipeline()
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 7, TEXT_DIM, generator=gen)
    negative = torch.randn(1, 7, TEXT_DIM, generator=gen)

    def generate():
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, height=16, width=16, num_frames=5,
                    num_inference_steps=2, guidance_scale=4.0, generator=torch.Generator().manual_seed(3),
                    output_type="pt").frames

    with mmfast.set_backend("torch"):
        want = generate()
        handle = mmfast.patch(pipe)
        assert handle.family == "diffusers-pipeline"
        assert "blocks.0.attn1" in dict(handle.replaced)
        got = generate()
        handle.undo()
        again = generate()
    assert want.shape == (1, 5, 3, 16, 16)
    torch.testing.assert_close(got, want, **TOL)
    assert torch.equal(again, want)
