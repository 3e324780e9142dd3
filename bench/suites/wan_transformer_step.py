"""One denoising step of Wan2.1-T2V-1.3B's transformer (diffusers ``WanTransformer3DModel``,
random weights, bf16 with the modules diffusers keeps in float32, inference) on a 480p,
33-frame video: a 16 x 9 x 60 x 104 latent (the VAE: 4x in time after the first frame,
8x in space), (1, 2, 2) patches -> 9 x 30 x 52 = 14040 video tokens, and 512 umT5 text
tokens, batch 1: one transformer call (WanPipeline makes two per step with guidance,
one conditional and one unconditional, each this call).

Cases (GPU)
  wan2.1-1.3b-480p-33f-4layers    4 of the 30 blocks, the real width and tokens: the
                                  evidence run's headline
  wan2.1-1.3b-480p-33f-30layers   the whole model (1.4B parameters)
  (--quick: the 4-layer case.) On a CPU: a tiny Wan-like model (2 blocks of 2 heads x 32,
  48 video + 7 text tokens, float32), a smoke run of the code paths.

Providers (same weights: each builds the model with seed 0 on the device)
  mmfast-patched     mmfast.patch(model) (mmfast.integrations.diffusers.wan_transformer)
  diffusers-eager    the model as diffusers runs it (its attention dispatcher: torch SDPA)
  diffusers-compile  diffusers' regional compilation (compile_repeated_blocks(fullgraph=True)),
                     compiled afresh per case

FLOP model (2 per multiply-add; D = 1536, F = 8960, N video and T text tokens): per block
and video token 2 (6 D^2 + 2 D F) (self-attention q, k, v, out; cross-attention q, out;
the FFN), per text token 2 (2 D^2) (cross-attention k, v), self-attention 4 N^2 D, cross-
attention 4 N T D; the patch embedding 2 D (16 x 4) and proj_out 2 D (4 x 16) per video
token, the text embedder 2 (4096 D + D^2) per text token; the timestep embedder and its
projection run once per sample (left out, < 0.01%). About 72.9 TFLOP per call at 480p.

Target (issue 20, H100, read against the numbers of the same run, not asserted):
Wan2.1-1.3B 480p per step >= 1.5x diffusers eager (``Speedup``, on every real-shape
case). A sequence-parallel case (``mmfast.patch(model, sequence_parallel=group)``) is not
here: the harness times one process on one device, and the evidence machine has one GPU.
"""

from __future__ import annotations

from functools import partial

import torch

from mmfast.bench.suite import Case, Speedup, Suite
from mmfast.bench.suites.diffusers_models import build_model, providers, regional_compile

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers' transformer/config.json: the "Wan-T2V-1.3B" config of
# huggingface/diffusers' scripts/convert_wan_to_diffusers.py (12 heads x 128, FFN 8960,
# 30 layers, text 4096, frequency dim 256, (1, 2, 2) patches, RMSNorm q/k across heads).
WAN21_T2V_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                      out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                      cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
                      added_kv_proj_dim=None, rope_max_seq_len=1024)
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=32, ffn_dim=96, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)
CONFIGS = {"wan2.1-1.3b": WAN21_T2V_1_3B, "tiny": TINY}
TEXT_TOKENS = 512  # WanPipeline pads the prompt to max_sequence_length 512
CLASS = "WanTransformer3DModel"


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Wan 2.1's VAE: the first frame alone, then 4 frames per latent frame; 8x in space."""
    if (frames - 1) % 4 or height % 16 or width % 16:
        raise ValueError(f"frames, height, width: expected 4k + 1 frames and sides divisible by 16, "
                         f"got {frames}, {height}, {width}")
    return (frames - 1) // 4 + 1, height // 8, width // 8


