"""The mmfast attention processors against diffusers' AttnProcessor2_0 and
JointAttnProcessor2_0 on tiny random Attention modules: self, cross, key padding (additive
and boolean), 4-d inputs with group norm and residual, joint attention; fallbacks."""

import pytest
import torch

from mmfast.integrations.diffusers.attention_processors import AttnProcessor, JointAttnProcessor

attention_processor = pytest.importorskip("diffusers.models.attention_processor")
HEADS, HEAD_DIM = 2, 32


def _both(attn, reference, mine, *args, **kwargs):
    torch.manual_seed(0)
    with torch.no_grad():
        expected = reference(attn, *args, **kwargs)
        got = mine(attn, *args, **kwargs)
    if isinstance(expected, tuple):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def _cross_attention(**kwargs):
    torch.manual_seed(0)
    return attention_processor.Attention(query_dim=48, cross_attention_dim=24, heads=HEADS, dim_head=HEAD_DIM,
                                         **kwargs).eval()


def test_self_and_cross_attention():
    attn = _cross_attention()
    x, text = torch.randn(2, 9, 48), torch.randn(2, 5, 24)
    reference = attention_processor.AttnProcessor2_0()
    _both(attn, reference, AttnProcessor(), x, text)
    self_attn = attention_processor.Attention(query_dim=48, heads=HEADS, dim_head=HEAD_DIM).eval()
    _both(self_attn, reference, AttnProcessor(), x)


@pytest.mark.parametrize("kind", ["additive", "boolean"])
def test_key_padding_masks(kind):
    attn = _cross_attention()
    x, text = torch.randn(2, 9, 48), torch.randn(2, 5, 24)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = keep if kind == "boolean" else ((~keep).float() * -10000.0)[:, None, :]  # as the UNet makes it
    _both(attn, attention_processor.AttnProcessor2_0(), AttnProcessor(), x, text, attention_mask=mask)


def test_other_masks_fall_back_to_diffusers():
    attn = _cross_attention()
    x, text = torch.randn(2, 9, 48), torch.randn(2, 5, 24)
    soft = torch.randn(2, 1, 5)  # a bias, not padding
    _both(attn, attention_processor.AttnProcessor2_0(), AttnProcessor(), x, text, attention_mask=soft)
    nothing_kept = torch.zeros(2, 5, dtype=torch.bool)
    nothing_kept[1] = True
    _both(attn, attention_processor.AttnProcessor2_0(), AttnProcessor(), x, text, attention_mask=nothing_kept)


def test_spatial_input_with_group_norm_and_residual():
    # The VAE's mid-block attention: 4-d input, GroupNorm first, residual, rescale.
    torch.manual_seed(0)
    attn = attention_processor.Attention(query_dim=32, heads=1, dim_head=32, norm_num_groups=4,
                                         residual_connection=True, rescale_output_factor=2.0, bias=True).eval()
    x = torch.randn(2, 32, 3, 5)
    _both(attn, attention_processor.AttnProcessor2_0(), AttnProcessor(), x)


@pytest.mark.parametrize("context_pre_only", [False, True])
def test_joint_attention(context_pre_only):
    torch.manual_seed(0)
    attn = attention_processor.Attention(query_dim=64, added_kv_proj_dim=64, dim_head=HEAD_DIM, heads=HEADS,
                                         out_dim=64, context_pre_only=context_pre_only, bias=True).eval()
    x, ctx = torch.randn(2, 16, 64), torch.randn(2, 7, 64)
    _both(attn, attention_processor.JointAttnProcessor2_0(), JointAttnProcessor(), x, ctx)
    with pytest.raises(ValueError, match="attention_mask"):
        JointAttnProcessor()(attn, x, ctx, attention_mask=torch.ones(2, 23))
