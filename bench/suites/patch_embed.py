"""Patch embedding, forward and forward+backward; bf16 on a GPU (fp16 in CPU smoke runs).

Cases (``style``):
    conv3d  Qwen2.5-VL: pre-patchified rows [N, 3*2*14*14 = 1176] -> [N, 1280], no bias
    clip    CLIP ViT-L/14 @ 336: [B, 3, 336, 336] -> [B, 1 + 576, 1024], class token, no bias
    siglip  SigLIP-so400m/14 @ 384: [B, 3, 384, 384] -> [B, 729, 1152], bias

Providers:
    mmfast-triton   the fused implicit-GEMM op (mmfast.ops.patch_embed[_patchified])
    hf-conv         what Hugging Face runs: Conv3d on x.view(-1, 3, 2, 14, 14) (conv3d), or
                    Conv2d + flatten + class-token concat + position add (clip, siglip)
    torch-linear    a GEMM with the epilogue left to torch: F.linear on the rows (conv3d;
                    the issue's ">= 1.0x F.linear" baseline), or an explicit unfold
                    (reshape/permute copy) + F.linear + bias + class concat + position add
    torch-compile   the torch-linear function under torch.compile

FLOPs: 2 * patches * K * E per forward (K = C * P * P [* T]); fwd+bwd adds the input and
weight gradients, 2x that again. The suite is compute-bound: rows report TFLOP/s and the
fraction of the measured bf16 matmul peak.

Targets (issue 4, H100 bf16): >= 5x the Hugging Face Conv3d path; >= 1.0x F.linear +
separate bias/position add.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast.bench.suite import Case, Provider, Speedup, Suite, Target, cpu_compile_skip

# style -> (channels, temporal, patch, embed, image size, class token, bias)
MODELS = {
    "conv3d": (3, 2, 14, 1280, None, False, False),
    "clip": (3, 1, 14, 1024, 336, True, False),
    "siglip": (3, 1, 14, 1152, 384, False, True),
}
CPU_MODELS = {  # interpreter-sized smoke shapes, the same code paths
    "conv3d": (3, 2, 4, 64, None, False, False),
    "clip": (3, 1, 8, 64, 32, True, False),
    "siglip": (3, 1, 8, 64, 32, False, True),
}
GPU_SIZES = {"conv3d": (4096, 16384, 65536), "clip": (8, 32), "siglip": (8, 32)}  # rows / images
GPU_QUICK_SIZES = {"conv3d": (16384,), "clip": (32,), "siglip": (32,)}
CPU_SIZES = {"conv3d": (64,), "clip": (2,), "siglip": (2,)}


@dataclass
class EmbedInputs:
    x: Tensor  # rows [N, K] or pixels [B, C, H, W]
    weight: Tensor  # Conv weight [E, C, (T,) P, P]
    bias: Tensor | None
    pos: Tensor | None  # [L (+1), E]
    cls: Tensor | None
    dy: Tensor | None

    def leaves(self) -> list[Tensor]:
        return [t for t in (self.x, self.weight, self.bias, self.pos, self.cls) if t is not None]


def _geometry(params: dict):
    C, T, P, E, image, cls, bias = params["model"]
    K = C * T * P * P
    if params["style"] == "conv3d":
        return K, E, params["size"], params["size"]
    L = (image // P) ** 2
    return K, E, params["size"] * L, params["size"] * (L + cls)


def _make_inputs(params: dict, device: torch.device) -> EmbedInputs:
    C, T, P, E, image, cls, bias = params["model"]
    dtype = getattr(torch, params["dtype"])
    grad = params["pass"] == "fwd+bwd"
    randn = lambda *s, scale=1.0: (torch.randn(*s, device=device, dtype=dtype) * scale).requires_grad_(grad)
    K, _, _, rows = _geometry(params)
    if params["style"] == "conv3d":
        x, weight = randn(params["size"], K), randn(E, C, T, P, P, scale=K ** -0.5)
        pos = None
    else:
        x, weight = randn(params["size"], C, image, image), randn(E, C, P, P, scale=K ** -0.5)
        pos = randn((image // P) ** 2 + cls, E)
    out_shape = (rows, E) if params["style"] == "conv3d" else (params["size"], rows // params["size"], E)
    return EmbedInputs(x, weight, randn(E) if bias else None, pos, randn(E) if cls else None,
                       torch.randn(out_shape, device=device, dtype=dtype) if grad else None)


def cases(quick: bool, device: torch.device) -> list[Case]:
    gpu = device.type == "cuda"
    models = MODELS if gpu else CPU_MODELS
    sizes = (GPU_QUICK_SIZES if quick else GPU_SIZES) if gpu else CPU_SIZES
    # The Triton interpreter multiplies raw bf16 bits in tl.dot: CPU smoke runs use fp16.
    dtype, short = ("bfloat16", "bf16") if gpu else ("float16", "fp16")
    out = []
    for style, model in models.items():
        for pass_ in ("fwd", "fwd+bwd"):
            for size in sizes[style]:
                params = {"style": style, "pass": pass_, "size": size, "model": model, "dtype": dtype}
                K, E, patches, _ = _geometry(params)
                flops = 2 * patches * K * E * (3 if pass_ == "fwd+bwd" else 1)
                unit = "rows" if style == "conv3d" else "img"
                out.append(Case(f"{style}-{pass_}-{size}{unit}-E{E}-{short}", params,
                                partial(_make_inputs, params), flops=flops))
    return out


# ---- implementations -------------------------------------------------------------


def hf_conv(i: EmbedInputs) -> Tensor:
    """Hugging Face's computation (Qwen2_5_VisionPatchEmbed, CLIP/SigLIP embeddings)."""
    w = i.weight
    if w.dim() == 5:
        return F.conv3d(i.x.view(-1, *w.shape[1:]), w, stride=w.shape[2:]).view(-1, w.shape[0])
    out = F.conv2d(i.x, w, i.bias, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    if i.cls is not None:
        out = torch.cat([i.cls.expand(out.shape[0], 1, -1), out], dim=1)
    return out + i.pos


def torch_linear(i: EmbedInputs) -> Tensor:
    """A plain GEMM with an explicit im2col copy and a separate epilogue."""
    w = i.weight
    if w.dim() == 5:
        return F.linear(i.x, w.reshape(w.shape[0], -1), i.bias)
    B, C, H, W = i.x.shape
    P = w.shape[-1]
    rows = i.x.reshape(B, C, H // P, P, W // P, P).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * P * P)
    out = F.linear(rows, w.reshape(w.shape[0], -1), i.bias)
    if i.cls is not None:
        out = torch.cat([i.cls.expand(B, 1, -1), out], dim=1)
    return out + i.pos


def mmfast_embed(i: EmbedInputs) -> Tensor:
    from mmfast.ops import patch_embed, patch_embed_patchified

    if i.weight.dim() == 5:
        return patch_embed_patchified(i.x, i.weight, i.bias, backend="triton")
    return patch_embed(i.x, i.weight, i.bias, i.pos, i.cls, backend="triton")


def _timed(case: Case, fn):
    if case.params["pass"] == "fwd":
        def run(i: EmbedInputs):
            with torch.no_grad():
                return fn(i)
    else:
        def run(i: EmbedInputs):
            return torch.autograd.grad(fn(i), i.leaves(), i.dy)
    return run


def _skip_mmfast(case: Case, device: torch.device) -> str | None:
    import mmfast.ops.patch_embed  # noqa: F401  (registers the "patch_embed" backends)
    from mmfast.dispatch import Call, op_family

    call = Call(device=device, dtype=getattr(torch, case.params["dtype"]))
    return "; ".join(op_family("patch_embed").backends["triton"].reasons(call)) or None


def _build_compile(case: Case):
    torch.compiler.reset()  # a fresh compile per case (see the norm suite)
    return _timed(case, torch.compile(torch_linear))


def _skip_compile(case: Case, device: torch.device) -> str | None:
    return cpu_compile_skip(device)


SUITE = Suite(
    name="patch_embed",
    description="ViT patch embedding: Qwen2.5-VL Conv3d rows, CLIP-L/14@336, SigLIP-so400m@384; fwd, fwd+bwd",
    bound="compute",
    cases=cases,
    providers=(
        Provider("mmfast-triton", lambda case: _timed(case, mmfast_embed), _skip_mmfast),
        Provider("hf-conv", lambda case: _timed(case, hf_conv)),
        Provider("torch-linear", lambda case: _timed(case, torch_linear)),
        Provider("torch-compile", _build_compile, _skip_compile),
    ),
    plot_x="size",
    plot_panels=("style", "pass"),
    targets=(Target("mmfast-triton", 0.5,
                    "mmfast's own goal: a GEMM with K = 588..1176 should reach half the bf16 matmul peak"),),
    speedups=(
        Speedup("mmfast-triton", ("hf-conv",), 5.0, "issue 4: >= 5x the Hugging Face Conv3d path",
                {"style": "conv3d"}),
        Speedup("mmfast-triton", ("torch-linear",), 1.0,
                "issue 4: >= 1.0x F.linear + separate bias/position add (the fused epilogue saves its bytes)"),
    ),
)
