"""mmfast.patch on a tiny random diffusers AutoencoderKLWan: encode then decode, patched
vs unpatched (mmfast's torch backends, and the Triton kernel under the interpreter),
undo exact, state_dict unchanged; videos the VAE would crop are refused. Gradients,
load_state_dict(assign=True), meta builds, deepcopy and dtype moves are in
test_diffusers_differential.py (family "wan-vae")."""

import pytest
import torch

import mmfast
from tests.integrations.wan_models import tiny_wan_vae

pytest.importorskip("diffusers")

TOL = dict(rtol=1e-4, atol=1e-5)


def _video(frames=5, height=8, width=8):
    return torch.rand(1, 3, frames, height, width, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_encode_decode_patched_and_undone(backend):
    vae = tiny_wan_vae()
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    silu = vae.decoder.nonlinearity
    x = _video()

    def roundtrip():
        latents = vae.encode(x).latent_dist.mode()
        return latents, vae.decode(latents).sample

    with torch.no_grad(), mmfast.set_backend(backend):
        before = roundtrip()
        handle = mmfast.patch(vae)
        assert handle.family == "diffusers-autoencoder-kl-wan"
        names = dict(handle.replaced)
        assert {"encoder.down_blocks.0.norm1", "encoder.down_blocks.0.norm2", "encoder.norm_out",
                "decoder.norm_out", "decoder.mid_block.attentions.0.norm"} <= set(names), names
        assert isinstance(vae.decoder.nonlinearity, torch.nn.Identity)
        patched = roundtrip()
        handle.undo()
        after = roundtrip()
    for p, b in zip(patched, before):
        torch.testing.assert_close(p, b, **TOL)
    for a, b in zip(after, before):
        assert torch.equal(a, b)
    assert vae.decoder.nonlinearity is silu
    assert not any("forward" in vars(m) for m in vae.modules()) and "_encode" not in vars(vae)
    assert all(torch.equal(v, state[k]) for k, v in vae.state_dict().items())


@pytest.mark.parametrize("shape,match", [
    ((1, 3, 4, 8, 8), "x: 4 frames; AutoencoderKLWan encodes 1 \\+ 4k frames"),
    ((1, 3, 5, 7, 8), "x: height 7 and width 8 must be multiples of 2"),
    ((1, 3, 8, 8), r"x: expected a video \[B, C, T, H, W\]"),
])
def test_videos_the_vae_cannot_take(shape, match):
    vae = tiny_wan_vae()
    mmfast.patch(vae)
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        vae.encode(torch.randn(shape))


def test_gamma_of_another_dtype_runs_diffusers_norm():
    # diffusers promotes the output to gamma's dtype there; the patched norm does the same
    # by running diffusers' forward (and the SiLU it took over).
    vae = tiny_wan_vae()
    block = vae.decoder.up_blocks[0].resnets[0]
    x = torch.randn(1, block.in_dim, 2, 4, 4)
    block.norm1.gamma.data = block.norm1.gamma.data.double()
    with torch.no_grad():
        want = torch.nn.functional.silu(block.norm1(x))
        mmfast.patch(vae)
        got = block.nonlinearity(block.norm1(x))
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want)
