"""GroupNorm + SiLU at the shapes of the SD1.5 UNet, fp16, NCHW and channels_last,
forward (inference) and forward+backward.

Providers: ``mmfast-triton`` (mmfast.ops.group_norm(..., activation="silu")),
``mmfast-cuda`` (the same with backend="cuda": csrc/group_norm_silu.cu, built before timing;
skipped with the reason when the CUDA path is unavailable),
``torch-eager`` (F.group_norm then F.silu, as diffusers' ResnetBlock2D runs them),
``torch-compile`` (the eager function under torch.compile, compiled afresh per case).

Shapes: batch 2 (classifier-free guidance of one image), 32 groups, eps 1e-6; the
channels x resolution pairs the UNet's ResNet blocks normalise at 512 px (64 x 64
latents), down path and the wider concatenations of the up path.

Byte model (memory-bound; N = B C H W elements of s bytes; parameters negligible):

    forward   read x, write y                         2 N s
    backward  read x and dy, write dx                 3 N s
    fwd+bwd   5 N s

Target (issue 7): mmfast-triton >= 80% of the measured copy bandwidth at these shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast.bench.suite import Case, Provider, Suite, Target, backend_skip, cpu_compile_skip

GROUPS, EPS, BATCH = 32, 1e-6, 2
# (channels, latent side): the SD1.5 UNet's GroupNorm inputs at 64 x 64 latents.
UNET_SHAPES = ((320, 64), (640, 64), (640, 32), (960, 32), (1280, 16), (1920, 16), (1280, 8), (2560, 8))
QUICK_SHAPES = ((320, 64), (1280, 16), (2560, 8))
CPU_SHAPES = ((64, 8),)  # smoke: the Triton interpreter


@dataclass
class GroupNormInputs:
    x: Tensor
    weight: Tensor
    bias: Tensor
    dy: Tensor | None


def _make_inputs(params: dict, device: torch.device) -> GroupNormInputs:
    dtype = getattr(torch, params["dtype"])
    c, side = params["channels"], params["side"]
    grad = params["pass"] == "fwd+bwd"
    fmt = torch.channels_last if params["layout"] == "nhwc" else torch.contiguous_format
    x = torch.randn(BATCH, c, side, side, device=device, dtype=dtype).contiguous(memory_format=fmt)
    weight = 1 + 0.1 * torch.randn(c, device=device, dtype=dtype)
    bias = 0.1 * torch.randn(c, device=device, dtype=dtype)
    return GroupNormInputs(x.requires_grad_(grad), weight.requires_grad_(grad), bias.requires_grad_(grad),
                           torch.randn_like(x) if grad else None)


def cases(quick: bool, device: torch.device) -> list[Case]:
    shapes = CPU_SHAPES if device.type != "cuda" else (QUICK_SHAPES if quick else UNET_SHAPES)
    out = []
    for pass_ in ("fwd", "fwd+bwd"):
        for layout in ("nchw", "nhwc"):
            for c, side in shapes:
                params = {"channels": c, "side": side, "layout": layout, "pass": pass_, "dtype": "float16",
                          "elements": BATCH * c * side * side}
                elements = params["elements"]
                out.append(Case(f"gn-silu-{pass_}-{layout}-{BATCH}x{c}x{side}x{side}-fp16", params,
                                partial(_make_inputs, params),
                                bytes=(2 if pass_ == "fwd" else 5) * elements * 2))
    return out


def eager_group_norm_silu(x, weight, bias):
    return F.silu(F.group_norm(x, GROUPS, weight, bias, EPS))


def _timed(case: Case, forward):
    if case.params["pass"] == "fwd":
        def run(i: GroupNormInputs):
            with torch.no_grad():
                return forward(i.x, i.weight, i.bias)
    else:
        def run(i: GroupNormInputs):
            return torch.autograd.grad(forward(i.x, i.weight, i.bias), (i.x, i.weight, i.bias), i.dy)
    return run


def _build_mmfast(case: Case, backend: str = "triton"):
    from mmfast.ops import group_norm

    return _timed(case, lambda x, w, b: group_norm(x, GROUPS, w, b, EPS, "silu", backend=backend))


def _skip_mmfast(case: Case, device: torch.device, backend: str = "triton") -> str | None:
    p = case.params
    facts = {"channels": p["channels"], "group_channels": p["channels"] // GROUPS, "spatial": p["side"] ** 2,
             "param_dtypes": (torch.float16,)}
    return backend_skip("group_norm", backend, device, torch.float16,
                        layout="channels_last" if p["layout"] == "nhwc" else "nchw", facts=facts)


def _skip_mmfast_cuda(case: Case, device: torch.device) -> str | None:
    reason = _skip_mmfast(case, device, "cuda")
    if reason is None:
        from mmfast.cuda import build

        if not build.load(device):  # build here, so that no case times a compile
            reason = f"CUDA C++ path unavailable: {build.unavailable_reason(device)}"
    return reason


def _build_compile(case: Case):
    torch.compiler.reset()  # a fresh compile per case (see the norm suite)
    return _timed(case, torch.compile(eager_group_norm_silu))


def _skip_compile(case: Case, device: torch.device) -> str | None:
    return cpu_compile_skip(device)


SUITE = Suite(
    name="group_norm",
    description="GroupNorm + SiLU at SD1.5 UNet shapes, NCHW and channels_last, fwd and fwd+bwd",
    bound="memory",
    cases=cases,
    providers=(
        Provider("mmfast-triton", _build_mmfast, _skip_mmfast),
        Provider("mmfast-cuda", partial(_build_mmfast, backend="cuda"), _skip_mmfast_cuda),
        Provider("torch-eager", lambda case: _timed(case, eager_group_norm_silu)),
        Provider("torch-compile", _build_compile, _skip_compile),
    ),
    plot_x="elements",
    plot_panels=("pass", "layout"),
    targets=(Target("mmfast-triton", 0.80,
                    "issue 7: GroupNorm+SiLU >= 80% of measured HBM bandwidth at the UNet's shapes"),),
)
