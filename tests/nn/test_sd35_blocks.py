"""SD3.5's MM-DiT blocks (RMSNorm q/k norms, dual attention) on mmfast: mmfast.nn.MMDiTBlock
loads diffusers' JointTransformerBlock key for key, and sd3_transformer_model's swapped
SD3Transformer2DModel equals diffusers' in fp32, outputs and gradients (mmfast's torch
backends here; tests/models/test_sd35.py runs the Triton kernels)."""

import pytest
import torch

import mmfast
from mmfast.nn import MMDiTBlock, sd3_transformer_model

pytest.importorskip("diffusers")

TOL = {"rtol": 1e-4, "atol": 1e-5}  # fp32: summation order only


def randomise_norm_weights(model, seed=0):
    """q/k RMSNorm weights start at ones: make them matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm_" in name and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return model


def tiny_sd35(head_dim=8, heads=2, dual_attention_layers=(0,)):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=24, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=16, pos_embed_max_size=16, qk_norm="rms_norm",
        dual_attention_layers=dual_attention_layers)
    return randomise_norm_weights(model).eval()


def _inputs(batch=2, text_tokens=7):
    gen = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(batch, 4, 8, 8, generator=gen),
            "encoder_hidden_states": torch.randn(batch, text_tokens, 24, generator=gen),
            "pooled_projections": torch.randn(batch, 16, generator=gen),
            "timestep": torch.tensor([3.0, 700.0][:batch])}


@pytest.fixture
def torch_backends():
    with mmfast.set_backend("torch"):
        yield


@pytest.mark.parametrize("dual, context_pre_only", [(True, False), (False, True)])
def test_mmdit_block_loads_diffusers_sd35_block(dual, context_pre_only, torch_backends):
    from diffusers.models.attention import JointTransformerBlock

    torch.manual_seed(0)
    theirs = randomise_norm_weights(JointTransformerBlock(
        32, 2, 16, context_pre_only=context_pre_only, qk_norm="rms_norm", use_dual_attention=dual)).eval()
    ours = MMDiTBlock(32, 2, 16, context_pre_only=context_pre_only, qk_norm="rms_norm", use_dual_attention=dual)
    ours.load_state_dict(theirs.state_dict())  # strict: the same names and shapes
    x, ctx, temb = torch.randn(2, 9, 32), torch.randn(2, 5, 32), torch.randn(2, 32)
    with torch.no_grad():
        got, expected = ours(x, ctx, temb), theirs(x, ctx, temb)
    torch.testing.assert_close(got[1], expected[1], **TOL)
    if context_pre_only:
        assert got[0] is None and expected[0] is None
    else:
        torch.testing.assert_close(got[0], expected[0], **TOL)


def _check_swapped_against_diffusers(theirs, batch=2):
    ours = sd3_transformer_model(theirs.config)
    ours.load_state_dict(theirs.state_dict())
    ours.eval()
    assert all(type(b) is MMDiTBlock for b in ours.transformer_blocks)
    assert ours.transformer_blocks[0].use_dual_attention and not ours.transformer_blocks[1].use_dual_attention
    assert type(ours.transformer_blocks[0].attn2.norm_q).__module__ == "mmfast.nn.norm"

    inputs = _inputs(batch)
    x = inputs.pop("hidden_states").requires_grad_()
    got, expected = ours(x, **inputs).sample, theirs(x, **inputs).sample
    torch.testing.assert_close(got, expected, **TOL)
    # Training: through the q/k norms, attn2, both modulations and the gated residuals.
    names = ["transformer_blocks.0.norm1.linear.weight", "transformer_blocks.0.attn2.to_q.weight",
             "transformer_blocks.0.attn2.norm_k.weight", "transformer_blocks.0.attn.norm_added_q.weight",
             "transformer_blocks.1.attn.norm_q.weight", "transformer_blocks.1.attn.add_k_proj.weight"]
    dy = torch.randn_like(got)
    grads = [torch.autograd.grad(out, [x, *(dict(m.named_parameters())[n] for n in names)], dy)
             for out, m in ((got, ours), (expected, theirs))]
    for g, e in zip(*grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_swapped_sd35_transformer_matches_diffusers_with_gradients(torch_backends):
    """Block 0 dual attention, block 1 context_pre_only, every attention q/k-normed."""
    _check_swapped_against_diffusers(tiny_sd35())


def test_swapped_sd35_transformer_on_triton():
    """The same on the Triton kernels (interpreted on a CPU): 32-wide heads, which Triton's
    attention takes, forward and backward."""
    from mmfast.profile.measure import record_backends

    ran = set()
    with record_backends(ran):
        _check_swapped_against_diffusers(tiny_sd35(head_dim=32, heads=1), batch=1)
    assert {op for op, _ in ran} >= {"attention", "norm", "adaln"}, ran
    assert all(backend.startswith("triton") for _, backend in ran), ran


def test_unsupported_qk_norm_is_refused():
    with pytest.raises(ValueError, match="qk_norm: expected None or 'rms_norm', got 'layer_norm'"):
        MMDiTBlock(32, 2, 16, qk_norm="layer_norm")


@pytest.mark.gpu
def test_swapped_sd35_transformer_bf16_on_gpu():
    """bf16 on CUDA (64-wide heads, as SD3.5's), output and input gradient, by the
    flash-attention rule: mmfast's error from the float64 model at most twice diffusers'
    own bf16 error, plus one bf16 spacing of the largest value."""
    import copy

    theirs = tiny_sd35(head_dim=64, heads=2).cuda()
    ours = sd3_transformer_model(theirs.config)
    ours.load_state_dict(theirs.state_dict())
    ours.cuda().eval()
    inputs = {k: v.cuda() for k, v in _inputs().items()}
    dy = torch.randn(2, 4, 8, 8, device="cuda")

    def run(model, dtype):
        model = copy.deepcopy(model).to(dtype)
        x = inputs["hidden_states"].to(dtype).requires_grad_()
        rest = {k: v.to(dtype) for k, v in inputs.items() if k != "hidden_states"}
        out = model(x, **rest).sample
        (grad,) = torch.autograd.grad(out, x, dy.to(dtype))
        return out.double(), grad.double()

    exact, eager, got = run(theirs, torch.float64), run(theirs, torch.bfloat16), run(ours, torch.bfloat16)
    for what, e, r, g in zip(("output", "grad"), exact, eager, got):
        floor = 2 ** -8 * e.abs().max().item()
        assert (g - e).abs().max().item() <= 2 * (r - e).abs().max().item() + floor, what
