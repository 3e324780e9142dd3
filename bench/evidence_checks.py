"""Stage 1 of the GPU evidence run: every kernel family once, at one real model shape,
against float64 (the flash-attention rule of :mod:`mmfast.testing`), outputs and every
input gradient, with the backend forced so that nothing falls back silently.

A :class:`Spec` builds its inputs at ``"real"`` size (a target model's shape: Qwen2.5-VL
window attention at head dim 80, CLIP ViT-L patches, SD1.5 GroupNorm, ...) or ``"tiny"``
size (the CPU dry run, under the Triton interpreter). The worker process sets
``MMFAST_POISON_OUTPUTS=1`` before the kernels are imported, so every output starts as
NaN and an element a kernel forgets to write fails the check.

The CUDA C++ kernels (csrc/) come last, with ``needs_cuda_build``: their library is
built in the background while the Triton checks run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mmfast.testing import random_tensor, reference_errors


@dataclass
class CheckCase:
    """What :func:`mmfast.testing.reference_errors` takes, plus a shape description."""

    op: Callable
    reference: Callable
    inputs: dict[str, Any]
    grad_inputs: tuple[str, ...] = ()
    summed_over: dict[str, int] = field(default_factory=dict)
    shape: str = ""


@dataclass(frozen=True)
class Spec:
    name: str
    family: str
    backend: str
    build: Callable[[str, torch.dtype, torch.device], CheckCase]
    needs_cuda_build: bool = False


def _cu(lengths, device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _finite(lse):
    # A query that sees no key has lse -inf on both sides; compare a finite stand-in.
    return lse.masked_fill(lse.isinf(), 0.0)


def _grads(inputs, names):
    return tuple(n for n in names if inputs.get(n) is not None)


# ---- norm ----------------------------------------------------------------------------


def _norm(is_rms: bool, backend: str):
    from mmfast.ops.norm import norm_reference

    def build(size, dtype, device):
        shape = (4096, 1280) if size == "real" else (5, 72)
        n = shape[-1]
        inputs = {"x": random_tensor(shape, dtype, device, scale=2.0, offset=0.5),
                  "weight": random_tensor((n,), dtype, device, scale=0.5, offset=1.0),
                  "bias": None if is_rms else random_tensor((n,), dtype, device, scale=0.5),
                  "residual": random_tensor(shape, dtype, device), "eps": 1e-6}

        def op(x, weight, bias, residual, eps):
            import mmfast
            if is_rms:
                return mmfast.ops.rms_norm(x, weight, eps, residual=residual, backend=backend)
            return mmfast.ops.layer_norm(x, weight, bias, eps, residual=residual, backend=backend)

        def reference(x, weight, bias, residual, eps):
            return norm_reference(x, weight, bias, residual, eps, is_rms)

        return CheckCase(op, reference, inputs, _grads(inputs, ("x", "weight", "bias", "residual")),
                         {"grad of weight": shape[0], "grad of bias": shape[0]}, "x".join(map(str, shape)))

    return build


# ---- attention -----------------------------------------------------------------------


def _attention(backend: str, *, layout: str, rotary: bool = False):
    """``layout``: "windows" (Qwen2.5-VL window layers: 64-token segments, hd 80),
    "packed" (full-attention layers: long segments, hd 80), "padded" (a GQA decoder
    prefill, causal, hd 128)."""
    from mmfast.ops.attention import attention_reference
    from mmfast.ops.rotary import rotary_reference

    def build(size, dtype, device):
        real = size == "real"
        batch, causal = None, False
        if layout == "windows":
            lengths, heads, kv_heads, dim = ([64] * 30 + [36, 64, 16], 16, 16, 80) if real else ([5, 16, 3], 2, 2, 32)
        elif layout == "packed":
            lengths, heads, kv_heads, dim = ([1024, 777, 1, 2048], 16, 16, 80) if real else ([7, 0, 23], 2, 1, 32)
        else:
            batch, causal = 2, True
            lengths, heads, kv_heads, dim = ([1024], 28, 4, 128) if real else ([9], 4, 2, 32)
        cu = None if batch else _cu(lengths, device)
        max_len = None if batch else max(lengths)
        lead = (batch, lengths[0]) if batch else (sum(lengths),)
        inputs = {"q": random_tensor((*lead, heads, dim), dtype, device),
                  "k": random_tensor((*lead, kv_heads, dim), dtype, device),
                  "v": random_tensor((*lead, kv_heads, dim), dtype, device)}
        table = None
        if rotary:
            angles = torch.rand(*lead[-1:], dim // 2, dtype=torch.float64) * 6.3
            table = (angles.cos().float().to(device), angles.sin().float().to(device))

        def op(q, k, v):
            import mmfast
            out, lse = mmfast.ops.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                            max_seqlen_k=max_len, causal=causal, rotary=table,
                                            return_lse=True, backend=backend)
            return out, _finite(lse)

        def reference(q, k, v):
            if table is not None:
                q, k = rotary_reference(q, *table), rotary_reference(k, *table)
            out, lse = attention_reference(q, k, v, cu, cu, -1, 0 if causal else -1, None, upcast=False)
            return out, _finite(lse)

        shape = f"{'batch ' + str(batch) + ' x ' if batch else ''}{len(lengths)} segments, {sum(lengths)} tokens, " \
                f"{heads}/{kv_heads} heads, hd {dim}{', causal' if causal else ''}{', rotary' if rotary else ''}"
        # cuda_short is forward only (it refuses inputs that require grad).
        grads = () if backend == "cuda_short" else ("q", "k", "v")
        return CheckCase(op, reference, inputs, grads, {}, shape)

    return build


def _cross_attention(backend: str):
    from mmfast.ops.cross_attention import cross_attention_reference

    def build(size, dtype, device):
        # A Q-Former / resampler over image tokens: few queries, many keys, gate + residual.
        lq, lk, heads, dim = ([64, 32], [4096, 577], 8, 128) if size == "real" else ([3, 17], [30, 2], 2, 64)
        cu_q, cu_k = _cu(lq, device), _cu(lk, device)
        inputs = {"q": random_tensor((sum(lq), heads, dim), dtype, device),
                  "k": random_tensor((sum(lk), heads, dim), dtype, device),
                  "v": random_tensor((sum(lk), heads, dim), dtype, device),
                  "gate": random_tensor((heads,), dtype, device, scale=0.7),
                  "residual": random_tensor((sum(lq), heads, dim), dtype, device)}

        def op(**t):
            import mmfast
            return mmfast.ops.cross_attention(**t, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend)

        def reference(q, k, v, gate, residual):
            return cross_attention_reference(q, k, v, cu_q, cu_k, None, None, gate, residual, upcast=False)

        return CheckCase(op, reference, inputs, tuple(inputs), {"grad of gate": sum(lq) * heads},
                         f"queries {lq}, keys {lk}, {heads} heads, hd {dim}, gate + residual")

    return build


def _rotary(backend: str):
    from mmfast.ops.rotary import rotary_reference

    def build(size, dtype, device):
        tokens, heads, dim = (4096, 16, 80) if size == "real" else (37, 4, 80)
        angles = random_tensor((tokens, dim // 2), torch.float32, device, scale=3.0)
        inputs = {"q": random_tensor((tokens, heads, dim), dtype, device),
                  "k": random_tensor((tokens, heads, dim), dtype, device),
                  "cos": angles.cos(), "sin": angles.sin()}

        def op(q, k, cos, sin):
            import mmfast
            return mmfast.ops.apply_rotary(q, k, cos, sin, backend=backend)

        def reference(q, k, cos, sin):
            return rotary_reference(q, cos, sin), rotary_reference(k, cos, sin)

        return CheckCase(op, reference, inputs, ("q", "k"), {}, f"{tokens} tokens, {heads} heads, hd {dim}")

    return build


# ---- vision --------------------------------------------------------------------------


def _patch_embed(backend: str):
    from mmfast.ops.patch_embed import patch_embed_reference

    def build(size, dtype, device):
        # CLIP ViT-L/14 at 336 px: class token and position table fused.
        B, C, H, E, P = (4, 3, 336, 1024, 14) if size == "real" else (2, 3, 28, 48, 14)
        L = (H // P) ** 2 + 1
        inputs = {"pixels": random_tensor((B, C, H, H), dtype, device),
                  "weight": random_tensor((E, C, P, P), dtype, device, scale=0.1),
                  "bias": None, "pos_embed": random_tensor((L, E), dtype, device),
                  "class_embed": random_tensor((E,), dtype, device)}

        def op(pixels, weight, bias, pos_embed, class_embed):
            import mmfast
            return mmfast.ops.patch_embed(pixels, weight, bias, pos_embed, class_embed, backend=backend)

        return CheckCase(op, patch_embed_reference, inputs, _grads(inputs, tuple(inputs)),
                         {"grad of weight": B * L, "grad of pos_embed": B, "grad of class_embed": B},
                         f"{B}x{C}x{H}x{H}, patch {P}, width {E}")

    return build


def _patch_embed_patchified(backend: str):
    from mmfast.ops.patch_embed import patch_embed_patchified_reference

    def build(size, dtype, device):
        # Qwen2.5-VL: 2 frames x 3 channels x 14 x 14 pixels per row, width 1280.
        n, e = (4096, 1280) if size == "real" else (37, 40)
        inputs = {"x": random_tensor((n, 3 * 2 * 14 * 14), dtype, device),
                  "weight": random_tensor((e, 3, 2, 14, 14), dtype, device, scale=0.05), "bias": None}

        def op(x, weight, bias):
            import mmfast
            return mmfast.ops.patch_embed_patchified(x, weight, bias, backend=backend)

        return CheckCase(op, patch_embed_patchified_reference, inputs, ("x", "weight"),
                         {"grad of weight": n}, f"{n} x 1176 -> {e}")

    return build


def _activation(kind: str, backend: str):
    from mmfast.ops.activation import activation_reference, gated_reference

    def build(size, dtype, device):
        rows, width = (8192, 4304) if size == "real" else (7, 96)
        if kind in ("swiglu", "geglu"):
            inputs = {"gate": random_tensor((rows, width), dtype, device, scale=3.0),
                      "up": random_tensor((rows, width), dtype, device, scale=3.0)}

            def op(gate, up):
                import mmfast
                return getattr(mmfast.ops, kind)(gate, up, backend=backend)

            act = "silu" if kind == "swiglu" else "gelu"
            return CheckCase(op, lambda gate, up: gated_reference(gate, up, act), inputs, ("gate", "up"), {},
                             f"{rows}x{width} x2")
        inputs = {"x": random_tensor((rows, width), dtype, device, scale=3.0)}

        def plain(x):
            import mmfast
            if kind == "quick_gelu":
                return mmfast.ops.quick_gelu(x, backend=backend)
            return mmfast.ops.gelu(x, "tanh" if kind == "gelu_tanh" else "none", backend=backend)

        return CheckCase(plain, lambda x: activation_reference(x, kind), inputs, ("x",), {}, f"{rows}x{width}")

    return build


def _contrastive(kind: str, backend: str):
    from mmfast.ops.contrastive import clip_loss_reference, nt_xent_reference, siglip_loss_reference

    def build(size, dtype, device):
        b, d = (1024, 768) if size == "real" else (37, 24)
        scale = torch.tensor(100.0 if kind == "clip" else 10.0, device=device)
        x, y = random_tensor((b, d), dtype, device), random_tensor((b, d), dtype, device)
        if kind == "nt_xent":
            inputs = {"z": torch.cat([x, y]), "temperature": torch.tensor(0.1, device=device)}

            def op(z, temperature):
                import mmfast
                return mmfast.ops.nt_xent_loss(z, temperature, backend=backend)

            return CheckCase(op, nt_xent_reference, inputs, ("z", "temperature"),
                             {"grad of temperature": 2 * b * d}, f"{2 * b} x {d}")
        inputs = {"image_features": x, "text_features": y, "logit_scale": scale}
        summed = {"grad of logit_scale": b * d, "grad of logit_bias": b * d}
        if kind == "clip":
            def op(image_features, text_features, logit_scale):
                import mmfast
                return mmfast.ops.clip_loss(image_features, text_features, logit_scale, backend=backend)

            return CheckCase(op, clip_loss_reference, inputs, tuple(inputs), summed, f"{b} x {d}")
        inputs["logit_bias"] = torch.tensor(-10.0, device=device)

        def sig(image_features, text_features, logit_scale, logit_bias):
            import mmfast
            return mmfast.ops.siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=backend)

        return CheckCase(sig, siglip_loss_reference, inputs, tuple(inputs), summed, f"{b} x {d}")

    return build


def _linear_cross_entropy(backend: str):
    from mmfast.ops.linear_cross_entropy import linear_cross_entropy_reference

    def build(size, dtype, device):
        n, c, v = (2048, 2048, 32003) if size == "real" else (37, 24, 53)
        gen = torch.Generator().manual_seed(0)
        target = torch.randint(0, v, (n,), generator=gen)
        target[torch.randperm(n, generator=gen)[:3]] = -100
        target = target.to(device)
        inputs = {"hidden": random_tensor((n, c), dtype, device, generator=gen),
                  "weight": random_tensor((v, c), dtype, device, scale=0.5, generator=gen)}

        def op(hidden, weight):
            import mmfast
            return mmfast.ops.linear_cross_entropy(hidden, weight, target, backend=backend)

        def reference(hidden, weight):
            return linear_cross_entropy_reference(hidden, weight, target, None)

        return CheckCase(op, reference, inputs, ("hidden", "weight"), {"grad of weight": n},
                         f"{n} rows x {c} -> vocab {v}")

    return build


# ---- diffusion -----------------------------------------------------------------------


def _group_norm(backend: str):
    from mmfast.ops.group_norm import group_norm_reference

    def build(size, dtype, device):
        # SD1.5 UNet at 512 px, first level: 320 channels, 32 groups, 64 x 64 latents.
        shape, groups = ((2, 320, 64, 64), 32) if size == "real" else ((1, 8, 37, 29), 2)
        inputs = {"x": random_tensor(shape, dtype, device, scale=2.0, offset=0.5),
                  "weight": random_tensor(shape[1:2], dtype, device, scale=0.5, offset=1.0),
                  "bias": random_tensor(shape[1:2], dtype, device, scale=0.5),
                  "num_groups": groups, "eps": 1e-5, "activation": "silu"}

        def op(x, weight, bias, num_groups, eps, activation):
            import mmfast
            return mmfast.ops.group_norm(x, num_groups, weight, bias, eps, activation, backend=backend)

        rows = shape[0] * shape[2] * shape[3]
        return CheckCase(op, group_norm_reference, inputs, ("x", "weight", "bias"),
                         {"grad of weight": rows, "grad of bias": rows},
                         f"{'x'.join(map(str, shape))}, {groups} groups, +SiLU")

    return build


def _adaln(kind: str, backend: str):
    from mmfast.ops.adaln import adaln_modulate_reference, gated_residual_reference

    def build(size, dtype, device):
        B, T, C = (2, 4096, 1536) if size == "real" else (2, 7, 80)  # SD3-medium MM-DiT at 1024 px
        if kind == "modulate":
            inputs = {"x": random_tensor((B, T, C), dtype, device, scale=2.0, offset=0.5),
                      "shift": random_tensor((B, C), dtype, device),
                      "scale": random_tensor((B, C), dtype, device, scale=0.5), "eps": 1e-6}

            def op(x, shift, scale, eps):
                import mmfast
                return mmfast.ops.adaln_modulate(x, shift, scale, eps, backend=backend)

            return CheckCase(op, adaln_modulate_reference, inputs, ("x", "shift", "scale"),
                             {"grad of shift": T, "grad of scale": T}, f"{B}x{T}x{C}")
        inputs = {"x": random_tensor((B, T, C), dtype, device), "gate": random_tensor((B, C), dtype, device),
                  "y": random_tensor((B, T, C), dtype, device)}

        def gated(x, gate, y):
            import mmfast
            return mmfast.ops.gated_residual(x, gate, y, backend=backend)

        return CheckCase(gated, gated_residual_reference, inputs, ("x", "gate", "y"), {"grad of gate": T},
                         f"{B}x{T}x{C}")

    return build


def _guided_step(backend: str):
    from mmfast.ops import StepCoefficients, guided_step

    coefficients = StepCoefficients(px=1.7, pm=-0.6, cx=0.8, cm=-0.3, c0=0.45, c1=-0.2, cn=0.15, clip=1.5)

    def run_with(which):
        def run(sample, model_output, prev_x0, noise):
            x0 = torch.empty_like(sample, dtype=model_output.dtype)
            out = guided_step(sample, model_output, coefficients, guidance_scale=7.5, guidance_rescale=0.7,
                              prev_x0=prev_x0, noise=noise, x0_out=x0, backend=which)
            return out, x0
        return run

    def build(size, dtype, device):
        shape = (2, 4, 128, 128) if size == "real" else (3, 5, 7, 9)  # SDXL latents at 1024 px
        inputs = {"sample": random_tensor(shape, dtype, device),
                  "model_output": random_tensor((2 * shape[0], *shape[1:]), dtype, device),
                  "prev_x0": random_tensor(shape, dtype, device), "noise": random_tensor(shape, dtype, device)}
        # Inference only: no gradients. The reference is the torch backend (in float64 too).
        return CheckCase(run_with(backend), run_with("torch"), inputs, (), {}, "x".join(map(str, shape)))

    return build


# ---- the table -----------------------------------------------------------------------

def specs() -> list[Spec]:
    """Every kernel family, in order of value: the production paths of the target models
    first, the CUDA C++ kernels last (their library builds meanwhile)."""
    return [
        Spec("attention-windows-rotary", "attention", "triton_short", _attention("triton_short", layout="windows", rotary=True)),
        Spec("attention-windows", "attention", "triton_short", _attention("triton_short", layout="windows")),
        Spec("attention-packed", "attention", "triton", _attention("triton", layout="packed")),
        Spec("attention-packed-rotary", "attention", "triton", _attention("triton", layout="packed", rotary=True)),
        Spec("attention-padded-causal-gqa", "attention", "triton", _attention("triton", layout="padded")),
        Spec("norm-rms", "norm", "triton", _norm(True, "triton")),
        Spec("norm-layer", "norm", "triton", _norm(False, "triton")),
        Spec("activation-gelu", "activation", "triton", _activation("gelu", "triton")),
        Spec("activation-gelu_tanh", "activation", "triton", _activation("gelu_tanh", "triton")),
        Spec("activation-quick_gelu", "activation", "triton", _activation("quick_gelu", "triton")),
        Spec("activation-swiglu", "activation", "triton", _activation("swiglu", "triton")),
        Spec("activation-geglu", "activation", "triton", _activation("geglu", "triton")),
        Spec("patch_embed-clip", "patch_embed", "triton", _patch_embed("triton")),
        Spec("patch_embed-patchified", "patch_embed", "triton", _patch_embed_patchified("triton")),
        Spec("rotary", "rotary", "triton", _rotary("triton")),
        Spec("cross_attention", "cross_attention", "triton", _cross_attention("triton")),
        Spec("group_norm-silu", "group_norm", "triton", _group_norm("triton")),
        Spec("adaln-modulate", "adaln", "triton", _adaln("modulate", "triton")),
        Spec("adaln-gated_residual", "adaln", "triton", _adaln("gated", "triton")),
        Spec("scheduler_step", "scheduler_step", "triton", _guided_step("triton")),
        Spec("contrastive-clip", "contrastive", "triton", _contrastive("clip", "triton")),
        Spec("contrastive-siglip", "contrastive", "triton", _contrastive("siglip", "triton")),
        Spec("contrastive-nt_xent", "contrastive", "triton", _contrastive("nt_xent", "triton")),
        Spec("linear_cross_entropy", "linear_cross_entropy", "triton", _linear_cross_entropy("triton")),
        Spec("cuda-attention-windows", "attention", "cuda_short",
             _attention("cuda_short", layout="windows"), needs_cuda_build=True),
        Spec("cuda-norm-rms", "norm", "cuda", _norm(True, "cuda"), needs_cuda_build=True),
        Spec("cuda-norm-layer", "norm", "cuda", _norm(False, "cuda"), needs_cuda_build=True),
        Spec("cuda-group_norm-silu", "group_norm", "cuda", _group_norm("cuda"), needs_cuda_build=True),
        Spec("cuda-scheduler_step", "scheduler_step", "cuda", _guided_step("cuda"), needs_cuda_build=True),
    ]


def spec(name: str) -> Spec:
    for s in specs():
        if s.name == name:
            return s
    raise KeyError(f"no stage-1 check named '{name}'")


def run_check(s: Spec, size: str, dtype: torch.dtype, device: torch.device) -> dict:
    """One check: a result row with every output's and gradient's error against float64,
    eager's error and the bound; ``status`` "ok", "fail" (a bound or NaN), or "error"."""
    row: dict[str, Any] = {"check": s.name, "family": s.family, "backend": s.backend,
                           "dtype": str(dtype).removeprefix("torch."), "size": size}
    start = time.perf_counter()
    try:
        case = s.build(size, dtype, device)
        row["shape"] = case.shape
        results = reference_errors(case.op, case.reference, case.inputs, grad_inputs=case.grad_inputs,
                                   summed_over=case.summed_over)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row["results"] = results
        row["status"] = "ok" if all(r["ok"] for r in results) else "fail"
    except Exception as e:  # a check that raises is evidence too: record it, go on
        row["status"] = "error"
        row["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row
