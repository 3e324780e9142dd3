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

from mmfast.bench.suite import Case, Provider, Speedup, Suite, cpu_compile_skip, gpu_library_skip

QWEN25_7B = {"depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420,
             "out_hidden_size": 3584, "patch_size": 14, "window_size": 112,
             "fullatt_block_indexes": [7, 15, 23, 31]}
TINY = {"depth": 2, "hidden_size": 64, "num_heads": 2, "intermediate_size": 96, "out_hidden_size": 64,
        "patch_size": 14, "window_size": 112, "fullatt_block_indexes": [1]}

PATCH_DIM = 3 * 2 * 14 * 14
MAX_BACKWARD_PATCHES = 16384


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


def _make_inputs(params: dict, device: torch.device) -> dict:
    grid = torch.tensor(params["grid"], device=device)
    patches = int(grid.prod(-1).sum())
    dtype = getattr(torch, params["dtype"])
    inputs = {"pixels": torch.randn(patches, PATCH_DIM, device=device, dtype=dtype), "grid_thw": grid}
    if params["pass"] == "fwd+bwd":
        out_dim = params["out_dim"]
        inputs["dy"] = torch.randn(patches // 4, out_dim, device=device, dtype=dtype)
    return inputs


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
            out.append(Case(f"{what}-{px}px-{pass_}", params, partial(_make_inputs, params),
                            flops=_flops(config, grid, pass_ == "fwd+bwd")))
    return out


# ---- models (built once per process, on the first call's device) --------------------

_towers: dict = {}


def _hf_tower(tiny: bool, attn: str, device: torch.device, dtype: torch.dtype):
    key = ("hf", tiny, attn, device, dtype)
    if key not in _towers:
        from transformers import Qwen2_5_VLConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        config = Qwen2_5_VLConfig(vision_config=TINY if tiny else QWEN25_7B).vision_config
        config._attn_implementation = attn
        torch.manual_seed(0)
        _towers[key] = Qwen2_5_VisionTransformerPretrainedModel._from_config(config).to(device, dtype)
    return _towers[key]


def _mmfast_tower(tiny: bool, device: torch.device, dtype: torch.dtype):
    key = ("mmfast", tiny, device, dtype)
    if key not in _towers:
        from mmfast.nn import Qwen25VisionTransformer

        hf = _hf_tower(tiny, "sdpa", device, dtype)
        tower = Qwen25VisionTransformer.from_config(hf.config).to(device, dtype)
        tower.load_state_dict(hf.state_dict())
        _towers[key] = tower
    return _towers[key]


def _reference_tower(tiny: bool, backend: str, device: torch.device, dtype: torch.dtype):
    key = ("vllm-style", tiny, backend, device, dtype)
    if key not in _towers:
        from mmfast.bench.suites.qwen_vllm_reference import ReferenceQwen25VisionTower

        _towers[key] = ReferenceQwen25VisionTower.from_hf(_hf_tower(tiny, "sdpa", device, dtype), backend)
    return _towers[key]


def _timed(case: Case, forward: "_Forward"):
    """What is timed for the case's pass."""
    if case.params["pass"] == "fwd":
        def run(inputs):
            with torch.no_grad():
                return forward(inputs["pixels"], inputs["grid_thw"])
        return run

    def run(inputs):
        out = forward(inputs["pixels"], inputs["grid_thw"])
        # autograd.grad: no accumulation into .grad between calls, nothing kept alive.
        return torch.autograd.grad(out, forward.parameters(), inputs["dy"])
    return run


class _Forward:
    """``run(model, pixels, grid_thw) -> merged tokens`` on a model made by
    ``make(device, dtype)`` at the first (untimed, warm-up) call."""

    def __init__(self, make, run):
        self.make, self.run, self.model = make, run, None

    def parameters(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    def __call__(self, pixels, grid_thw):
        if self.model is None:
            self.model = self.make(pixels.device, pixels.dtype)
        return self.run(self.model, pixels, grid_thw)


def _run_module(model, pixels, grid_thw):
    return model(pixels, grid_thw)


def _run_hf(model, pixels, grid_thw):
    return model(pixels, grid_thw=grid_thw).pooler_output


def _build_mmfast(case: Case):
    return _timed(case, _Forward(partial(_mmfast_tower, case.params["tiny"]), _run_module))


def _build_reference(case: Case, backend: str):
    return _timed(case, _Forward(partial(_reference_tower, case.params["tiny"], backend), _run_module))


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


def _skip_hf(case: Case, device: torch.device) -> str | None:
    from mmfast.dispatch import module_available

    return None if module_available("transformers") else "transformers is not installed"


def _skip_mmfast(case: Case, device: torch.device) -> str | None:
    reason = _skip_hf(case, device)  # the weights come from the HF tower
    if reason is None and device.type == "cpu":
        from mmfast.dispatch import triton_interpreted

        if not triton_interpreted():
            return "the Triton kernels need a GPU or TRITON_INTERPRET=1"
    return reason


def _skip_compile(case: Case, device: torch.device) -> str | None:
    return cpu_compile_skip(device) or _skip_hf(case, device)


def _skip_flash(case: Case, device: torch.device) -> str | None:
    return gpu_library_skip("flash_attn", device, "flash-attn") or _skip_hf(case, device)


def _skip_xformers(case: Case, device: torch.device) -> str | None:
    return gpu_library_skip("xformers", device, "xformers") or _skip_hf(case, device)


VLLM_STYLE = ("vllm-style-sdpa", "vllm-style-xformers")

SUITE = Suite(
    name="qwen_vision_tower",
    description="Qwen2.5-VL-7B vision tower (32 blocks, window attention), fwd and fwd+bwd",
    bound="compute",
    cases=cases,
    providers=(
        Provider("mmfast", _build_mmfast, _skip_mmfast),
        Provider("mmfast-patched-hf", _build_patched, _skip_mmfast),
        Provider("hf-sdpa", _build_hf, _skip_hf),
        Provider("hf-sdpa-compile", partial(_build_hf, compile=True), _skip_compile),
        Provider("hf-flash-attention-2", partial(_build_hf, attn="flash_attention_2"), _skip_flash),
        Provider("vllm-style-sdpa", partial(_build_reference, backend="sdpa"), _skip_hf),
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
