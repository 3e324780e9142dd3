"""DiT joint attention with rotary positions and per-head q/k RMSNorm (issue 20): what a
FLUX / FLUX.2 single-stream block and a Wan 2.1 block run between their projections;
forward and forward+backward, bf16 on a GPU.

- ``flux``: FLUX.1 / FLUX.2 at 1024 x 1024 px: 4096 image + 512 text tokens, 24 heads,
  head dim 128, the per-head RMSNorm of q and k (weights [128], eps 1e-6) then the 3-axis
  rotary table (a per-token [T, 64] table), as ``mmfast.nn.flux_attention`` runs it.
- ``wan``: Wan2.1-T2V-1.3B at 480p, 33 frames: 9 latent frames of 30 x 52 patches =
  14040 tokens, 12 heads, head dim 128, rotary only (Wan's q/k RMSNorm is over all heads'
  features, dim 1536, not per head, so it stays a separate pass in every provider's model
  and is left out here).

Inputs are padded [1, T, H, D] (one sequence), the weights require grad in fwd+bwd (they
are trained), the gradients taken are those of q, k, v and the weights.

Providers: ``mmfast-fused`` (``attention(rotary=, qk_norm=)``, backend triton: q/k
normalised and rotated inside the attention kernels), ``mmfast-separate`` (mmfast's
rms_norm and apply_rotary kernels, then mmfast attention), ``sdpa-flash`` (the same
rms_norm and apply_rotary kernels, then SDPA restricted to its flash backend),
``sdpa-flash-eager`` (diffusers' own sequence: torch's F.rms_norm, a rotate-half rotary in
eager PyTorch, SDPA flash), ``flash-attn`` (the mmfast norm and rotary kernels, then
flash_attn_func) when installed.

FLOPs: the attention's, 4 D H T^2 forward, 3.5 x that forward+backward (the norm and the
rotation add O(T H D), nothing on this scale).

Target from the issue (stated, checked on GPU runs): mmfast-fused >= 1.2x SDPA(flash)
preceded by separate norm and rotary kernels, forward and forward+backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast.bench.suite import Case, Provider, Speedup, Suite, gpu_library_skip
from mmfast.bench.suites.attention import attention_flops, mmfast_skip, sdpa_skip

EPS = 1e-6
# (group, tokens, heads, head_dim, q/k norm) at the real shapes, and CPU smoke shapes.
GPU_SHAPES = (("flux", 4096 + 512, 24, 128, True), ("wan", 9 * 30 * 52, 12, 128, False))
CPU_SHAPES = (("flux", 40, 2, 32, True), ("wan", 36, 1, 32, False))


@dataclass
class JointInputs:
    """q, k, v [1, T, H, D]; half-width rotary tables [T, D/2] (float32); the norms'
    weights [D] (None for rotary-only cases); the upstream gradient for fwd+bwd."""

    q: Tensor
    k: Tensor
    v: Tensor
    cos: Tensor
    sin: Tensor
    q_weight: Tensor | None
    k_weight: Tensor | None
    dout: Tensor | None


def _make_inputs(params: dict, device: torch.device) -> JointInputs:
    dtype = getattr(torch, params["dtype"])
    grad = params["pass"] != "fwd"
    tokens, heads, head_dim = params["tokens"], params["heads"], params["head_dim"]

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    angles = torch.rand(tokens, head_dim // 2, device=device) * 6.3
    weights = (None, None)
    if params["qk_norm"]:
        weights = tuple((1 + 0.1 * torch.randn(head_dim, device=device)).to(dtype).requires_grad_(grad)
                        for _ in range(2))
    return JointInputs(
        q=randn(1, tokens, heads, head_dim), k=randn(1, tokens, heads, head_dim), v=randn(1, tokens, heads, head_dim),
        cos=angles.cos(), sin=angles.sin(), q_weight=weights[0], k_weight=weights[1],
        dout=torch.randn(1, tokens, heads, head_dim, device=device, dtype=dtype) if grad else None)


def cases(quick: bool, device: torch.device) -> list[Case]:
    gpu = device.type == "cuda"
    # CPU: the Triton interpreter, float16 (it has no bf16 dot); fwd+bwd only in full runs.
    dtype = "bfloat16" if gpu else "float16"
    passes = ("fwd", "fwd+bwd") if gpu or not quick else ("fwd",)
    out = []
    for group, tokens, heads, head_dim, qk_norm in (GPU_SHAPES if gpu else CPU_SHAPES):
        if quick and group != "flux":
            continue
        for pass_ in passes:
            params = {"group": group, "pass": pass_, "tokens": tokens, "seqlen": tokens, "batch": 1, "heads": heads,
                      "head_dim": head_dim, "qk_norm": qk_norm, "dtype": dtype}
            short = {"bfloat16": "bf16", "float16": "fp16"}[dtype]
            name = f"{group}-{pass_}-{tokens}tok-h{heads}-d{head_dim}-{short}"
            out.append(Case(name, params, partial(_make_inputs, params),
                            flops=attention_flops([tokens], heads, head_dim, pass_)))
    return out


# ---- providers -----------------------------------------------------------------------


def _timed(case: Case, forward):
    """What is timed for the case's pass around ``forward`` (inputs -> output)."""
    if case.params["pass"] == "fwd":
        def run(i: JointInputs):
            with torch.no_grad():
                return forward(i)
        return run

    def run(i: JointInputs):
        leaves = [t for t in (i.q, i.k, i.v, i.q_weight, i.k_weight) if t is not None]
        return torch.autograd.grad(forward(i), leaves, i.dout)
    return run


