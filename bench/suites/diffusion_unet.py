"""One denoiser step of an SD1.5-sized UNet and SD3- and SD3.5-medium-sized MM-DiT stacks, random
weights, fp16, inference: per-step latency (it/s = 1000 / ms).

Cases
  sd15-unet-b1          batch 1 (no guidance), 64 x 64 latents (512 px), 77 text tokens
  sd15-unet-cfg-2x1     classifier-free guidance of one image: batch 2
  sd15-unet-cfg-2x4     guidance of four images: batch 8
  sd3m-mmdit-1024       SD3-medium transformer (24 MM-DiT blocks, 1536 wide, 24 heads)
                        at 1024 px: 4096 image tokens + 333 text tokens, batch 2 (guidance)
  sd35m-mmdit-1024      the same for SD3.5-medium (24 blocks with RMSNorm q/k norms, the
                        first 13 with dual attention)
  (--quick: the UNet at cfg-2x1 and 4-block MM-DiT stacks.)

Providers
  diffusers-sdpa        the diffusers model as it is (AttnProcessor2_0: torch SDPA)
  diffusers-compile     torch.compile(model)
  diffusers-cl-compile  channels_last + torch.compile (UNet only: the usual recipe)
  mmfast                mmfast.patch(model): mmfast attention processors, fused
                        GroupNorm+SiLU, adaLN modulation, gated residuals
  mmfast-cl             mmfast.patch on a channels_last UNet (GroupNorm keeps the format)

Targets (issue 7, H100): SD1.5 step at batch 2 with guidance >= 1.6x diffusers-sdpa and
>= 1.15x diffusers-compile; MM-DiT at 1024 px >= 1.3x diffusers-sdpa. These are ratios of
latencies, read from the table side by side (the suite has no FLOP count, so no fraction
of peak). Needs diffusers and a CUDA device: a UNet of this size would take minutes a step
on the Triton interpreter.
"""

from __future__ import annotations

from functools import partial

import torch

from mmfast.bench.suite import Case, Provider, Suite

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
    pooled_projection_dim=2048, pos_embed_max_size=192,
)
TEXT_TOKENS_SD15, TEXT_TOKENS_SD3 = 77, 333


def _unet_inputs(batch: int, device: torch.device) -> dict:
    return {"sample": torch.randn(batch, 4, 64, 64, device=device, dtype=torch.float16),
            "timestep": torch.full((batch,), 500, device=device),
            "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS_SD15, 768, device=device, dtype=torch.float16)}


def _sd3_inputs(batch: int, device: torch.device) -> dict:
    return {"hidden_states": torch.randn(batch, 16, 128, 128, device=device, dtype=torch.float16),
            "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS_SD3, 4096, device=device, dtype=torch.float16),
            "pooled_projections": torch.randn(batch, 2048, device=device, dtype=torch.float16),
            "timestep": torch.full((batch,), 500.0, device=device)}


def cases(quick: bool, device: torch.device) -> list[Case]:
    unet_batches = {"cfg-2x1": 2} if quick else {"b1": 1, "cfg-2x1": 2, "cfg-2x4": 8}
    out = [Case(f"sd15-unet-{name}", {"model": "unet", "batch": b, "layers": None},
                partial(_unet_inputs, b)) for name, b in unet_batches.items()]
    layers = 4 if quick else SD3_MEDIUM["num_layers"]
    for name, model in (("sd3m", "sd3"), ("sd35m", "sd35")):
        out.append(Case(f"{name}-mmdit-1024-{layers}blocks", {"model": model, "batch": 2, "layers": layers},
                        partial(_sd3_inputs, 2)))
    return out


def _make_model(params: dict, device: torch.device):
    torch.manual_seed(0)
    if params["model"] == "unet":
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel(**SD15_UNET)
    else:
        from diffusers import SD3Transformer2DModel

        from mmfast.models.sd3_presets import SD3_PRESETS

        config = SD3_MEDIUM if params["model"] == "sd3" else SD3_PRESETS["sd35-medium"]["transformer"]
        model = SD3Transformer2DModel(**(config | {"num_layers": params["layers"]}))
    return model.to(device=device, dtype=torch.float16).eval()


def _provider(channels_last: bool = False, compiled: bool = False, patched: bool = False):
    def build(case: Case):
        state = {}

        def run(inputs: dict):
            if "model" not in state:  # built on the first (untimed, warm-up) call, on the inputs' device
                device = next(iter(inputs.values())).device
                model = _make_model(case.params, device)
                if channels_last:
                    model = model.to(memory_format=torch.channels_last)
                if patched:
                    import mmfast

                    state["handle"] = mmfast.patch(model)
                if compiled:
                    torch.compiler.reset()
                    model = torch.compile(model)
                state["model"] = model
            with torch.no_grad():
                return state["model"](**inputs, return_dict=False)[0]
        return run
    return build


def _skip(case: Case, device: torch.device, unet_only: bool = False) -> str | None:
    from mmfast.dispatch import module_available

    if not module_available("diffusers"):
        return "diffusers is not installed"
    if device.type != "cuda":
        return "needs a CUDA device (a full-size denoiser step takes minutes on the Triton interpreter)"
    if unet_only and case.params["model"] != "unet":
        return "channels_last applies to the UNet's convolutions only"
    return None


SUITE = Suite(
    name="diffusion_unet",
    description="SD1.5 UNet and SD3 / SD3.5-medium MM-DiT denoiser step (fp16, random weights), per-step latency",
    bound="compute",
    cases=cases,
    providers=(
        Provider("diffusers-sdpa", _provider(), _skip),
        Provider("diffusers-compile", _provider(compiled=True), _skip),
        Provider("diffusers-cl-compile", _provider(channels_last=True, compiled=True), partial(_skip, unet_only=True)),
        Provider("mmfast", _provider(patched=True), _skip),
        Provider("mmfast-cl", _provider(channels_last=True, patched=True), partial(_skip, unet_only=True)),
    ),
    plot_x="batch",
    plot_panels=("model",),
)
