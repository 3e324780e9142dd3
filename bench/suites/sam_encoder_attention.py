"""SAM's image encoder attention (transformers SamVisionAttention), as Hugging Face runs it
and patched by mmfast, bf16 on a GPU; random weights, relative-position tables included.

Groups (1024 px images: a 64 x 64 patch grid):
- ``window``: one windowed layer's attention module on its windows, as SamVisionLayer hands
  them over: the grid padded to 70 x 70, 25 windows of 14 x 14 (196 tokens) per image.
- ``global``: one global layer's attention module (layers 2, 5, 8, 11 of ViT-B) over the
  whole 64 x 64 grid: 4096 tokens, where Hugging Face adds a [B * heads, 4096, 4096] bias.
- ``encoder``: the whole SamVisionModel (patch embedding, every layer, neck), forward: what
  a user of SAM times per image.
ViT-B (hidden 768, 12 heads) and ViT-H (1280, 16 heads, global layers 7, 15, 23, 31);
head dim 64 in both. Passes: forward, and forward+backward for the attention modules.

Providers (each skipped with its reason where it cannot run):
``mmfast`` (the Hugging Face sdpa module or model under ``mmfast.patch``: the bias pieces
go into mmfast.ops.attention_rel_pos, the default backend: Triton on a GPU),
``hf-sdpa`` (attn_implementation="sdpa": SDPA with the materialised bias as attn_mask),
``hf-eager`` (attn_implementation="eager": explicit scores, bias and softmax).

FLOPs: the projections (2 x tokens x 4 C^2 forward), the bias pieces (2 x tokens x heads x
(KH + KW) x 64) and the attention (4 x 64 x heads x T^2 per window or image); the MLPs,
patch embedding and neck for the encoder; forward+backward 3x the forward for the matmuls
and 3.5x for attention (the attention suite's convention).

Target from issue 19 (H100, bf16), checked on GPU runs: ViT-H encoder forward at 1024 px,
mmfast >= 2x hf-sdpa.

Without a GPU the cases are smoke shapes (hidden 128, 2 heads of 64; one 5 x 5 window, an
8 x 8 global grid, a 128 px encoder with 3 x 3 windows) in float32: the Triton interpreter
runs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from mmfast.bench.suite import Case, Provider, Speedup, Suite

HEAD_DIM = 64
PATCH = 16
MODELS = {  # hidden, heads, layers, global layers, MLP width
    "vit-b": dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=12, global_attn_indexes=[2, 5, 8, 11],
                  mlp_dim=3072),
    "vit-h": dict(hidden_size=1280, num_attention_heads=16, num_hidden_layers=32,
                  global_attn_indexes=[7, 15, 23, 31], mlp_dim=5120),
}
# Smoke shapes for the interpreter: head dim 64 as in every SAM, 2 heads.
TINY = dict(hidden_size=128, num_attention_heads=2, num_hidden_layers=2, global_attn_indexes=[1], mlp_dim=192)
GPU_IMAGE, TINY_IMAGE = 1024, 128
WINDOW = 14
TINY_WINDOW = 3  # the tiny encoder: an 8 x 8 grid in 3 x 3 windows, padded to 9 x 9 as SAM pads


@dataclass
class Inputs:
    x: Tensor                 # hidden states [N, h, w, C] (attention groups) or pixels (encoder)
    dout: Tensor | None       # the output's gradient for fwd+bwd


def grid_windows(grid: int, window: int) -> int:
    """Windows per image: the grid padded up to a multiple of ``window``, as SamVisionLayer."""
    return (-(-grid // window)) ** 2


def attention_module_flops(tokens: int, side: int, segments: int, hidden: int, heads: int) -> int:
    """Forward FLOPs of one SamVisionAttention call over ``segments`` grids of side x side
    tokens each (``tokens`` = segments * side^2)."""
    projections = 2 * tokens * 4 * hidden * hidden
    pieces = 2 * tokens * heads * 2 * side * HEAD_DIM
    scores = 4 * HEAD_DIM * heads * segments * (side * side) ** 2
    return projections + pieces + scores


def _pass_flops(forward_matmul: int, forward_attention: int, pass_: str) -> int:
    if pass_ == "fwd":
        return forward_matmul + forward_attention
    return int(3 * forward_matmul + 3.5 * forward_attention)


def encoder_flops(batch: int, image: int, window: int, config: dict) -> int:
    """Forward FLOPs of SamVisionModel: patch embedding, each layer's attention module and
    MLP, the neck (1x1 then 3x3 convolutions to 256 channels)."""
    grid = image // PATCH
    hidden, heads, mlp = config["hidden_size"], config["num_attention_heads"], config["mlp_dim"]
    tokens = batch * grid * grid
    total = 2 * tokens * 3 * PATCH * PATCH * hidden
    for layer in range(config["num_hidden_layers"]):
        if layer in config["global_attn_indexes"]:
            total += attention_module_flops(tokens, grid, batch, hidden, heads)
        else:
            windows = batch * grid_windows(grid, window)
            total += attention_module_flops(windows * window * window, window, windows, hidden, heads)
        total += 2 * tokens * 2 * hidden * mlp
    return total + 2 * tokens * (hidden * 256 + 256 * 256 * 9)


# ---- cases -----------------------------------------------------------------------


def _make_inputs(params: dict, device: torch.device) -> Inputs:
    dtype = getattr(torch, params["dtype"])
    gen = torch.Generator(device=device).manual_seed(0)
    if params["group"] == "encoder":
        shape = (params["batch"], 3, params["image"], params["image"])
        return Inputs(torch.randn(shape, device=device, dtype=dtype, generator=gen), None)
    side, segments = params["side"], params["segments"]
    grad = params["pass"] != "fwd"
    x = torch.randn(segments, side, side, params["hidden"], device=device, dtype=dtype, generator=gen)
    dout = torch.randn(x.shape, device=device, dtype=dtype, generator=gen) if grad else None
    return Inputs(x.requires_grad_(grad), dout)


def cases(quick: bool, device: torch.device) -> list[Case]:
    gpu = device.type == "cuda"
    if gpu:
        dtype, image, window, batches = "bfloat16", GPU_IMAGE, WINDOW, ((1,) if quick else (1, 4))
        models = {"vit-h": MODELS["vit-h"]} if quick else MODELS
        passes = ("fwd",) if quick else ("fwd", "fwd+bwd")
    else:  # smoke shapes for the Triton interpreter
        dtype, image, window, batches = "float32", TINY_IMAGE, TINY_WINDOW, (1,)
        models, passes = {"tiny": TINY}, ("fwd", "fwd+bwd")
    short = {"bfloat16": "bf16", "float32": "fp32"}[dtype]
    grid = image // PATCH
    out = []
    for model, config in models.items():
        hidden = config["hidden_size"]
        for batch in batches:
            for pass_ in passes:
                for group in ("window", "global"):
                    # SAM's 14 x 14 windows (smoke runs: one window of 5 x 5; the op's tests
                    # cover 14 x 14 under the interpreter).
                    side = (WINDOW if gpu else 5) if group == "window" else grid
                    segments = (batch * grid_windows(grid, WINDOW) if gpu else 1) if group == "window" else batch
                    params = {"group": group, "model": model, "pass": pass_, "batch": batch, "image": image,
                              "side": side, "segments": segments, "tokens": segments * side * side,
                              "hidden": hidden, "heads": config["num_attention_heads"], "dtype": dtype}
                    tokens = params["tokens"]
                    scores = 4 * HEAD_DIM * params["heads"] * segments * (side * side) ** 2
                    flops = _pass_flops(attention_module_flops(tokens, side, segments, hidden, params["heads"])
                                        - scores, scores, pass_)
                    out.append(Case(f"{model}-{group}-{pass_}-b{batch}-{short}", params,
                                    partial(_make_inputs, params), flops=flops))
            params = {"group": "encoder", "model": model, "pass": "fwd", "batch": batch, "image": image,
                      "window": window, "tokens": batch * grid * grid, "hidden": hidden,
                      "heads": config["num_attention_heads"], "dtype": dtype}
            out.append(Case(f"{model}-encoder-fwd-b{batch}-{image}px-{short}", params,
                            partial(_make_inputs, params), flops=encoder_flops(batch, image, window, config)))
    return out


# ---- providers ---------------------------------------------------------------------


def _config(params: dict, implementation: str):
    import transformers

    model = MODELS.get(params["model"], TINY)
    window = params.get("window", WINDOW)
    return transformers.SamVisionConfig(**model, image_size=params["image"], patch_size=PATCH, window_size=window,
                                        attn_implementation=implementation)


def _randomise(module: torch.nn.Module) -> torch.nn.Module:
    # SAM initialises the relative-position tables and absolute positions to zeros.
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "rel_pos" in name or name.endswith("pos_embed"):
                p.normal_(0.0, 0.5)
    return module


def build_module(params: dict, implementation: str, patched: bool, device: torch.device):
    """The module a case times, on ``device`` in the case's dtype: a SamVisionAttention of
    the window or global layer, or the whole SamVisionModel; under mmfast.patch when
    ``patched``."""
    from transformers.models.sam import modeling_sam

    import mmfast

    torch.manual_seed(0)
    config = _config(params, implementation)
    if params["group"] == "encoder":
        module = modeling_sam.SamVisionModel(config)
    else:
        classes = modeling_sam.SAM_VISION_ATTENTION_CLASSES
        module = classes[implementation](config, params["side"] if params["group"] == "window" else 0)
    module = _randomise(module).to(device=device, dtype=getattr(torch, params["dtype"])).eval()
    if patched:
        mmfast.patch(module)
    return module


def _provider(implementation: str, patched: bool, case: Case):
    state = {}
    params = case.params

    def run(inputs: Inputs):
        if "module" not in state:  # built on the first (untimed, warm-up) call, on the inputs' device
            state["module"] = build_module(params, implementation, patched, inputs.x.device)
        module = state["module"]
        if params["group"] == "encoder":
            with torch.no_grad():
                return module(pixel_values=inputs.x).last_hidden_state
        if params["pass"] == "fwd":
            with torch.no_grad():
                return module(inputs.x)[0]
        out = module(inputs.x)[0]
        return torch.autograd.grad(out, (inputs.x, *module.parameters()), inputs.dout)

    return run


def _skip(case: Case, device: torch.device) -> str | None:
    from mmfast.dispatch import module_available

    if not module_available("transformers"):
        return "transformers is not installed"
    return None


def _eager_skip(case: Case, device: torch.device) -> str | None:
    p = case.params
    # Eager keeps scores, bias and probabilities: 3 [B * heads, T, T] tensors per global layer.
    if p["group"] == "global" and p["pass"] != "fwd" and p["batch"] * p["heads"] * p["tokens"] ** 2 * 12 > 40 * 2**30:
        return "eager attention would hold over 40 GiB of scores for the backward"
    return _skip(case, device)


SPEEDUPS = (
    Speedup("mmfast", ("hf-sdpa",), 2.0, "issue 19: SAM ViT-H image encoder at 1024 px >= 2x transformers sdpa",
            {"group": "encoder", "model": "vit-h"}),
)

SUITE = Suite(
    name="sam_encoder_attention",
    description="SAM image encoder attention (windowed and global, decomposed relative-position bias) "
                "and the whole encoder: mmfast.patch vs transformers sdpa / eager",
    bound="compute",
    cases=cases,
    providers=(
        Provider("mmfast", partial(_provider, "sdpa", True), _skip),
        Provider("hf-sdpa", partial(_provider, "sdpa", False), _skip),
        Provider("hf-eager", partial(_provider, "eager", False), _eager_skip),
    ),
    plot_x="tokens",
    plot_panels=("group", "pass"),
    speedups=SPEEDUPS,
)
