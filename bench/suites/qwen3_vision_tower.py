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

from mmfast.bench.suite import Case, Provider, Speedup, Suite
from mmfast.bench.suites.qwen_vision_tower import (
    _Forward,
    _skip_compile,
    _skip_flash,
    _skip_hf,
    _skip_mmfast,
    _timed,
)

QWEN3_VL_8B = {"depth": 27, "hidden_size": 1152, "num_heads": 16, "intermediate_size": 4304,
               "out_hidden_size": 4096, "patch_size": 16, "num_position_embeddings": 2304,
               "deepstack_visual_indexes": [8, 16, 24]}
TINY = {"depth": 2, "hidden_size": 64, "num_heads": 2, "intermediate_size": 96, "out_hidden_size": 64,
        "patch_size": 16, "num_position_embeddings": 16, "deepstack_visual_indexes": [0]}

PATCH = 16
PATCH_DIM = 3 * 2 * PATCH * PATCH
MAX_BACKWARD_PATCHES = 16384


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


def _make_inputs(params: dict, device: torch.device) -> dict:
    grid = torch.tensor(params["grid"], device=device)
    patches = int(grid.prod(-1).sum())
    dtype = getattr(torch, params["dtype"])
    inputs = {"pixels": torch.randn(patches, PATCH_DIM, device=device, dtype=dtype), "grid_thw": grid}
    if params["pass"] == "fwd+bwd":
        inputs["dy"] = tuple(torch.randn(patches // 4, params["out_dim"], device=device, dtype=dtype)
                             for _ in range(params["outputs"]))
    return inputs


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
            out.append(Case(f"{what}-{pass_}", params, partial(_make_inputs, params),
                            flops=_flops(config, grid, pass_ == "fwd+bwd")))
    return out


# ---- models (built once per process, on the first call's device) --------------------

_towers: dict = {}


def _hf_tower(tiny: bool, attn: str, device: torch.device, dtype: torch.dtype):
    key = ("hf", tiny, attn, device, dtype)
    if key not in _towers:
        from transformers import Qwen3VLConfig
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

        config = Qwen3VLConfig(vision_config=TINY if tiny else QWEN3_VL_8B).vision_config
        config._attn_implementation = attn
        torch.manual_seed(0)
        _towers[key] = Qwen3VLVisionModel._from_config(config).to(device, dtype)
    return _towers[key]


def _mmfast_tower(tiny: bool, device: torch.device, dtype: torch.dtype):
    key = ("mmfast", tiny, device, dtype)
    if key not in _towers:
        from mmfast.nn.qwen3_vision import Qwen3VisionTransformer

        hf = _hf_tower(tiny, "sdpa", device, dtype)
        tower = Qwen3VisionTransformer.from_config(hf.config).to(device, dtype)
        tower.load_state_dict(hf.state_dict())
        _towers[key] = tower
    return _towers[key]


def _run_mmfast(model, pixels, grid_thw):
    out = model(pixels, grid_thw)
    return (out.merged, *out.deepstack)


def _run_hf(model, pixels, grid_thw):
    out = model(pixels, grid_thw=grid_thw)
    return (out.pooler_output, *out.deepstack_features)


def _build_mmfast(case: Case):
    return _timed(case, _Forward(partial(_mmfast_tower, case.params["tiny"]), _run_mmfast))


def _build_patched(case: Case):
    import mmfast

    tiny = case.params["tiny"]

    def make(device, dtype):
        # Its own copy: patching the shared sdpa tower would change the hf-sdpa rows.
        key = ("patched", tiny, device, dtype)
        if key not in _towers:
            hf = _hf_tower(tiny, "sdpa", device, dtype)
            copy = type(hf)._from_config(hf.config).to(device, dtype)
            copy.load_state_dict(hf.state_dict())
            mmfast.patch(copy)
            _towers[key] = copy
        return _towers[key]

    return _timed(case, _Forward(make, _run_hf))


def _build_hf(case: Case, attn: str = "sdpa", compile: bool = False):
    tiny = case.params["tiny"]

    def make(device, dtype):
        tower = _hf_tower(tiny, attn, device, dtype)
        if compile:
            torch.compiler.reset()  # fresh per case: dynamo would stop recompiling after a few shapes
            return torch.compile(tower)
        return tower

    return _timed(case, _Forward(make, _run_hf))


ISSUE_CASES = ("1img-1344px", "mixed-4img")

SUITE = Suite(
    name="qwen3_vision_tower",
    description="Qwen3-VL-8B vision tower (27 blocks, full attention, DeepStack), fwd and fwd+bwd",
    bound="compute",
    cases=cases,
    providers=(
        Provider("mmfast", _build_mmfast, _skip_mmfast),
        Provider("mmfast-patched-hf", _build_patched, _skip_mmfast),
        Provider("hf-sdpa", _build_hf, _skip_hf),
        Provider("hf-sdpa-compile", partial(_build_hf, compile=True), _skip_compile),
        Provider("hf-flash-attention-2", partial(_build_hf, attn="flash_attention_2"), _skip_flash),
    ),
    plot_x="patches",
    plot_panels=("pass",),
    speedups=(
        Speedup("mmfast", ("hf-sdpa",), 2.0, "issue 19: Qwen3-VL-8B tower forward >= 2x Hugging Face sdpa",
                {"pass": "fwd", "shape": ISSUE_CASES}),
        Speedup("mmfast", ("hf-sdpa-compile",), 1.2,
                "issue 19: forward >= 1.2x Hugging Face sdpa + torch.compile", {"pass": "fwd", "shape": ISSUE_CASES}),
    ),
)
