"""Wan 2.1's video VAE decoding a 480p clip (diffusers ``AutoencoderKLWan``, random
weights, inference): the last stage of a Wan text-to-video call. The decoder runs one
latent frame per call of its causal 3D convolutions (the temporal cache holds the rest),
up to 96 channels at 480 x 832.

Cases (GPU; latents 16 x T x 60 x 104, batch 1)
  wan2.1-vae-480p-9f-float32     T = 3 -> 9 frames: the evidence run's headline (the
                                 per-frame work is the same from the second latent frame
                                 on, so it stands for longer clips at a third of the time)
  wan2.1-vae-480p-9f-bfloat16
  wan2.1-vae-480p-33f-float32    T = 9 -> 33 frames, the clip of wan_transformer_step
  wan2.1-vae-480p-33f-bfloat16
  float32 is how diffusers' Wan examples load the VAE (the transformer in bf16); on a GPU
  its convolutions run on TF32 (cuDNN's default). (--quick: the 9-frame cases.) On a
  CPU: a tiny VAE (base width 8, one spatial and one temporal halving) on a 2 x 4 x 4
  latent, float32, a smoke run of the code paths.

Providers (same weights: each builds the VAE with seed 0 on the device)
  mmfast-patched     mmfast.patch(vae) (mmfast.integrations.diffusers.autoencoder_kl_wan:
                     every WanRMS_norm + SiLU as one channel_rms_norm pass)
  diffusers-eager    the VAE as diffusers runs it
  diffusers-compile  the decoder (one call per latent frame) under torch.compile, compiled
                     afresh per case; the first, second and later frames differ in their
                     cache state, so it compiles about three graphs: minutes, which is
                     why the evidence run times it in its last stage, not the headline

No FLOP count (causal padding and caching make the useful work a model of its own): the
suite reports time per decode. Target (issue 20, H100, read against the numbers of the
same run, not asserted): Wan VAE decode >= 2x diffusers (``Speedup`` over diffusers-eager,
every real-shape case).
"""

from __future__ import annotations

from functools import partial

import torch

from mmfast.bench.suite import Case, Speedup, Suite
from mmfast.bench.suites.diffusers_models import build_model, providers

# Wan 2.1's VAE (Wan-AI/Wan2.1-T2V-1.3B-Diffusers vae/config.json): AutoencoderKLWan's
# defaults, which huggingface/diffusers' scripts/convert_wan_to_diffusers.py builds the
# converted VAE with (base_dim 96, z_dim 16, dim_mult 1, 2, 4, 4, 2 residual blocks per
# level, temporal halving at the second and third levels).
# (Lists: diffusers concatenates them with lists.)
WAN21_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True], dropout=0.0)
TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
            scale_factor_temporal=2, scale_factor_spatial=2)
CONFIGS = {"wan2.1-vae": WAN21_VAE, "tiny": TINY}
CLASS = "AutoencoderKLWan"
HEIGHT, WIDTH = 480, 832


def _case(model: str, latent: tuple[int, int, int], dtype: str, frames: int | None = None) -> Case:
    """``latent`` (T, H, W); ``frames``: the clip it decodes to (real cases, for the name)."""
    params = {"model": model, "latent": list(latent), "dtype": dtype, "batch": 1,
              "channels": CONFIGS[model]["z_dim"]}
    if frames is not None:
        params.update(frames=frames, height=latent[1] * 8, width=latent[2] * 8)
        name = f"{model}-{params['height']}p-{frames}f-{dtype}"
    else:
        name = f"{model}-{'x'.join(map(str, latent))}-{dtype}"
    return Case(name, params, partial(_latents, params))


def cases(quick: bool, device: torch.device) -> list[Case]:
    if device.type != "cuda":
        return [_case("tiny", (2, 4, 4), "float32")]
    frame_counts = (9,) if quick else (9, 33)
    return [_case("wan2.1-vae", ((frames - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8), dtype, frames)
            for frames in frame_counts for dtype in ("float32", "bfloat16")]


def _latents(params: dict, device: torch.device) -> torch.Tensor:
    return torch.randn(params["batch"], params["channels"], *params["latent"], device=device,
                       dtype=getattr(torch, params["dtype"]))


def make_vae(params: dict, device: torch.device):
    from diffusers import AutoencoderKLWan

    config = CONFIGS[params["model"]]
    return build_model(lambda: AutoencoderKLWan(**config), device, getattr(torch, params["dtype"]))


def compile_decoder(vae):
    """torch.compile on the decoder's per-frame call (compiling ``decode`` would unroll the
    frame loop into one graph per clip length)."""
    torch.compiler.reset()
    vae.decoder.compile()
    return vae


def _decode(vae, latents: torch.Tensor) -> torch.Tensor:
    return vae.decode(latents, return_dict=False)[0]


SUITE = Suite(
    name="wan_vae_decode",
    description="Wan 2.1 VAE decode of a 480p clip (9 and 33 frames, float32 and bf16, random weights)",
    bound="compute",
    cases=cases,
    providers=providers(CLASS, make_vae, _decode, compile_decoder),
    plot_x="frames",
    plot_panels=("dtype",),
    speedups=(
        Speedup("mmfast-patched", ("diffusers-eager",), 2.0, "issue 20: Wan VAE decode >= 2x diffusers",
                {"model": "wan2.1-vae"}),
    ),
)
