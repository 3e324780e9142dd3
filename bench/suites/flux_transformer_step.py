"""One denoising step of FLUX.1-dev's transformer (diffusers ``FluxTransformer2DModel``,
random weights, bf16, inference) at 1024 px: 4096 image tokens (a 128 x 128 x 16 latent
packed 2 x 2 into 64 channels) and 512 T5 text tokens, batch 1 (FLUX.1-dev is
guidance-distilled: one transformer call per step, the guidance scale an input).

Cases (GPU)
  flux1-dev-1024px-2+4blocks     2 double-stream + 4 single-stream blocks (the same 1:2
                                 mix), the real width and tokens: the evidence run's
                                 headline, seconds to build and to compile
  flux1-dev-1024px-19+38blocks   the whole model (12B parameters, 24 GB in bf16)
  (--quick: the 2+4-block case.) On a CPU: a tiny FLUX-like model (1 + 2 blocks, 2 heads
  of 32, 16 image + 7 text tokens, float32), a smoke run of the code paths.

Providers (same weights: each builds the model with seed 0 on the device)
  mmfast-patched     mmfast.patch(model) (mmfast.integrations.diffusers.flux_transformer)
  diffusers-eager    the model as diffusers runs it (its attention dispatcher: torch SDPA)
  diffusers-compile  diffusers' regional compilation (compile_repeated_blocks(fullgraph=True):
                     each block class compiled once), compiled afresh per case

FLOP model (useful work, 2 per multiply-add; D = 3072 = 24 x 128, N = image + text tokens):
every block does 24 D^2 per token (double-stream: q, k, v, out and a 4x MLP per stream;
single-stream: q, k, v and the 4D MLP in, the 5D -> D projection out) and 4 N^2 D of joint
attention; the embedders 2 D (64 per image token, 4096 per text token), proj_out 2 D 64 per
image token; the adaLN modulations 2 D (12 D per double, 3 D per single block, 2 D at the
end) per sample. The timestep / guidance / pooled-text embedders are left out (< 0.01%).
At 1024 px the whole step is about 74.5 TFLOP.

Targets (issue 20, H100, read against the numbers of the same run, not asserted):
FLUX.1-dev 1024 px, 28 steps in <= 4.3 s, i.e. <= 153.6 ms per step for the whole model
(``Latency``: about 485 TFLOP/s, 61% of an H100's measured bf16 matmul peak); per step
>= 1.6x diffusers eager (``Speedup``, on every real-shape case; the 2+4-block case stands
in for it where the whole model was not run). A sequence-parallel case is not here: the
harness times one process on one device.
"""

from __future__ import annotations

from functools import partial

import torch

from mmfast.bench.suite import Case, Latency, Speedup, Suite
from mmfast.bench.suites.diffusers_models import build_model, providers, regional_compile

# FLUX.1-dev's transformer/config.json (black-forest-labs/FLUX.1-dev): 19 double- and 38
# single-stream blocks of 24 heads x 128, T5 width 4096, CLIP pooled 768, guidance
# embedding, rotary axes 16 + 56 + 56; the same numbers huggingface/diffusers'
# scripts/convert_flux_to_diffusers.py converts the original checkpoint with
# (num_layers=19, num_single_layers=38, inner_dim=3072).
FLUX1_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                 guidance_embeds=True, axes_dims_rope=(16, 56, 56))
TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32,
            num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(8, 12, 12))
CONFIGS = {"flux1-dev": FLUX1_DEV, "tiny": TINY}
TEXT_TOKENS = 512  # FluxPipeline's max_sequence_length for FLUX.1-dev
STEPS, PIPELINE_S = 28, 4.3  # issue 20's FLUX.1-dev budget: 28 steps at 1024 px in 4.3 s
GUIDANCE = 3.5
CLASS = "FluxTransformer2DModel"