def _mmfast_prepared(i: JointInputs) -> tuple[Tensor, Tensor]:
    """q, k normalised (when the case has norms) and rotated by mmfast's separate kernels."""
    from mmfast.ops import apply_rotary, rms_norm

    q, k = i.q, i.k
    if i.q_weight is not None:
        q, k = rms_norm(q, i.q_weight, EPS), rms_norm(k, i.k_weight, EPS)
    return apply_rotary(q, k, i.cos, i.sin)


def _eager_prepared(i: JointInputs) -> tuple[Tensor, Tensor]:
    """diffusers' sequence in plain PyTorch: F.rms_norm, then a rotate-half rotation."""
    q, k = i.q, i.k
    if i.q_weight is not None:
        q = F.rms_norm(q, (q.shape[-1],), i.q_weight, EPS)
        k = F.rms_norm(k, (k.shape[-1],), i.k_weight, EPS)
    cos = torch.cat([i.cos, i.cos], -1)[:, None, :]
    sin = torch.cat([i.sin, i.sin], -1)[:, None, :]

    def rotate(x):
        first, second = x.chunk(2, dim=-1)
        return (x.float() * cos + torch.cat([-second, first], -1).float() * sin).to(x.dtype)

    return rotate(q), rotate(k)


def _fused(case: Case):
    from mmfast.ops import attention

    def forward(i: JointInputs):
        qk_norm = (i.q_weight, i.k_weight, EPS) if i.q_weight is not None else None
        return attention(i.q, i.k, i.v, rotary=(i.cos, i.sin), qk_norm=qk_norm, backend="triton")

    return _timed(case, forward)


def _separate(case: Case):
    from mmfast.ops import attention

    return _timed(case, lambda i: attention(*_mmfast_prepared(i), i.v, backend="triton"))


def _sdpa_flash(prepare, case: Case):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def forward(i: JointInputs):
        q, k = prepare(i)
        q, k, v = (t.transpose(1, 2) for t in (q, k, i.v))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    return _timed(case, forward)


def _flash_attn(case: Case):
    from flash_attn import flash_attn_func

    return _timed(case, lambda i: flash_attn_func(*_mmfast_prepared(i), i.v))


def _triton_skip(case: Case, device: torch.device) -> str | None:
    return mmfast_skip("triton", case, device)


def _flash_skip(case: Case, device: torch.device) -> str | None:
    if device.type != "cuda":
        return "SDPA's flash backend runs on CUDA only"
    p = case.params
    return sdpa_skip("flash", device, p["heads"] * p["tokens"] ** 2 * 4)


_PROVIDERS = (
    Provider("mmfast-fused", _fused, _triton_skip),
    Provider("mmfast-separate", _separate, _triton_skip),
    Provider("sdpa-flash", partial(_sdpa_flash, _mmfast_prepared), _flash_skip),
    Provider("sdpa-flash-eager", partial(_sdpa_flash, _eager_prepared), _flash_skip),
    Provider("flash-attn", _flash_attn,
             lambda case, device: gpu_library_skip("flash_attn.flash_attn_interface", device, "flash-attn 2")),
)

SPEEDUPS = (
    Speedup("mmfast-fused", ("sdpa-flash",), 1.2,
            "issue 20: q/k norm + rotary fused into attention >= 1.2x SDPA(flash) after separate norm and "
            "rotary kernels"),
)

SUITE = Suite(
    name="joint_attention_rotary",
    description="FLUX / Wan joint attention with rotary and per-head q/k RMSNorm, fwd and fwd+bwd",
    bound="compute",
    cases=cases,
    providers=_PROVIDERS,
    plot_x="tokens",
    plot_panels=("group", "pass"),
    speedups=SPEEDUPS,
)
