"""The whole Qwen2.5-VL-7B-sized vision tower (depth 32, hidden 1280, 16 heads of 80,
SwiGLU 3420, 112 px windows, full attention in blocks 7/15/23/31; random weights), bf16
on a GPU, forward and forward+backward.

Cases: 1, 4 and 16 images of 448..1792 px (32..128 patches a side), and a 32-frame video
(16 temporal patches) at 448 px. Forward+backward only up to 16k patches: above that the
saved activations of 32 layers (about 1.2 MB a patch in bf16) outgrow an 80 GB GPU for
every provider alike.

Providers (same random weights, loaded from one Hugging Face tower):
- ``mmfast``: mmfast.nn.Qwen25VisionTransformer (packed varlen Triton attention over all
  windows at once, fused rotary, fused residual+RMSNorm, fused SwiGLU; window plumbing
  cached per grid);
- ``mmfast-patched-hf``: the Hugging Face tower after ``mmfast.patch``;
- ``hf-sdpa``: transformers' Qwen2_5_VisionTransformerPretrainedModel with
  attn_implementation="sdpa" (a Python loop over every window and frame);
- ``hf-sdpa-compile``: the same under torch.compile (compiled afresh per case);
- ``hf-flash-attention-2``: the same with attn_implementation="flash_attention_2", when
  flash-attn is installed (packed varlen attention inside the HF tower);
- ``vllm-style-sdpa`` / ``vllm-style-xformers``: the vLLM-style reference without
  flash-attn (bench/suites/qwen_vllm_reference.py: patch embedding as one GEMM, qkv and
  gate+up GEMMs, plain-torch RMSNorm/SwiGLU/rotary, the segments of every layer in one
  PyTorch SDPA call, or in one xformers memory_efficient_attention call over a
  BlockDiagonalMask when xformers is installed; grid indices cached).

FLOP model (useful work, 2 flops per multiply-add), per patch and layer with d = 1280,
I = 3420: projections 2 * (4 d^2 + 3 d I); attention 4 * d * L per patch for the L
patches of its segment (window or frame); plus the patch embedding (2 * 1176 * d a
patch) and the merger (2 * (16 d^2 + 4 d * 3584) per merged token). Backward counts
twice the forward (fwd+bwd = 3x forward).

Targets (issue 4, H100, bf16; ``Speedup`` goals checked on GPU runs): forward >= 5x
hf-sdpa, >= 1.5x hf-sdpa-compile and >= 1.2x the faster vLLM-style reference;
forward+backward >= 2x hf-sdpa.

On a CPU the cases shrink to a 2-block tower of width 64 on one small image: a smoke run
of the code paths (timings there mean nothing).
"""

from __future__ import annotations

from functools import partial

import torch

from mmfast.bench.suite import Case, Provider, Speedup, Suite, gpu_library_skip
from mmfast.bench.suites.qwen_tower_providers import (
    MAX_BACKWARD_PATCHES,
    Forward,
    TowerModel,
    cached,
    hf_tower,
    run_module,
    skip_hf,
    timed,
    tower_inputs,
    tower_providers,
)

QWEN25_7B = {"depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420,
             "out_hidden_size": 3584, "patch_size": 14, "window_size": 112,
             "fullatt_block_indexes": [7, 15, 23, 31]}
TINY = {"depth": 2, "hidden_size": 64, "num_heads": 2, "intermediate_size": 96, "out_hidden_size": 64,
        "patch_size": 14, "window_size": 112, "fullatt_block_indexes": [1]}

PATCH_DIM = 3 * 2 * 14 * 14


def _hf_classes():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    return Qwen2_5_VLConfig, Qwen2_5_VisionTransformerPretrainedModel


def _mmfast_class():
    from mmfast.nn import Qwen25VisionTransformer

    return Qwen25VisionTransformer


def _pooled(out):
    return out.pooler_output


QWEN25_VL = TowerModel("qwen2.5-vl", QWEN25_7B, TINY, _hf_classes, _mmfast_class, hf_outputs=_pooled)


# ---- cases -----------------------------------------------------------------------


def _grid(images: int, pixels: int, frames: int = 1) -> list[list[int]]:
    side = pixels // 14
    return [[frames, side, side]] * images


def _attention_pairs(config: dict, grid: list[list[int]]) -> tuple[int, int]:
    """(query, key) pairs of one full-attention layer and of one window layer: the sum of
    squared segment lengths, from the same index plumbing the towers use."""
    from mmfast.ops.vision_windows import qwen_vision_indices

    ix = qwen_vision_indices(torch.tensor(grid), spatial_merge_size=2, window_size=config["window_size"],
                             patch_size=config["patch_size"])
    return tuple(int((cu.diff().long() ** 2).sum()) for cu in (ix.cu_seqlens, ix.cu_window_seqlens))


