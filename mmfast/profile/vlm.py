"""The vision-language workload: one of mmfast's VLMs (``--model``: Qwen2.5-VL, LLaVA,
BLIP-2; :mod:`mmfast.profile.vlm_models`) and the transformers class it replaces (sdpa
attention) with the same config and weights, greedy generation over a batch of
one-image prompts.

Time to first token is one ``generate`` call with a single new token (vision tower +
prefill + first token); decode tokens/s comes from the extra time of a call with
``new_tokens`` tokens. End-of-sequence is disabled so both sides produce every token.

With ``compile_reference`` a third side runs transformers' model with its ``forward``
under ``torch.compile`` (dynamic shapes, so the growing cache does not recompile every
step; data-dependent code such as Qwen's rope/window indices breaks the graph where it must).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Callable

import torch

from mmfast.profile.vlm_models import MODELS, Batch, build  # noqa: F401  (build: the workload's entry)

DEFAULT_MODEL = "qwen2.5-vl"
PRESETS = tuple(dict.fromkeys(preset for spec in MODELS.values() for preset in spec.presets))


@dataclass
class Side:
    name: str
    generate: Callable[[int], object]  # new tokens -> output


def model_of_checkpoint(path: str) -> str:
    """The --model a checkpoint directory holds, from its config.json's architectures."""
    from mmfast.models.checkpoint import read_config  # a damaged config.json: one error naming it

    names = read_config(path).get("architectures") or []
    for spec in MODELS.values():
        if spec.architecture in names:
            return spec.name
    known = ", ".join(spec.architecture for spec in MODELS.values())
    raise ValueError(f"--checkpoint: {path}/config.json names {', '.join(names) or 'no architectures'}; "
                     f"mmfast profile vlm takes {known}")


def choose_model(args, on_gpu: bool) -> None:
    """Fill ``args.model`` (from the checkpoint, else from a preset only it has, else the
    default) and, without a checkpoint, ``args.preset`` (the model's GPU default or 'tiny');
    refuse presets of other models."""
    if args.checkpoint is not None:
        found = model_of_checkpoint(args.checkpoint)
        if args.model not in (None, found):
            raise ValueError(f"--model: {args.model} given, but the checkpoint holds a {found} model")
        args.model = found
        return
    if args.model is None:  # a preset only one model has names it
        owners = [name for name, spec in MODELS.items() if args.preset in spec.presets]
        args.model = owners[0] if len(owners) == 1 else DEFAULT_MODEL
    presets = MODELS[args.model].presets
    if args.preset is None:
        args.preset = presets[0] if on_gpu else "tiny"
    elif args.preset not in presets:
        raise ValueError(f"--preset: {args.model} has no preset {args.preset!r} (its presets: {', '.join(presets)})")


def inputs(model_name: str, model, batch: int, resolution: int | None, text_tokens: int, device: torch.device,
           dtype: torch.dtype) -> Batch:
    """The batch of prompts; a resolution other than the tower's image size is refused
    where the tower takes only that."""
    spec = MODELS[model_name]
    made = spec.batch(model, batch, resolution, text_tokens, device, dtype)
    if spec.fixed_resolution and resolution is not None and resolution != made.pixels:
        raise ValueError(f"--resolution: {model_name}'s vision tower takes {made.pixels} px images only")
    return made


def compiled(reference, backend: str):
    """A shallow copy of ``reference`` (same submodules and weights) whose forward is compiled."""
    twin = copy.copy(reference)
    twin.forward = torch.compile(reference.forward, backend=backend, dynamic=True)
    return twin


def sides(ours, reference, batch: Batch, compile_backend: str | None = None, cuda_graph: bool = False) -> list[Side]:
    """mmfast and transformers (sdpa), and with ``compile_backend`` transformers under
    torch.compile with that backend."""

    def run_ours(new_tokens):
        return ours.generate(**batch.ours, max_new_tokens=new_tokens, eos_token_id=[], cuda_graph=cuda_graph)

    def runner(model):
        @torch.no_grad()
        def run_reference(new_tokens):
            return model.generate(**batch.reference, do_sample=False, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens)
        return run_reference

    listed = [Side("mmfast", run_ours), Side("transformers (sdpa)", runner(reference))]
    if compile_backend is not None:
        listed.append(Side("transformers (sdpa) + torch.compile", runner(compiled(reference, compile_backend))))
    return listed


def reference_note(model_name: str) -> str:
    return (f"reference: transformers {MODELS[model_name].architecture} (attn_implementation='sdpa'), "
            "same config and weights")


def metrics(batch: int, prompt_tokens: int, new_tokens: int, first_s: float, full_s: float) -> dict:
    decode_s = full_s - first_s
    return {
        "images_per_s": batch / first_s,
        "prefill_tokens_per_s": batch * prompt_tokens / first_s,
        "time_to_first_token_s": first_s,
        "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s if new_tokens > 1 and decode_s > 0 else None,
        "generate_s": full_s,
    }


def check_checkpoint(path: str | None) -> None:
    if path is not None and not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--checkpoint: {path} is not a transformers model directory (no config.json there)")