def image_tokens(pixels: int) -> int:
    """The VAE halves 1024 px three times (128 x 128 latents), the pipeline packs 2 x 2."""
    return (pixels // 16) ** 2


def step_flops(config: dict, image: int, text: int, batch: int = 1) -> int:
    """FLOPs of one transformer call (see the module doc)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    blocks = config["num_layers"] + config["num_single_layers"]
    tokens = image + text
    out_channels = config["patch_size"] ** 2 * config["in_channels"]
    per_sample = (blocks * (24 * d * d * tokens + 4 * tokens * tokens * d)
                  + 2 * d * (config["in_channels"] * image + config["joint_attention_dim"] * text)
                  + 2 * d * out_channels * image
                  + 2 * d * d * (12 * config["num_layers"] + 3 * config["num_single_layers"] + 2))
    return batch * per_sample


def _case(model: str, double: int, single: int, pixels: int, side_tokens: int, text: int, dtype: str) -> Case:
    config = CONFIGS[model] | {"num_layers": double, "num_single_layers": single}
    image = side_tokens * side_tokens
    params = {"model": model, "pixels": pixels, "double_blocks": double, "single_blocks": single,
              "full": (double, single) == (FLUX1_DEV["num_layers"], FLUX1_DEV["num_single_layers"]),
              "image_tokens": image, "text_tokens": text, "batch": 1, "dtype": dtype}
    name = (f"{model}-{pixels}px-{double}+{single}blocks" if model != "tiny"
            else f"tiny-{side_tokens}x{side_tokens}tok-{double}+{single}blocks-{dtype}")
    return Case(name, params, partial(_inputs, params), flops=step_flops(config, image, text))


def cases(quick: bool, device: torch.device) -> list[Case]:
    if device.type != "cuda":
        return [_case("tiny", 1, 2, 64, 4, 7, "float32")]
    side_tokens = 1024 // 16
    out = [_case("flux1-dev", 2, 4, 1024, side_tokens, TEXT_TOKENS, "bfloat16")]
    if not quick:
        out.append(_case("flux1-dev", FLUX1_DEV["num_layers"], FLUX1_DEV["num_single_layers"], 1024, side_tokens,
                         TEXT_TOKENS, "bfloat16"))
    return out


def _image_ids(side_tokens: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[h * w, 3] ids as FluxPipeline makes them: (0, row, column)."""
    rows = torch.arange(side_tokens, device=device).repeat_interleave(side_tokens)
    cols = torch.arange(side_tokens, device=device).repeat(side_tokens)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).to(dtype)


def _inputs(params: dict, device: torch.device) -> dict:
    config = CONFIGS[params["model"]]
    dtype, batch = getattr(torch, params["dtype"]), params["batch"]
    image, text = params["image_tokens"], params["text_tokens"]
    return {
        "hidden_states": torch.randn(batch, image, config["in_channels"], device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(batch, text, config["joint_attention_dim"], device=device, dtype=dtype),
        "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], device=device, dtype=dtype),
        # FluxPipeline passes t / 1000 in the latents' dtype and the guidance scale in float32
        "timestep": torch.full((batch,), 0.75, device=device, dtype=dtype),
        "guidance": torch.full((batch,), GUIDANCE, device=device, dtype=torch.float32),
        "img_ids": _image_ids(int(image ** 0.5), device, dtype),
        "txt_ids": torch.zeros(text, 3, device=device, dtype=dtype),
    }


def make_model(params: dict, device: torch.device):
    from diffusers import FluxTransformer2DModel

    config = CONFIGS[params["model"]] | {"num_layers": params["double_blocks"],
                                         "num_single_layers": params["single_blocks"]}
    return build_model(lambda: FluxTransformer2DModel(**config), device, getattr(torch, params["dtype"]))


def _forward(model, inputs: dict) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


SUITE = Suite(
    name="flux_transformer_step",
    description="FLUX.1-dev transformer, one denoising step at 1024 px (4096 + 512 tokens, bf16, random weights)",
    bound="compute",
    cases=cases,
    providers=providers(CLASS, make_model, _forward, regional_compile),
    plot_x="double_blocks",
    plot_panels=("pixels",),
    speedups=(
        Speedup("mmfast-patched", ("diffusers-eager",), 1.6,
                "issue 20: FLUX.1-dev step at 1024 px >= 1.6x diffusers eager", {"model": "flux1-dev"}),
    ),
    latencies=(
        Latency("mmfast-patched", PIPELINE_S * 1e3 / STEPS,
                f"issue 20: FLUX.1-dev 1024 px, {STEPS} steps <= {PIPELINE_S} s, whole model",
                {"model": "flux1-dev", "full": True}),
    ),
)
