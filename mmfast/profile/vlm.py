"""The vision-language workload: one of mmfast's VLMs (``--model``: Qwen2.5-VL, LLaVA,
BLIP-2; :mod:`mmfast.profile.vlm_models`) and the transformers class it replaces (sdpa
attention) with the same config and weights, greedy generation over a batch of
one-image prompts.

Time to first token and generate time come from the same ``generate`` call of
``new_tokens`` tokens: the call is timed whole, and the moment the logits of the first new
token exist (vision tower + prefill + lm_head) is stamped inside it (on mmfast's side by
a one-shot hook on its lm_head, on transformers' by a logits processor, which runs outside
a compiled forward), so time to first token <= generate holds by construction; decode
tokens/s is from the rest of that call. End-of-sequence is disabled so both sides produce
every token.

With ``compile_reference`` a third side runs transformers' model with its ``forward``
under ``torch.compile`` (dynamic shapes, so the growing cache does not recompile every
step; data-dependent code such as Qwen's rope/window indices breaks the graph where it must).
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from mmfast.profile import measure
from mmfast.profile.stats import figure
from mmfast.profile.vlm_models import MODELS, Batch, build  # noqa: F401  (build: the workload's entry)

DEFAULT_MODEL = "qwen2.5-vl"
PRESETS = tuple(dict.fromkeys(preset for spec in MODELS.values() for preset in spec.presets))


@dataclass
class Side:
    name: str
    # (new tokens, first_token) -> output; first_token(), when given, is called once, as soon
    # as the logits of the first new token exist
    generate: Callable[..., object]


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
    lm_head = _lm_head(ours)

    def run_ours(new_tokens, first_token=None):
        with measure.on_first_call(lm_head, first_token):
            return ours.generate(**batch.ours, max_new_tokens=new_tokens, eos_token_id=[], cuda_graph=cuda_graph)

    def runner(model):
        @torch.no_grad()
        def run_reference(new_tokens, first_token=None):
            from transformers import LogitsProcessorList

            stamp = LogitsProcessorList([_FirstLogits(first_token)] if first_token is not None else [])
            return model.generate(**batch.reference, do_sample=False, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, logits_processor=stamp)
        return run_reference

    listed = [Side("mmfast", run_ours), Side("transformers (sdpa)", runner(reference))]
    if compile_backend is not None:
        listed.append(Side("transformers (sdpa) + torch.compile", runner(compiled(reference, compile_backend))))
    return listed


def _lm_head(model) -> torch.nn.Module:
    heads = [module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] == "lm_head"]
    if len(heads) != 1:
        raise TypeError(f"model: expected one module named lm_head in {type(model).__name__}, found {len(heads)}")
    return heads[0]


class _FirstLogits:
    """A transformers logits processor that changes nothing and calls ``callback`` once,
    when the first new token's logits reach it."""

    def __init__(self, callback: Callable[[], None]):
        self.callback, self.fired = callback, False

    def __call__(self, input_ids, scores):
        if not self.fired:
            self.fired = True
            self.callback()
        return scores


def sampler(side: Side, new_tokens: int, device: torch.device,
            clock=time.perf_counter) -> Callable[[], dict[str, float]]:
    """One timed sample of ``side``: {"time_to_first_token_s", "generate_s"} of one call."""

    def sample() -> dict[str, float]:
        times = measure.timed(lambda mark: side.generate(new_tokens, lambda: mark("first_token")), device, clock)
        if "first_token" not in times:
            raise RuntimeError(f"{side.name}: generate returned without producing a first token")
        return {"time_to_first_token_s": times["first_token"], "generate_s": times["total"]}
    return sample


def reference_note(model_name: str) -> str:
    return (f"reference: transformers {MODELS[model_name].architecture} (attn_implementation='sdpa'), "
            "same config and weights")


def metrics(batch: int, prompt_tokens: int, new_tokens: int, samples: dict[str, list[float]]) -> dict:
    """Figures (:func:`mmfast.profile.stats.figure`) from one side's samples, each derived
    sample from one call: images/s and prefill tokens/s from its time to first token, decode
    tokens/s from the rest of the call (none with a single new token)."""
    first, full = samples["time_to_first_token_s"], samples["generate_s"]
    decode = [batch * (new_tokens - 1) / (g - f) if new_tokens > 1 and g > f else None for f, g in zip(first, full)]
    return {
        "generate_s": figure(full),
        "time_to_first_token_s": figure(first),
        "decode_tokens_per_s": figure(decode),
        "prefill_tokens_per_s": figure([batch * prompt_tokens / f for f in first]),
        "images_per_s": figure([batch / f for f in first]),
    }


def check_checkpoint(path: str | None) -> None:
    if path is not None and not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--checkpoint: {path} is not a transformers model directory (no config.json there)")
