"""What the Qwen vision-tower suites share (qwen_vision_tower: Qwen2.5-VL,
qwen3_vision_tower: Qwen3-VL): their inputs, the towers they time and the providers that
run them side by side.

A :class:`TowerModel` names what differs between the two (the transformers classes, the
mmfast tower, the configs, which outputs a forward returns); :func:`tower_providers`
gives a suite its five common providers for one:

- ``mmfast``: the mmfast tower, with the Hugging Face tower's weights;
- ``mmfast-patched-hf``: a copy of the Hugging Face tower after ``mmfast.patch``;
- ``hf-sdpa``: the Hugging Face tower with attn_implementation="sdpa";
- ``hf-sdpa-compile``: the same under torch.compile (compiled afresh per case);
- ``hf-flash-attention-2``: attn_implementation="flash_attention_2", when flash-attn is
  installed.

Every tower is built once per process, on the first (untimed, warm-up) call's device, with
the weights of one Hugging Face tower made after ``torch.manual_seed(0)``. The forward pass
is timed without autograd; forward+backward times ``torch.autograd.grad`` of the outputs
against ``dy`` (no accumulation into ``.grad`` between calls).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch

from mmfast.bench.suite import Case, Provider, cpu_compile_skip, gpu_library_skip

# Forward+backward cases stop here: beyond 16k patches the saved activations of a 27-32
# block tower outgrow an 80 GB GPU for every provider alike.
MAX_BACKWARD_PATCHES = 16384


def _same(out):
    return out


@dataclass(frozen=True)
class TowerModel:
    name: str                                  # its towers' key in the cache
    full: dict                                 # vision_config of the GPU cases
    tiny: dict                                 # vision_config of the CPU cases
    hf_classes: Callable[[], tuple[type, type]]  # () -> (transformers VL config class, its vision tower class)
    mmfast_class: Callable[[], type]           # () -> the mmfast tower class (imported when called)
    mmfast_outputs: Callable[[Any], Any] = _same  # the mmfast tower's output -> what is timed
    hf_outputs: Callable[[Any], Any] = _same      # the Hugging Face tower's output -> the same


def tower_inputs(params: dict, device: torch.device, *, patch_dim: int, outputs: int | None = None) -> dict:
    """Random patches for the case's grid; for forward+backward also ``dy``: one tensor
    of merged-token gradients, or a tuple of ``outputs`` of them."""
    grid = torch.tensor(params["grid"], device=device)
    patches = int(grid.prod(-1).sum())
    dtype = getattr(torch, params["dtype"])
    inputs = {"pixels": torch.randn(patches, patch_dim, device=device, dtype=dtype), "grid_thw": grid}
    if params["pass"] == "fwd+bwd":
        def dy():
            return torch.randn(patches // 4, params["out_dim"], device=device, dtype=dtype)
        inputs["dy"] = dy() if outputs is None else tuple(dy() for _ in range(outputs))
    return inputs


# ---- towers (built once per process, on the first call's device) ----------------------

_towers: dict = {}


def cached(key: tuple, make: Callable[[], Any]):
    """The tower stored under ``key``, made by ``make()`` the first time."""
    if key not in _towers:
        _towers[key] = make()
    return _towers[key]


def hf_tower(model: TowerModel, tiny: bool, attn: str, device: torch.device, dtype: torch.dtype):
    def make():
        config_class, tower_class = model.hf_classes()
        config = config_class(vision_config=model.tiny if tiny else model.full).vision_config
        config._attn_implementation = attn
        torch.manual_seed(0)
        return tower_class._from_config(config).to(device, dtype)

    return cached((model.name, "hf", tiny, attn, device, dtype), make)


def mmfast_tower(model: TowerModel, tiny: bool, device: torch.device, dtype: torch.dtype):
    def make():
        hf = hf_tower(model, tiny, "sdpa", device, dtype)
        tower = model.mmfast_class().from_config(hf.config).to(device, dtype)
        tower.load_state_dict(hf.state_dict())
        return tower

    return cached((model.name, "mmfast", tiny, device, dtype), make)


def patched_tower(model: TowerModel, tiny: bool, device: torch.device, dtype: torch.dtype):
    def make():
        import mmfast

        # Its own copy: patching the shared sdpa tower would change the hf-sdpa rows.
        hf = hf_tower(model, tiny, "sdpa", device, dtype)
        copy = type(hf)._from_config(hf.config).to(device, dtype)
        copy.load_state_dict(hf.state_dict())
        mmfast.patch(copy)
        return copy

    return cached((model.name, "patched", tiny, device, dtype), make)


# ---- what is timed ------------------------------------------------------------------


class Forward:
    """``run(tower, pixels, grid_thw) -> outputs`` on a tower made by ``make(device, dtype)``
    at the first (untimed, warm-up) call."""

    def __init__(self, make, run):
        self.make, self.run, self.model = make, run, None

    def parameters(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    def __call__(self, pixels, grid_thw):
        if self.model is None:
            self.model = self.make(pixels.device, pixels.dtype)
        return self.run(self.model, pixels, grid_thw)


def timed(case: Case, forward: Forward):
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


def run_module(tower, pixels, grid_thw):
    """An mmfast-style tower's call: ``tower(pixels, grid_thw)``."""
    return tower(pixels, grid_thw)


