"""mmfast.nn diffusion blocks against tiny random diffusers modules: load the diffusers
state_dict (strict), compare outputs (and, for one block, gradients)."""

import pytest
import torch

import mmfast
from mmfast.nn import DiTBlock, MMDiTBlock, ResnetBlock2D, Transformer2DBlock, unet2d_condition_model
from mmfast.nn.unet import use_mmfast_blocks

diffusers = pytest.importorskip("diffusers")
HEADS, HEAD_DIM = 2, 32
TOL = {"rtol": 1e-4, "atol": 1e-5}  # fp32: summation order only


def _loaded(ours, theirs):
    ours.load_state_dict(theirs.state_dict())  # strict: same names, same shapes
    return ours.eval()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_resnet_block(channels_last):
    from diffusers.models.resnet import ResnetBlock2D as Reference

    torch.manual_seed(0)
    theirs = Reference(in_channels=32, out_channels=48, temb_channels=16, groups=4, eps=1e-6)
    ours = _loaded(ResnetBlock2D(in_channels=32, out_channels=48, temb_channels=16, groups=4, eps=1e-6), theirs)
    x = torch.randn(2, 32, 5, 7, requires_grad=True)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    temb = torch.randn(2, 16)
    expected = theirs(x, temb)
    got = ours(x, temb)
    torch.testing.assert_close(got, expected, **TOL)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    dy = torch.randn_like(got)
    grads_ours = torch.autograd.grad(got, [x, ours.norm1.weight, ours.conv1.weight], dy)
    grads_theirs = torch.autograd.grad(expected, [x, theirs.norm1.weight, theirs.conv1.weight], dy)
    for g, e in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_resnet_block_scale_shift():
    from diffusers.models.resnet import ResnetBlock2D as Reference

    torch.manual_seed(0)
    args = dict(in_channels=32, temb_channels=16, groups=2, time_embedding_norm="scale_shift")
    theirs = Reference(**args)
    ours = _loaded(ResnetBlock2D(**args), theirs)
    x, temb = torch.randn(1, 32, 4, 3), torch.randn(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, temb), theirs(x, temb), **TOL)


def test_transformer_2d_block():
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    theirs = BasicTransformerBlock(64, HEADS, HEAD_DIM, cross_attention_dim=24).eval()
    ours = _loaded(Transformer2DBlock(64, HEADS, HEAD_DIM, cross_attention_dim=24), theirs)
    x, text = torch.randn(2, 9, 64), torch.randn(2, 5, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, encoder_hidden_states=text),
                                   theirs(x, encoder_hidden_states=text), **TOL)


def test_dit_block():
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    theirs = BasicTransformerBlock(64, HEADS, HEAD_DIM, activation_fn="gelu-approximate", num_embeds_ada_norm=10,
                                   attention_bias=True, norm_type="ada_norm_zero",
                                   norm_elementwise_affine=False).eval()
    ours = _loaded(DiTBlock(64, HEADS, HEAD_DIM, num_embeds_ada_norm=10), theirs)
    x = torch.randn(2, 9, 64, requires_grad=True)
    t, labels = torch.tensor([5, 900]), torch.tensor([3, 10])  # 10: the "no class" row
    got, expected = ours(x, timestep=t, class_labels=labels), theirs(x, timestep=t, class_labels=labels)
    torch.testing.assert_close(got, expected, **TOL)
    # Training: gradients through adaLN, the gated residuals and attention.
    dy = torch.randn_like(got)
    grads = [torch.autograd.grad(out, [x, m.norm1.linear.weight, m.attn1.to_q.weight], dy)
             for out, m in ((got, ours), (expected, theirs))]
    for g, e in zip(*grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("context_pre_only", [False, True])
def test_mmdit_block(context_pre_only):
    from diffusers.models.attention import JointTransformerBlock

    torch.manual_seed(0)
    theirs = JointTransformerBlock(64, HEADS, HEAD_DIM, context_pre_only=context_pre_only).eval()
    ours = _loaded(MMDiTBlock(64, HEADS, HEAD_DIM, context_pre_only=context_pre_only), theirs)
    x, ctx, temb = torch.randn(2, 16, 64), torch.randn(2, 7, 64), torch.randn(2, 64)
    with torch.no_grad():
        got, expected = ours(x, ctx, temb), theirs(x, ctx, temb)
    torch.testing.assert_close(got[1], expected[1], **TOL)
    if context_pre_only:
        assert got[0] is None and expected[0] is None
    else:
        torch.testing.assert_close(got[0], expected[0], **TOL)


def test_unet2d_condition_model_loads_diffusers_weights():
    from tests.integrations.diffusers_models import tiny_unet, unet_inputs

    theirs = tiny_unet()
    ours = unet2d_condition_model(theirs.config)
    ours.load_state_dict(theirs.state_dict())
    ours.eval()
    kinds = {type(m).__module__ for m in ours.modules() if type(m).__name__ in ("ResnetBlock2D", "Transformer2DBlock")}
    assert kinds == {"mmfast.nn.resnet", "mmfast.nn.transformer_2d"}
    assert ours.conv_norm_out.activation == "silu" and isinstance(ours.conv_act, torch.nn.Identity)
    assert use_mmfast_blocks(ours) == []  # its own blocks are not swapped again
    inputs = unet_inputs(batch=2)
    # The kernels are checked op by op elsewhere; here the assembly is, on the reference backends.
    with torch.no_grad(), mmfast.set_backend("torch"):
        torch.testing.assert_close(ours(**inputs).sample, theirs(**inputs).sample, **TOL)


def test_attention_mask_must_be_key_padding():
    block = Transformer2DBlock(64, HEADS, HEAD_DIM, cross_attention_dim=24)
    with pytest.raises(ValueError, match="attention_mask: expected key padding"):
        block.attn2(torch.randn(2, 9, 64), torch.randn(2, 5, 24), attention_mask=torch.randn(2, 9, 5))
