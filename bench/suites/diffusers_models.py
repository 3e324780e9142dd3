"""What the suites that time whole diffusers models share (flux_transformer_step,
wan_transformer_step, wan_vae_decode): building a model with random weights straight on
the device in the benchmark dtype, left the way ``from_pretrained(torch_dtype=...)``
leaves it; the three sides (diffusers eager, diffusers + torch.compile, mmfast.patch);
and the reason a side cannot run here.

Building on the device matters at FLUX.1-dev's size: 12B parameters initialised on the
CPU in float32 take 48 GB and minutes; made on the GPU in bf16 they take 24 GB and
seconds. Every side seeds the generator the same way, so all sides of a case hold the
same weights (on one device).
"""

from __future__ import annotations

import gc
import itertools
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from mmfast.bench.harness import tensors_in
from mmfast.bench.suite import Case, Provider, cpu_compile_skip


def diffusers_skip(class_name: str) -> str | None:
    """Why a model of diffusers' ``class_name`` cannot be built here (diffusers missing,
    or a diffusers too old to have it), or None."""
    from mmfast.dispatch import module_available

    if not module_available("diffusers"):
        return "diffusers is not installed"
    try:
        import diffusers
    except Exception as e:  # e.g. carried without one of its requirements
        return f"diffusers does not import here: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    if not hasattr(diffusers, class_name):
        return f"diffusers {diffusers.__version__} has no {class_name}"
    return None


def compile_skip(class_name: str, case: Case, device: torch.device) -> str | None:
    return diffusers_skip(class_name) or cpu_compile_skip(device)


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(factory: Callable[[], nn.Module], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``factory()`` with random weights (seed 0) made on ``device`` in ``dtype``; the
    modules the class keeps in float32 (``_keep_in_fp32_modules``, e.g. Wan's rotary
    tables, time embedder and norms) are float32, as ``from_pretrained`` loads them."""
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(0)
    with torch.device(device), _default_dtype(dtype):
        model = factory()
    # Cast tensor by tensor (diffusers warns on model.to(dtype) where it keeps modules in
    # float32): buffers an __init__ made in another dtype too, e.g. rotary tables.
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_floating_point():
            kept = any(part in keep for part in name.split("."))  # diffusers' own test of a name
            tensor.data = tensor.data.to(device=device, dtype=torch.float32 if kept else dtype)
    return model.to(device).eval()


def regional_compile(model: nn.Module) -> nn.Module:
    """diffusers' recipe: compile each repeated block (``compile_repeated_blocks``, one
    compilation per block class, seconds rather than minutes for 57 blocks) where the
    model declares them and the diffusers version has it, else the whole model."""
    torch.compiler.reset()  # a fresh compile per case; also frees the last case's graphs
    if getattr(model, "_repeated_blocks", None) and hasattr(model, "compile_repeated_blocks"):
        model.compile_repeated_blocks(fullgraph=True)
        return model
    return torch.compile(model)


def side(make: Callable[[dict, torch.device], nn.Module], forward: Callable[[nn.Module, Any], Any], *,
         patched: bool = False, compiled: Callable[[nn.Module], Any] | None = None):
    """A provider's ``build``: the model is made on the first (untimed, warm-up) call, on
    the inputs' device, then patched by mmfast or compiled; ``forward(model, inputs)``
    runs one call under no_grad."""
    def build(case: Case):
        state: dict = {}

        def run(inputs):
            if "model" not in state:
                # The last case's model may still be held: by compiled graphs, or in a
                # reference cycle (a patched model and its PatchHandle) that only the
                # collector frees. At 24 GB a model, two must not coexist.
                torch.compiler.reset()
                gc.collect()
                if torch.cuda.is_initialized():
                    torch.cuda.empty_cache()
                device = next(tensors_in(inputs)).device
                model = make(case.params, device)
                if patched:
                    import mmfast

                    state["handle"] = mmfast.patch(model)
                state["model"] = compiled(model) if compiled is not None else model
            with torch.no_grad():
                return forward(state["model"], inputs)
        return run
    return build



def providers(class_name: str, make: Callable[[dict, torch.device], nn.Module],
              forward: Callable[[nn.Module, Any], Any], compile_model: Callable[[nn.Module], nn.Module]) -> tuple:
    """The three sides of a whole-model suite: mmfast.patch, diffusers eager and diffusers
    with ``compile_model`` applied, each skipped with the reason when it cannot run here."""
    def skip(case, device):
        return diffusers_skip(class_name)

    return (
        Provider("mmfast-patched", side(make, forward, patched=True), skip),
        Provider("diffusers-eager", side(make, forward), skip),
        Provider("diffusers-compile", side(make, forward, compiled=compile_model), partial(compile_skip, class_name)),
    )
