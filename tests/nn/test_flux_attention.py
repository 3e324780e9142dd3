"""The pieces of mmfast.nn.flux_attention against diffusers' own functions: the
interleaved FLUX rotary folded into the attention kernel's half layout, and the
single-stream output projection run as two accumulating GEMMs."""

import pytest
import torch
import torch.nn.functional as F

from mmfast.nn.flux_attention import half_tables, pairs_to_halves, split_linear
from mmfast.ops.attention import attention

diffusers = pytest.importorskip("diffusers")


def _flux_tables(ids, axes):
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    return FluxPosEmbed(theta=10000, axes_dim=list(axes))(ids)


def _ids(tokens, axes, seed):
    return torch.randint(0, 40, (tokens, axes), generator=torch.Generator().manual_seed(seed)).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_in_the_kernel_equals_diffusers_interleaved_rotary(dtype):
    from diffusers.models.embeddings import apply_rotary_emb

    gen = torch.Generator().manual_seed(0)
    text, image, heads, dim = 5, 11, 2, 32
    q_text, q_image, k_text, k_image, v = (torch.randn(2, t, heads, dim, generator=gen).to(dtype)
                                           for t in (text, image, text, image, text + image))
    cos, sin = _flux_tables(_ids(text + image, 3, 1), (8, 12, 12))
    q, k = torch.cat([q_text, q_image], 1), torch.cat([k_text, k_image], 1)
    want = F.scaled_dot_product_attention(
        *(apply_rotary_emb(t, (cos, sin), sequence_dim=1).double().transpose(1, 2) for t in (q, k)),
        v.double().transpose(1, 2)).transpose(1, 2)
    eager = F.scaled_dot_product_attention(
        *(apply_rotary_emb(t, (cos, sin), sequence_dim=1).transpose(1, 2) for t in (q, k)),
        v.transpose(1, 2)).transpose(1, 2)
    got = attention(pairs_to_halves([q_text, q_image]), pairs_to_halves([k_text, k_image]), v,
                    rotary=half_tables((cos, sin), text + image, dim))  # Triton, rotating on load
    err, err_eager = (got.double() - want).abs().max(), (eager.double() - want).abs().max()
    assert err <= 2 * err_eager + 1e-6, (err, err_eager)


def test_pairs_to_halves_moves_each_pair():
    x = torch.arange(2 * 3 * 1 * 8.0).view(2, 3, 1, 8)
    out = pairs_to_halves([x[:, :1], x[:, 1:]])
    assert torch.equal(out[..., :4], x[..., 0::2]) and torch.equal(out[..., 4:], x[..., 1::2])


def test_tables_of_the_wrong_width_or_length_name_the_argument():
    cos, sin = _flux_tables(_ids(9, 3, 2), (8, 8, 8))  # 24 wide, for a head dim of 32
    with pytest.raises(ValueError, match=r"image_rotary_emb: .*\(9, 24\).*axes_dims_rope.*32"):
        half_tables((cos, sin), 9, 32)
    with pytest.raises(ValueError, match=r"image_rotary_emb: expected cos and sin of shape \[T, D\] = \(8, 24\)"):
        half_tables((cos, sin), 8, 24)
    with pytest.raises(ValueError, match="image_rotary_emb: expected a pair"):
        half_tables(cos, 9, 24)


@pytest.mark.parametrize("bias", [True, False])
def test_split_linear_equals_the_linear_of_the_concatenation(bias):
    gen = torch.Generator().manual_seed(3)
    linear = torch.nn.Linear(24 + 40, 16, bias=bias)
    first = torch.randn(2, 7, 24, generator=gen, requires_grad=True)
    second = torch.randn(2, 7, 40, generator=gen, requires_grad=True)
    weights = torch.randn(2, 7, 16, generator=gen)
    want = linear(torch.cat([first, second], -1))
    grads_want = torch.autograd.grad((want * weights).sum(), [first, second, *linear.parameters()])
    got = split_linear(linear, first, second)
    grads_got = torch.autograd.grad((got * weights).sum(), [first, second, *linear.parameters()])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
