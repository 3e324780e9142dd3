"""Will a preset fit? The memory ``mmfast profile`` needs for a preset, estimated before
anything real is built, against what this machine has free.

The estimate: the parameters of the modules both sides hold, counted on the meta device
(exact, no memory used), times the bytes of their dtype, plus ``MARGIN`` of that for
activations, the KV cache and workspace. Both sides are resident at once (they are timed
alternately), so shared modules count once and copies twice.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

MARGIN = 0.25  # of the weights: activations, KV cache, allocator workspace
# Presets a CPU builds in well under a second: estimating them would cost more than building.
SMALL_PRESETS = frozenset({"tiny", "sd3-tiny", "flux-tiny", "flux2-tiny", "wan-tiny"})
GIB = 2**30


@dataclass(frozen=True)
class Estimate:
    parameters: int   # held by both sides together (shared modules once)
    weight_bytes: int
    # Parameters each phase of the build registers, in order (the progress bar's steps).
    phases: dict[str, int] = field(default_factory=dict)
    # Activations that do not scale with the weights (SAM's T x T attention scores), and what they are.
    activation_bytes: int = 0
    activations: str = ""

    @property
    def total_bytes(self) -> int:
        return int(self.weight_bytes * (1 + MARGIN)) + self.activation_bytes

    def describe(self) -> str:
        extra = f", + {self.activation_bytes / GIB:.1f} GiB for {self.activations}" if self.activation_bytes else ""
        return (f"about {self.total_bytes / GIB:.1f} GiB ({self.parameters / 1e9:.2f} B parameters on all sides = "
                f"{self.weight_bytes / GIB:.1f} GiB of weights, + {MARGIN:.0%} for activations, caches and workspace"
                f"{extra})")


def _bytes(modules, dtype: torch.dtype, float32_prefixes: tuple[str, ...] = ()) -> tuple[int, int]:
    """(parameters, bytes) of ``modules`` in ``dtype``, each parameter counted once;
    parameters under a name in ``float32_prefixes`` stay float32."""
    seen, count, size = set(), 0, 0
    for module in modules:
        for name, p in module.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            count += p.numel()
            size += p.numel() * (4 if name.startswith(float32_prefixes) else dtype.itemsize)
    return count, size


def _on_meta(build):
    """``build()`` with every module it creates on the meta device (shapes only)."""
    previous = torch.get_default_dtype()
    try:
        with torch.device("meta"):
            return build()
    finally:
        torch.set_default_dtype(previous)


def meta_vlm(spec, preset: str, dtype: torch.dtype):
    """mmfast's model of a preset on the meta device: its config and shapes, no memory."""
    return _on_meta(lambda: spec.build_ours(preset, None, dtype, torch.device("meta")))


def estimate_vlm(spec, preset: str, dtype: torch.dtype, ours=None) -> Estimate:
    """mmfast's model and transformers' twin, equal in size (the same state dict);
    ``ours``: the preset's :func:`meta_vlm` model when already built."""
    ours = meta_vlm(spec, preset, dtype) if ours is None else ours
    keep = ("qformer.", "query_tokens") if spec.name == "blip2" else ()  # float32 on both sides
    count, size = _bytes([ours], dtype, keep)
    return Estimate(2 * count, 2 * size, vlm_phases(count))


def vlm_phases(count: int) -> dict[str, int]:
    """The phases of a VLM build (mmfast's model, then transformers' of equal size)."""
    return {"mmfast model": count, "transformers model": count, "copying weights": 0}


def estimate_ldm(preset: str, dtype: torch.dtype) -> Estimate:
    """The pipeline's denoiser, VAE and text encoders, and mmfast's own denoiser and VAE
    (the text encoders are shared)."""
    from mmfast.profile import ldm

    parts = _on_meta(lambda: ldm.preset_modules(preset))
    denoiser, vae = parts["unet"] if "unet" in parts else parts["transformer"], parts["vae"]
    texts = [parts[name] for name in ("text_encoder", "text_encoder_2") if parts.get(name) is not None]
    (n_denoiser, b_denoiser), (n_vae, b_vae), (n_text, b_text) = (
        _bytes([denoiser], dtype), _bytes([vae], dtype), _bytes(texts, dtype))
    phases = {"diffusers components": n_denoiser + n_vae + n_text, "mmfast denoiser": n_denoiser,
              "mmfast VAE": n_vae}
    return Estimate(2 * (n_denoiser + n_vae) + n_text, 2 * (b_denoiser + b_vae) + b_text, phases)


def estimate_sam(preset: str, dtype: torch.dtype, batch: int = 1) -> Estimate:
    """Three copies of the preset's image encoder: mmfast's (a patched deep copy),
    transformers' sdpa and eager models (the torch.compile side shares the sdpa one); and
    the eager side's attention scores in a global layer, which grow with ``batch`` and the
    square of the tokens (4096 at 1024 px): the scores, the scores plus the bias, and
    their float32 softmax, [batch, heads, tokens, tokens] each."""
    from transformers import SamVisionModel

    from mmfast.profile import sam

    config = sam.config(preset)
    count, size = _bytes([_on_meta(lambda: SamVisionModel(config))], dtype)
    phases = {"transformers model": count, "mmfast copy": 0, "eager model": count}  # a deep copy registers nothing
    tokens = (config.image_size // config.patch_size) ** 2
    scores = batch * config.num_attention_heads * tokens**2 * (2 * dtype.itemsize + 4)
    return Estimate(3 * count, 3 * size, phases, scores,
                    f"the eager side's attention scores of a global layer at batch {batch}")


def _stored_parameters(directory: str) -> int:
    """Elements of every tensor in the ``*.safetensors`` files of ``directory`` (headers
    only: nothing is loaded)."""
    from safetensors import safe_open

    count = 0
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), framework="pt") as tensors:
                count += sum(math.prod(tensors.get_slice(key).get_shape()) for key in tensors.keys())
    return count


def estimate_checkpoint(kind: str, directory: str, dtype: torch.dtype) -> Estimate | None:
    """The estimate for a checkpoint directory, from its safetensors headers: a VLM's
    weights on both sides; a pipeline's denoiser and VAE twice (mmfast's copies), its text
    encoders once for SD3 (shared), twice for SD1.5 (each side loads its own) and not at all
    for FLUX (both sides take prompt embeddings). None
    when no safetensors file is found (nothing to go by)."""
    if kind == "vlm":
        stored = _stored_parameters(directory)
        return Estimate(2 * stored, 2 * stored * dtype.itemsize, vlm_phases(stored)) if stored else None
    from mmfast.profile import ldm_flux

    sd3 = os.path.isdir(os.path.join(directory, "transformer"))
    flux = ldm_flux.checkpoint_index(directory) is not None  # neither side loads its text encoders
    count = 0
    for sub in sorted(os.listdir(directory)):
        folder = os.path.join(directory, sub)
        if not os.path.isdir(folder):
            continue
        copies = 2 if sub in ("unet", "transformer", "vae") or (sub.startswith("text_encoder") and not sd3) \
            else 1 if sub.startswith("text_encoder") and not flux else 0
        count += copies * _stored_parameters(folder) if copies else 0
    return Estimate(count, count * dtype.itemsize) if count else None


def available_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes free for new tensors, what that is) on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {device} ({torch.cuda.get_device_name(device)})"
    return available_ram(), "of RAM available"


def available_ram() -> int:
    """RAM available to a new allocation without swapping: psutil when installed, else
    Linux's MemAvailable, else the free pages POSIX reports (an underestimate)."""
    try:
        import psutil
    except ImportError:
        pass
    else:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