def video_tokens(config: dict, latent: tuple[int, int, int]) -> int:
    pt, ph, pw = config["patch_size"]
    return (latent[0] // pt) * (latent[1] // ph) * (latent[2] // pw)


def step_flops(config: dict, latent: tuple[int, int, int], text: int, batch: int = 1) -> int:
    """FLOPs of one transformer call (see the module doc)."""
    d, f = config["num_attention_heads"] * config["attention_head_dim"], config["ffn_dim"]
    n = video_tokens(config, latent)
    patch = config["in_channels"] * config["patch_size"][0] * config["patch_size"][1] * config["patch_size"][2]
    out = config["out_channels"] * patch // config["in_channels"]
    per_block = 2 * (6 * d * d + 2 * d * f) * n + 4 * d * d * text + 4 * n * n * d + 4 * n * text * d
    per_sample = (config["num_layers"] * per_block + 2 * d * (patch + out) * n
                  + 2 * (config["text_dim"] * d + d * d) * text)
    return batch * per_sample


def _case(model: str, layers: int, latent: tuple[int, int, int], text: int, dtype: str,
          video: tuple[int, int, int] | None = None) -> Case:
    """``video`` (frames, height, width): the video the latent decodes to, for the name."""
    config = CONFIGS[model] | {"num_layers": layers}
    params = {"model": model, "layers": layers, "full": layers == WAN21_T2V_1_3B["num_layers"] and model != "tiny",
              "latent": list(latent), "video_tokens": video_tokens(config, latent), "text_tokens": text,
              "batch": 1, "dtype": dtype}
    if video is not None:
        frames, height, width = video
        params.update(frames=frames, height=height, width=width)
        name = f"{model}-{height}p-{frames}f-{layers}layers"
    else:
        name = f"{model}-{'x'.join(map(str, latent))}-{layers}layers-{dtype}"
    return Case(name, params, partial(_inputs, params), flops=step_flops(config, latent, text))


VIDEO_480P_33F = (33, 480, 832)


def cases(quick: bool, device: torch.device) -> list[Case]:
    if device.type != "cuda":
        return [_case("tiny", 2, (3, 8, 8), 7, "float32")]
    latent = latent_shape(*VIDEO_480P_33F)
    out = [_case("wan2.1-1.3b", 4, latent, TEXT_TOKENS, "bfloat16", VIDEO_480P_33F)]
    if not quick:
        out.append(_case("wan2.1-1.3b", WAN21_T2V_1_3B["num_layers"], latent, TEXT_TOKENS, "bfloat16",
                         VIDEO_480P_33F))
    return out


def _inputs(params: dict, device: torch.device) -> dict:
    config = CONFIGS[params["model"]]
    dtype, batch = getattr(torch, params["dtype"]), params["batch"]
    return {
        "hidden_states": torch.randn(batch, config["in_channels"], *params["latent"], device=device, dtype=dtype),
        # WanPipeline passes the scheduler's timestep (float32, 0..1000) expanded to the batch
        "timestep": torch.full((batch,), 750.0, device=device),
        "encoder_hidden_states": torch.randn(batch, params["text_tokens"], config["text_dim"], device=device,
                                             dtype=dtype),
    }


def make_model(params: dict, device: torch.device):
    from diffusers import WanTransformer3DModel

    config = CONFIGS[params["model"]] | {"num_layers": params["layers"]}
    return build_model(lambda: WanTransformer3DModel(**config), device, getattr(torch, params["dtype"]))


def _forward(model, inputs: dict) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


SUITE = Suite(
    name="wan_transformer_step",
    description="Wan2.1-T2V-1.3B transformer, one denoising step at 480p x 33 frames (14040 + 512 tokens, bf16)",
    bound="compute",
    cases=cases,
    providers=providers(CLASS, make_model, _forward, regional_compile),
    plot_x="layers",
    speedups=(
        Speedup("mmfast-patched", ("diffusers-eager",), 1.5,
                "issue 20: Wan2.1-1.3B 480p step >= 1.5x diffusers eager", {"model": "wan2.1-1.3b"}),
    ),
)
