"""mmfast's AutoencoderKL (diffusers' VAE with mmfast blocks swapped in) against diffusers'
own: tiny random VAEs of the SD1.5 kind (4 latent channels, quant convs) and the SD3 kind
(16 latent channels, shift factor, no quant convs) loaded key for key, encode and decode
compared in fp32, both memory formats, gradients through decode, save/load, and the
mid-block attention at SD's real width (one head of 512 channels, which dispatch gives to
SDPA, not the Triton kernel).

fp32 throughout: differences are summation order only. The Triton interpreter is slow, so
most comparisons run mmfast's blocks on their PyTorch backends (what is checked there is the
assembly; the kernels are checked op by op in tests/ops); one encode/decode and one
backward run every kernel.
"""

import pytest
import torch

import mmfast
from mmfast.nn import autoencoder_kl, use_mmfast_vae_blocks
from mmfast.nn.group_norm import GroupNorm
from mmfast.nn.spatial_attention import SpatialSelfAttention

diffusers = pytest.importorskip("diffusers")
TOL = {"rtol": 1e-4, "atol": 1e-5}
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-4}

KINDS = {
    "sd": dict(latent_channels=4, scaling_factor=0.18215),
    "sd3": dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False),
}


def _tiny_vae(kind: str):
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
        **KINDS[kind]).eval()


def _pair(kind: str):
    theirs = _tiny_vae(kind)
    ours = autoencoder_kl(theirs.config)
    ours.load_state_dict(theirs.state_dict())  # strict: same names, same shapes
    return ours.eval(), theirs


def _image(batch=2, size=16, channels_last=False):
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def test_blocks_are_swapped_and_names_kept():
    ours, theirs = _pair("sd")
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    kinds = {type(m).__module__ for m in ours.modules()
             if type(m).__name__ in ("ResnetBlock2D", "SpatialSelfAttention", "Attention")}
    assert kinds == {"mmfast.nn.resnet", "mmfast.nn.spatial_attention"}
    for coder in (ours.encoder, ours.decoder):
        assert isinstance(coder.conv_norm_out, GroupNorm) and coder.conv_norm_out.activation == "silu"
        assert isinstance(coder.conv_act, torch.nn.Identity)
    assert use_mmfast_vae_blocks(ours) == []  # a second call finds nothing left to swap


@pytest.mark.parametrize("kind,channels_last", [("sd", False), ("sd3", True)])
def test_encode_decode_match_diffusers(kind, channels_last):
    ours, theirs = _pair(kind)
    x = _image(channels_last=channels_last)
    z = torch.randn(2, KINDS[kind]["latent_channels"], 8, 8, generator=torch.Generator().manual_seed(2))
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), mmfast.set_backend("torch"):
        torch.testing.assert_close(ours.encode(x).latent_dist.parameters,
                                   theirs.encode(x).latent_dist.parameters, **TOL)
        torch.testing.assert_close(ours.decode(z).sample, theirs.decode(z).sample, **TOL)
        if channels_last:  # the swapped blocks keep the layout they are given
            mid = ours.decoder.mid_block(ours.decoder.conv_in(z))
            assert mid.is_contiguous(memory_format=torch.channels_last)


def test_triton_kernels_encode_decode():
    """Every block on its default backend (Triton GroupNorm and attention; under the
    interpreter on a CPU), one small image."""
    ours, theirs = _pair("sd")
    x = _image(batch=1)
    with torch.no_grad():
        posterior = ours.encode(x).latent_dist
        torch.testing.assert_close(posterior.parameters, theirs.encode(x).latent_dist.parameters, **TOL)
        torch.testing.assert_close(ours.decode(posterior.mean).sample, theirs.decode(posterior.mean).sample, **TOL)