def _run_mmfast(outputs, tower, pixels, grid_thw):
    return outputs(tower(pixels, grid_thw))


def _run_hf(outputs, tower, pixels, grid_thw):
    return outputs(tower(pixels, grid_thw=grid_thw))


def _build_mmfast(model: TowerModel, case: Case):
    return timed(case, Forward(partial(mmfast_tower, model, case.params["tiny"]),
                               partial(_run_mmfast, model.mmfast_outputs)))


def _build_patched(model: TowerModel, case: Case):
    return timed(case, Forward(partial(patched_tower, model, case.params["tiny"]), partial(_run_hf, model.hf_outputs)))


def _build_hf(model: TowerModel, case: Case, attn: str = "sdpa", compile: bool = False):
    tiny = case.params["tiny"]

    def make(device, dtype):
        tower = hf_tower(model, tiny, attn, device, dtype)
        if compile:
            torch.compiler.reset()  # fresh per case: dynamo would stop recompiling after a few shapes
            return torch.compile(tower)
        return tower

    return timed(case, Forward(make, partial(_run_hf, model.hf_outputs)))


# ---- skips ------------------------------------------------------------------------


def skip_hf(case: Case, device: torch.device) -> str | None:
    from mmfast.dispatch import module_available

    return None if module_available("transformers") else "transformers is not installed"


def _skip_mmfast(case: Case, device: torch.device) -> str | None:
    reason = skip_hf(case, device)  # the weights come from the HF tower
    if reason is None and device.type == "cpu":
        from mmfast.dispatch import triton_interpreted

        if not triton_interpreted():
            return "the Triton kernels need a GPU or TRITON_INTERPRET=1"
    return reason


def _skip_compile(case: Case, device: torch.device) -> str | None:
    return cpu_compile_skip(device) or skip_hf(case, device)


def _skip_flash(case: Case, device: torch.device) -> str | None:
    return gpu_library_skip("flash_attn", device, "flash-attn") or skip_hf(case, device)


def tower_providers(model: TowerModel) -> tuple[Provider, ...]:
    """The five providers every Qwen tower suite runs (see the module docstring)."""
    return (
        Provider("mmfast", partial(_build_mmfast, model), _skip_mmfast),
        Provider("mmfast-patched-hf", partial(_build_patched, model), _skip_mmfast),
        Provider("hf-sdpa", partial(_build_hf, model), skip_hf),
        Provider("hf-sdpa-compile", partial(_build_hf, model, compile=True), _skip_compile),
        Provider("hf-flash-attention-2", partial(_build_hf, model, attn="flash_attention_2"), _skip_flash),
    )
