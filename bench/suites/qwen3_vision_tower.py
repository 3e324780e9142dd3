"""The whole Qwen3-VL-8B vision tower (depth 27, hidden 1152, 16 heads of head dim 72,
GELU-tanh MLP 4304, patch 16, a learned 48 x 48 position grid, full attention per frame,
DeepStack mergers after blocks 8/16/24; random weights), bf16 on a GPU, forward and
forward+backward. Every provider returns (and backward flows through) the merged tokens
and the three DeepStack feature maps.

Cases: one 1344 px image (issue 19's case, 7056 patches); single images of 1024, 1792 and
2048 px (4k, 12.5k and 16k patches per image, the range the attention target names); a
mixed batch (448, 896, 1344 px and a 672 x 1344 px image); an 8-temporal-patch video at
448 px. Forward+backward only up to 16k patches (saved activations of 27 layers outgrow
an 80 GB GPU beyond).

Providers (same random weights, loaded from one Hugging Face tower):
- ``mmfast``: mmfast.nn.Qwen3VisionTransformer (packed varlen Triton attention over all
  frames at once with the rotary fused, fused residual+LayerNorm, fused GELU-tanh, the
  position grid as one embedding_bag pass added inside the first norm; index plumbing
  and grid taps cached per grid);
- ``mmfast-patched-hf``: the Hugging Face tower after ``mmfast.patch``;
- ``hf-sdpa``: transformers' Qwen3VLVisionModel with attn_implementation="sdpa" (a Python
  loop over the frames, one SDPA call each);
- ``hf-sdpa-compile``: the same under torch.compile (compiled afresh per case);
- ``hf-flash-attention-2``: attn_implementation="flash_attention_2" when flash-attn is
  installed (flash-attn's varlen kernel inside the HF tower).

FLOP model (useful work, 2 flops per multiply-add), d = 1152, I = 4304: per patch and
layer 2 * (4 d^2 + 2 d I); attention 4 * d * L per patch for the L patches of its frame;
the patch embedding 2 * 1536 * d a patch; each of the 4 mergers 2 * (16 d^2 + 4 d * 4096)
per merged token. Backward counts twice the forward.

Targets (issue 19, H100, bf16; ``Speedup`` goals checked on GPU runs): forward >= 2x
hf-sdpa and >= 1.2x hf-sdpa-compile on the 1344 px image and the mixed batch. (The
attention-at-50%-of-peak target is the attention suite's, at head dim 72.)

On a CPU the cases shrink to a 2-block tower of width 64 on one small image: a smoke run
of the code paths (timings there mean nothing).
"""

from __future__ import annotations

from functools import partial

import torch

from mmfast.bench.suite import Case, Speedup, Suite
from mmfast.bench.suites.qwen_tower_providers import MAX_BACKWARD_PATCHES, TowerModel, tower_inputs, tower_providers

QWEN3_VL_8B = {"depth": 27, "hidden_size": 1152, "num_heads": 16, "intermediate_size": 4304,
               "out_hidden_size": 4096, "patch_size": 16, "num_position_embeddings": 2304,
               "deepstack_visual_indexes": [8, 16, 24]}
TINY = {"depth": 2, "hidden_size": 64, "num_heads": 2, "intermediate_size": 96, "out_hidden_size": 64,
        "patch_size": 16, "num_position_embeddings": 16, "deepstack_visual_indexes": [0]}

PATCH = 16
PATCH_DIM = 3 * 2 * PATCH * PATCH


def _hf_classes():
    from transformers import Qwen3VLConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    return Qwen3VLConfig, Qwen3VLVisionModel


def _mmfast_class():
    from mmfast.nn.qwen3_vision import Qwen3VisionTransformer

    return Qwen3VisionTransformer


def _mmfast_outputs(out):
    return (out.merged, *out.deepstack)


def _hf_outputs(out):
    return (out.pooler_output, *out.deepstack_features)


QWEN3_VL = TowerModel("qwen3-vl", QWEN3_VL_8B, TINY, _hf_classes, _mmfast_class, _mmfast_outputs, _hf_outputs)