def test_decode_gradients_match_diffusers():
    """Fine-tuning a decoder: gradients of the latents and of parameters in every swapped
    kind of block (ResNet norm and conv, mid-block attention, fused output norm), kernels
    on their default backends."""
    ours, theirs = _pair("sd")
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    names = ["decoder.up_blocks.0.resnets.0.norm1.weight", "decoder.up_blocks.1.resnets.1.conv2.weight",
             "decoder.mid_block.attentions.0.group_norm.weight", "decoder.mid_block.attentions.0.to_q.weight",
             "decoder.conv_norm_out.weight", "decoder.conv_norm_out.bias"]
    dy = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    grads = []
    for model in (ours, theirs):
        params = dict(model.named_parameters())
        latents = z.clone().requires_grad_()
        out = model.decode(latents).sample
        grads.append(torch.autograd.grad(out, [latents] + [params[n] for n in names], dy))
    for name, got, expected in zip(["latents"] + names, *grads):
        torch.testing.assert_close(got, expected, **GRAD_TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_sd_width_attention_routes_to_sdpa(monkeypatch):
    """SD's VAE: one head of 512 channels. The Triton kernel takes head dims up to 256, so
    dispatch hands the call on (to SDPA) and the result still matches diffusers."""
    from diffusers.models.attention_processor import Attention

    from mmfast.ops.attention import ATTENTION

    torch.manual_seed(0)
    theirs = Attention(512, heads=1, dim_head=512, norm_num_groups=32, eps=1e-6, residual_connection=True,
                       bias=True, upcast_softmax=True, _from_deprecated_attn_block=True).eval()
    ours = SpatialSelfAttention.like(theirs)
    ours.load_state_dict(theirs.state_dict())
    chosen = []
    select = ATTENTION.select

    def spy(call, backend=None):
        picked = select(call, backend)
        chosen.append(picked.name)
        return picked

    monkeypatch.setattr(ATTENTION, "select", spy)
    x = torch.randn(1, 512, 3, 5)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), **TOL)
    assert chosen == ["sdpa"]


def test_mid_block_compiles_without_graph_breaks():
    """The swapped ResNet blocks and attention trace whole under torch.compile (custom ops
    with fake impls; aot_eager on a CPU)."""
    ours, theirs = _pair("sd")
    mid = torch.compile(ours.decoder.mid_block, backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 32, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(mid(x), theirs.decoder.mid_block(x), **TOL)


def test_save_pretrained_loads_in_diffusers(tmp_path):
    ours, theirs = _pair("sd3")
    ours.save_pretrained(tmp_path, safe_serialization=True)
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path, local_files_only=True).eval()
    assert {type(m).__module__ for m in back.modules() if type(m).__name__ == "ResnetBlock2D"} == {
        "diffusers.models.resnet"}
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(back.decode(z).sample, theirs.decode(z).sample)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="activation"):
        GroupNorm(4, 16, activation="gelu")
    with pytest.raises(ValueError, match="heads"):
        SpatialSelfAttention(48, heads=5)
    theirs = _tiny_vae("sd")
    attn = SpatialSelfAttention.like(theirs.decoder.mid_block.attentions[0])
    x = torch.randn(1, 32, 2, 2)
    with pytest.raises(ValueError, match="attention_mask"):
        attn(x, attention_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="hidden_states"):
        attn(x.flatten(2))


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_sd15_sized_decode_in_low_precision(dtype, channels_last):
    """SD1.5's VAE (random weights) decoding 32 x 32 latents on the GPU kernels: mmfast's
    error against the float64 decode is at most 2x diffusers' own in the same dtype."""
    torch.manual_seed(0)
    config = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                  layers_per_block=2, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4)
    reference = diffusers.AutoencoderKL(**config).eval()
    ours = autoencoder_kl(reference.config)
    ours.load_state_dict(reference.state_dict())
    theirs = diffusers.AutoencoderKL(**config)
    theirs.load_state_dict(reference.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ours = ours.to("cuda", dtype, memory_format=fmt).eval()
    theirs = theirs.to("cuda", dtype, memory_format=fmt).eval()
    z = torch.randn(1, 4, 32, 32, device="cuda")
    with torch.no_grad():
        exact = reference.to("cuda", torch.float64).decode(z.double()).sample
        low = z.to(dtype).contiguous(memory_format=fmt)
        err_ours = (ours.decode(low).sample.double() - exact).abs().max().item()
        err_theirs = (theirs.decode(low).sample.double() - exact).abs().max().item()
    assert err_ours <= 2 * err_theirs, (err_ours, err_theirs)