def _flops(config: dict, grid: list[list[int]], backward: bool) -> int:
    d, inter = config["hidden_size"], config["intermediate_size"]
    patches = sum(t * h * w for t, h, w in grid)
    full = sum(1 for i in range(config["depth"]) if i in config["fullatt_block_indexes"])
    windowed = config["depth"] - full
    full_pairs, window_pairs = _attention_pairs(config, grid)
    projections = 2 * (4 * d * d + 3 * d * inter) * patches * config["depth"]
    attention = 4 * d * (full * full_pairs + windowed * window_pairs)
    embed = 2 * PATCH_DIM * d * patches
    merger = 2 * (16 * d * d + 4 * d * config["out_hidden_size"]) * (patches // 4)
    forward = projections + attention + embed + merger
    return forward * (3 if backward else 1)


def cases(quick: bool, device: torch.device) -> list[Case]:
    if device.type == "cuda":
        config, dtype = QWEN25_7B, torch.bfloat16
        shapes = [(n, px, 1) for n in (1, 4, 16) for px in (448, 896, 1344, 1792)] + [(1, 448, 16)]
        if quick:
            shapes = [(1, 448, 1), (4, 896, 1), (16, 1792, 1), (1, 448, 16)]
    else:
        config, dtype = TINY, torch.float32
        shapes = [(1, 112, 1)] if quick else [(1, 112, 1), (2, 224, 1)]
    out = []
    for images, px, frames in shapes:
        grid = _grid(images, px, frames)
        patches = sum(t * h * w for t, h, w in grid)
        for pass_ in ("fwd", "fwd+bwd"):
            if pass_ == "fwd+bwd" and patches > MAX_BACKWARD_PATCHES:
                continue
            what = f"video{2 * frames}f" if frames > 1 else f"{images}img"
            params = {"pass": pass_, "images": images, "pixels": px, "frames": 2 * frames, "patches": patches,
                      "grid": grid, "dtype": str(dtype).removeprefix("torch."), "tiny": config is TINY,
                      "out_dim": config["out_hidden_size"]}
            out.append(Case(f"{what}-{px}px-{pass_}", params, partial(tower_inputs, params, patch_dim=PATCH_DIM),
                            flops=_flops(config, grid, pass_ == "fwd+bwd")))
    return out


# ---- the vLLM-style reference (this suite's own providers) ---------------------------


def _reference_tower(tiny: bool, backend: str, device: torch.device, dtype: torch.dtype):
    def make():
        from mmfast.bench.suites.qwen_vllm_reference import ReferenceQwen25VisionTower

        return ReferenceQwen25VisionTower.from_hf(hf_tower(QWEN25_VL, tiny, "sdpa", device, dtype), backend)

    return cached((QWEN25_VL.name, "vllm-style", tiny, backend, device, dtype), make)


def _build_reference(case: Case, backend: str):
    return timed(case, Forward(partial(_reference_tower, case.params["tiny"], backend), run_module))


def _skip_xformers(case: Case, device: torch.device) -> str | None:
    return gpu_library_skip("xformers", device, "xformers") or skip_hf(case, device)


VLLM_STYLE = ("vllm-style-sdpa", "vllm-style-xformers")

SUITE = Suite(
    name="qwen_vision_tower",
    description="Qwen2.5-VL-7B vision tower (32 blocks, window attention), fwd and fwd+bwd",
    bound="compute",
    cases=cases,
    providers=(
        *tower_providers(QWEN25_VL),
        Provider("vllm-style-sdpa", partial(_build_reference, backend="sdpa"), skip_hf),
        Provider("vllm-style-xformers", partial(_build_reference, backend="xformers"), _skip_xformers),
    ),
    plot_x="patches",
    plot_panels=("pass", "images"),
    speedups=(
        Speedup("mmfast", ("hf-sdpa",), 5.0, "issue 4: Qwen2.5-VL-7B tower forward >= 5x Hugging Face sdpa",
                {"pass": "fwd"}),
        Speedup("mmfast", ("hf-sdpa-compile",), 1.5, "issue 4: forward >= 1.5x Hugging Face sdpa + torch.compile",
                {"pass": "fwd"}),
        Speedup("mmfast", VLLM_STYLE, 1.2, "issue 4: forward >= 1.2x the vLLM-style reference", {"pass": "fwd"}),
        Speedup("mmfast", ("hf-sdpa",), 2.0, "issue 4: forward+backward >= 2x Hugging Face sdpa",
                {"pass": "fwd+bwd"}),
    ),
)