# ---- cases -----------------------------------------------------------------------

def _flops(config: dict, grid: list[list[int]], backward: bool) -> int:
    d, inter = config["hidden_size"], config["intermediate_size"]
    patches = sum(t * h * w for t, h, w in grid)
    pairs = sum(t * (h * w) ** 2 for t, h, w in grid)  # each frame attends over itself
    projections = 2 * (4 * d * d + 2 * d * inter) * patches * config["depth"]
    attention = 4 * d * pairs * config["depth"]
    embed = 2 * PATCH_DIM * d * patches
    mergers = 1 + len(config["deepstack_visual_indexes"])
    merger = mergers * 2 * (16 * d * d + 4 * d * config["out_hidden_size"]) * (patches // 4)
    forward = projections + attention + embed + merger
    return forward * (3 if backward else 1)


def _side(px: int) -> int:
    return px // PATCH


# name -> grid rows (t, h, w) in patches; t counts temporal patches (2 frames each)
GPU_SHAPES = {
    "1img-1344px": [[1, _side(1344), _side(1344)]],
    "1img-1024px": [[1, _side(1024), _side(1024)]],
    "1img-1792px": [[1, _side(1792), _side(1792)]],
    "1img-2048px": [[1, _side(2048), _side(2048)]],
    "mixed-4img": [[1, _side(448), _side(448)], [1, _side(896), _side(896)], [1, _side(1344), _side(1344)],
                   [1, _side(672), _side(1344)]],
    "video16f-448px": [[8, _side(448), _side(448)]],
}
GPU_QUICK = ("1img-1344px", "mixed-4img", "video16f-448px")
CPU_SHAPES = {"1img-128px": [[1, 8, 8]], "mixed-2img": [[1, 8, 8], [2, 4, 6]]}


def cases(quick: bool, device: torch.device) -> list[Case]:
    if device.type == "cuda":
        config, dtype = QWEN3_VL_8B, torch.bfloat16
        shapes = {k: v for k, v in GPU_SHAPES.items() if not quick or k in GPU_QUICK}
    else:
        config, dtype = TINY, torch.float32
        shapes = {k: v for k, v in CPU_SHAPES.items() if not quick or k == "1img-128px"}
    out = []
    for what, grid in shapes.items():
        patches = sum(t * h * w for t, h, w in grid)
        for pass_ in ("fwd", "fwd+bwd"):
            if pass_ == "fwd+bwd" and patches > MAX_BACKWARD_PATCHES:
                continue
            params = {"pass": pass_, "shape": what, "images": len(grid), "patches": patches, "grid": grid,
                      "dtype": str(dtype).removeprefix("torch."), "tiny": config is TINY,
                      "out_dim": config["out_hidden_size"], "outputs": 1 + len(config["deepstack_visual_indexes"])}
            inputs = partial(tower_inputs, params, patch_dim=PATCH_DIM, outputs=params["outputs"])
            out.append(Case(f"{what}-{pass_}", params, inputs, flops=_flops(config, grid, pass_ == "fwd+bwd")))
    return out


ISSUE_CASES = ("1img-1344px", "mixed-4img")

SUITE = Suite(
    name="qwen3_vision_tower",
    description="Qwen3-VL-8B vision tower (27 blocks, full attention, DeepStack), fwd and fwd+bwd",
    bound="compute",
    cases=cases,
    providers=tower_providers(QWEN3_VL),
    plot_x="patches",
    plot_panels=("pass",),
    speedups=(
        Speedup("mmfast", ("hf-sdpa",), 2.0, "issue 19: Qwen3-VL-8B tower forward >= 2x Hugging Face sdpa",
                {"pass": "fwd", "shape": ISSUE_CASES}),
        Speedup("mmfast", ("hf-sdpa-compile",), 1.2,
                "issue 19: forward >= 1.2x Hugging Face sdpa + torch.compile", {"pass": "fwd", "shape": ISSUE_CASES}),
    ),
)
