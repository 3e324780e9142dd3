"""The Wan VAE's ``WanRMS_norm`` + SiLU (before every causal conv of its residual blocks
and the decoder's output) at the Wan 2.1 decoder's shapes for 480p video, bf16, forward
(the decode users wait on).

Providers: ``mmfast-triton`` (mmfast.ops.channel_rms_norm(..., activation="silu"): one
read, one write), ``diffusers-eager`` (diffusers' WanRMS_norm math then F.silu, as
WanResidualBlock runs them: F.normalize in float32, the cast back, two products, the
SiLU), ``torch-compile`` (that function under torch.compile, compiled afresh per case).

Shapes: the decoder decodes one latent frame per call (its temporal cache holds the
rest): 384 channels at the 60 x 104 latent, then upsampled in time and space, down to 96
channels at 480 x 832 over 4 frames.

Byte model (memory-bound; N = B C T H W elements of s bytes; parameters negligible):

    forward   read x, write y     2 N s

Target: mmfast-triton >= 80% of the measured copy bandwidth (as GroupNorm + SiLU).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast.bench.suite import Case, Provider, Suite, Target, backend_skip, cpu_compile_skip

# (channels, frames, height, width): WanRMS_norm inputs of the Wan 2.1 decoder at 480p.
DECODER_SHAPES = ((384, 1, 60, 104), (384, 2, 120, 208), (192, 4, 240, 416), (96, 4, 480, 832))
QUICK_SHAPES = ((384, 1, 60, 104), (96, 4, 480, 832))
CPU_SHAPES = ((24, 2, 8, 8),)  # smoke: the Triton interpreter


@dataclass
class NormInputs:
    x: Tensor
    gamma: Tensor


def _make_inputs(params: dict, device: torch.device) -> NormInputs:
    dtype = getattr(torch, params["dtype"])
    c, t, h, w = params["channels"], params["frames"], params["height"], params["width"]
    return NormInputs(torch.randn(1, c, t, h, w, device=device, dtype=dtype),
                      1 + 0.1 * torch.randn(c, device=device, dtype=dtype))


def cases(quick: bool, device: torch.device) -> list[Case]:
    shapes = CPU_SHAPES if device.type != "cuda" else (QUICK_SHAPES if quick else DECODER_SHAPES)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    out = []
    for c, t, h, w in shapes:
        elements = c * t * h * w
        params = {"channels": c, "frames": t, "height": h, "width": w, "dtype": dtype, "elements": elements}
        out.append(Case(f"wan-rms-silu-fwd-1x{c}x{t}x{h}x{w}-{dtype}", params, partial(_make_inputs, params),
                        bytes=2 * elements * torch.tensor([], dtype=getattr(torch, dtype)).element_size()))
    return out


def diffusers_wan_rms_norm_silu(x, gamma):
    """diffusers' WanRMS_norm.forward (channel-first, no bias) then SiLU, op for op."""
    normalized = F.normalize(x.float(), dim=1).to(x.dtype)
    return F.silu(normalized * x.shape[1] ** 0.5 * gamma.view(-1, 1, 1, 1))


def _timed(forward):
    def run(i: NormInputs):
        with torch.no_grad():
            return forward(i.x, i.gamma)
    return run


def _build_mmfast(case: Case):
    from mmfast.ops import channel_rms_norm

    return _timed(lambda x, g: channel_rms_norm(x, g, activation="silu", backend="triton"))


def _skip_mmfast(case: Case, device: torch.device) -> str | None:
    dtype = getattr(torch, case.params["dtype"])
    return backend_skip("channel_rms_norm", "triton", device, dtype, facts={"channels": case.params["channels"]})


def _build_compile(case: Case):
    torch.compiler.reset()  # a fresh compile per case (see the norm suite)
    return _timed(torch.compile(diffusers_wan_rms_norm_silu))


def _skip_compile(case: Case, device: torch.device) -> str | None:
    return cpu_compile_skip(device)


SUITE = Suite(
    name="wan_vae_norm",
    description="Wan VAE WanRMS_norm + SiLU at the Wan 2.1 decoder's 480p shapes, forward",
    bound="memory",
    cases=cases,
    providers=(
        Provider("mmfast-triton", _build_mmfast, _skip_mmfast),
        Provider("diffusers-eager", lambda case: _timed(diffusers_wan_rms_norm_silu)),
        Provider("torch-compile", _build_compile, _skip_compile),
    ),
    plot_x="elements",
    plot_panels=(),
    targets=(Target("mmfast-triton", 0.80, "Wan VAE norm + SiLU >= 80% of measured HBM bandwidth at 480p shapes"),),
)
