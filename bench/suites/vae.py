"""VAE decode of latent-diffusion models (diffusers ``AutoencoderKL``, random weights),
inference: latency per decode. At image resolution the decoder is a large, memory-bound
part of a text-to-image call: GroupNorm+SiLU over maps of up to 128 x 1024 x 1024.

Cases (batch 1, fp16 and bf16)
  sd15-512    SD1.5 VAE (4 latent channels, 128/256/512/512), 64 x 64 latents -> 512 px
  sd15-1024   the same at 128 x 128 latents -> 1024 px
  sd3-1024    SD3 VAE (16 latent channels, no quant convs), 128 x 128 latents -> 1024 px
  (--quick: sd15-512 in fp16.)

Providers
  diffusers-eager    the diffusers VAE as it is (SDPA attention, nn.GroupNorm + SiLU)
  diffusers-compile  torch.compile(vae.decode)
  mmfast             mmfast.nn.use_mmfast_vae_blocks(vae): ResNet blocks with GroupNorm+SiLU
                     fused, mid-block attention through mmfast dispatch (one head of 512:
                     SDPA), conv_norm_out + SiLU fused
  mmfast-cl          the same on a channels_last VAE and latents

Each case's ``groupnorm_mb`` is the GroupNorm traffic of one decode under the byte model
of the group_norm suite (read x, write y: 2 N s bytes over every GroupNorm input), the
part mmfast fuses; divide by a provider's time for the GroupNorm share of its bandwidth.
No target is set for the VAE alone: it counts toward issue 8's end-to-end SD1.5 target
(>= 1.6x diffusers), measured by ``mmfast profile ldm``. Needs diffusers and a CUDA
device: a 512 px decode takes minutes on the Triton interpreter.
"""

from __future__ import annotations

from functools import partial

import torch

from mmfast.bench.suite import Case, Provider, Suite

_COMMON = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               norm_num_groups=32)
VAES = {  # the published vae/config.json values of SD1.5 and SD3-medium
    "sd15": dict(_COMMON, latent_channels=4, sample_size=512, scaling_factor=0.18215),
    "sd3": dict(_COMMON, latent_channels=16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
                use_quant_conv=False, use_post_quant_conv=False),
}
BATCH = 1


def decoder_groupnorm_elements(config: dict, latent_side: int) -> int:
    """Elements one decode of a batch of 1 feeds to GroupNorm: the mid block (two ResNet
    blocks, the attention's norm), each up block's ResNet blocks (norm1 on their input,
    norm2 on their output; the first takes the previous block's width) at its resolution,
    and conv_norm_out."""
    widths = list(reversed(config["block_out_channels"]))
    side = latent_side
    total = 5 * widths[0] * side * side  # mid: 2 resnets x 2 norms + the attention's
    previous = widths[0]
    for i, width in enumerate(widths):
        for j in range(config["layers_per_block"] + 1):
            total += ((previous if j == 0 else width) + width) * side * side
        previous = width
        if i < len(widths) - 1:
            side *= 2
    return total + widths[-1] * side * side  # conv_norm_out


def cases(quick: bool, device: torch.device) -> list[Case]:
    grid = [("sd15", 512)] if quick else [("sd15", 512), ("sd15", 1024), ("sd3", 1024)]
    dtypes = ("float16",) if quick else ("float16", "bfloat16")
    out = []
    for vae, pixels in grid:
        latent_side = pixels // 8
        elements = BATCH * decoder_groupnorm_elements(VAES[vae], latent_side)
        for dtype in dtypes:
            size = getattr(torch, dtype).itemsize
            params = {"vae": vae, "pixels": pixels, "dtype": dtype, "batch": BATCH,
                      "groupnorm_mb": round(2 * elements * size / 1e6, 1)}
            out.append(Case(f"{vae}-{pixels}-{dtype}", params, partial(_latents, vae, latent_side, dtype)))
    return out


def _latents(vae: str, latent_side: int, dtype: str, device: torch.device) -> torch.Tensor:
    channels = VAES[vae]["latent_channels"]
    return torch.randn(BATCH, channels, latent_side, latent_side, device=device, dtype=getattr(torch, dtype))


def _make_vae(params: dict, device: torch.device):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**VAES[params["vae"]])
    return vae.to(device=device, dtype=getattr(torch, params["dtype"])).eval()


def _provider(mmfast_blocks: bool = False, channels_last: bool = False, compiled: bool = False):
    def build(case: Case):
        state = {}

        def run(latents: torch.Tensor):
            if "decode" not in state:  # built on the first (untimed, warm-up) call, on the latents' device
                vae = _make_vae(case.params, latents.device)
                if mmfast_blocks:
                    from mmfast.nn import use_mmfast_vae_blocks

                    use_mmfast_vae_blocks(vae)
                if channels_last:
                    vae = vae.to(memory_format=torch.channels_last)
                decode = vae.decode
                if compiled:
                    torch.compiler.reset()
                    decode = torch.compile(decode)
                state["decode"], state["vae"] = decode, vae
            if channels_last:
                latents = latents.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                return state["decode"](latents, return_dict=False)[0]
        return run
    return build


def _skip(case: Case, device: torch.device) -> str | None:
    from mmfast.dispatch import module_available

    if not module_available("diffusers"):
        return "diffusers is not installed"
    if device.type != "cuda":
        return "needs a CUDA device (a 512 px VAE decode takes minutes on the Triton interpreter)"
    return None


SUITE = Suite(
    name="vae",
    description="SD1.5 and SD3 VAE decode at 512 / 1024 px (fp16, bf16, random weights), latency per decode",
    bound="compute",
    cases=cases,
    providers=(
        Provider("diffusers-eager", _provider(), _skip),
        Provider("diffusers-compile", _provider(compiled=True), _skip),
        Provider("mmfast", _provider(mmfast_blocks=True), _skip),
        Provider("mmfast-cl", _provider(mmfast_blocks=True, channels_last=True), _skip),
    ),
    plot_x="pixels",
    plot_panels=("vae", "dtype"),
)
