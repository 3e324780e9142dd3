"""The SAM image-encoder workload: transformers' ``SamVisionModel`` (its ``vision_encoder``
is the ``SamVisionEncoder`` that ``SamModel.get_image_embeddings`` runs) patched with
``mmfast.patch`` (the ``sam`` family: windowed and global attention with the decomposed
relative-position bias inside the attention kernel) against the same weights unpatched,
on transformers' sdpa attention (which adds a materialised bias) and on its eager
attention. The mmfast side is a deep copy of the sdpa model, patched; the eager side is
built with ``attn_implementation="eager"`` and loads the same state dict.

One call encodes a batch of random images at the preset's image size into image
embeddings ([batch, output_channels, image / patch, image / patch]); the figures are
seconds per batch (the headline) and images per second.

Presets (random weights): ``tiny`` (a CPU encodes it in milliseconds), ``sam-vit-b`` and
``sam-vit-h``, the image encoders of facebook/sam-vit-base and facebook/sam-vit-huge:
ViT-B is transformers' ``SamVisionConfig`` defaults (hidden 768, 12 layers, 12 heads,
global attention in layers 2, 5, 8, 11, windows of 14, MLP 3072, 256 output channels,
1024 px, patch 16); ViT-H changes hidden to 1280, 32 layers, 16 heads, global layers 7,
15, 23, 31 (MLP 4 x 1280 = 5120), as Segment Anything's ``build_sam_vit_h`` and the
checkpoint's config.json give it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch

from mmfast.profile import build_progress
from mmfast.profile.measure import building_on, timed
from mmfast.profile.stats import figure

# SamVisionConfig arguments per preset; the rest are transformers' defaults (see above).
_CONFIGS = {
    # 8 x 8 patches, windows of 4 (2 x 2 windows), layer 1 global; head dim 32.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, mlp_dim=128, output_channels=32,
                 image_size=128, patch_size=16, window_size=4, global_attn_indexes=[1], num_pos_feats=16),
    "sam-vit-b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_dim=3072,
                      global_attn_indexes=[2, 5, 8, 11]),
    "sam-vit-h": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, mlp_dim=5120,
                      global_attn_indexes=[7, 15, 23, 31]),
}
PRESETS = tuple(_CONFIGS)
# SamVisionConfig's initializer_range is 1e-10 and it zeroes the relative-position tables
# and absolute positions: random weights would make every embedding nearly the same and
# the bias 0. The profile draws them at a usual scale instead (the speed does not depend
# on it; the comparison of the sides' embeddings does).
_INIT_STD = 0.02


@dataclass
class Side:
    name: str
    encode: Callable[[], torch.Tensor]  # the image embeddings of the batch


def config(preset: str):
    """The preset's transformers ``SamVisionConfig`` (sdpa attention)."""
    from transformers import SamVisionConfig

    if preset not in _CONFIGS:
        raise ValueError(f"--preset: {preset!r} is not a SAM preset (known: {', '.join(PRESETS)})")
    return SamVisionConfig(**_CONFIGS[preset], initializer_range=_INIT_STD, attn_implementation="sdpa")


def image_size(preset: str) -> int:
    return _CONFIGS[preset].get("image_size", 1024)


def check_resolution(preset: str, resolution: int | None) -> None:
    """SAM's encoder takes its config's image size only (its processor resizes and pads to it)."""
    size = image_size(preset)
    if resolution is not None and resolution != size:
        raise ValueError(f"--resolution: SAM's image encoder takes {size} px images only (preset {preset}; "
                         f"its processor resizes and pads to that), got {resolution}")


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name or name.endswith("pos_embed"):
                p.normal_(0.0, _INIT_STD)
    return model


def build(preset: str, device: torch.device, dtype: torch.dtype, phases: dict[str, int] | None = None):
    """(mmfast's patched encoder, transformers' sdpa encoder, transformers' eager encoder,
    description): equal weights. ``phases``: the estimate's parameters per build phase."""
    import transformers

    import mmfast

    torch.manual_seed(0)
    with building_on(device, dtype), build_progress.building(phases, preset) as progress:
        progress.phase("transformers model")
        reference = _randomise(transformers.SamVisionModel(config(preset)))
        progress.phase("mmfast copy")
        ours = copy.deepcopy(reference)
        progress.phase("eager model")
        eager_config = config(preset)
        eager_config._attn_implementation = "eager"
        eager = transformers.SamVisionModel(eager_config)
        eager.load_state_dict(reference.state_dict())
    mmfast.patch(ours)
    for model in (ours, reference, eager):
        model.to(device, dtype).eval()
    return ours, reference, eager, f"SAM image encoder, preset {preset} (random weights)"


def inputs(model, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A batch of random images at the encoder's image size."""
    size = model.config.image_size
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, model.config.num_channels, size, size, generator=g).to(device, dtype)


def sides(ours, reference, eager, pixels: torch.Tensor, compile_backend: str | None = None) -> list[Side]:
    """mmfast, transformers sdpa, transformers eager, and with ``compile_backend`` the sdpa
    model under torch.compile with that backend."""
    def encoder(model):
        @torch.no_grad()
        def encode():
            return model(pixel_values=pixels).last_hidden_state
        return encode

    listed = [Side("mmfast", encoder(ours)), Side("transformers sdpa", encoder(reference)),
              Side("transformers eager", encoder(eager))]
    if compile_backend is not None:
        listed.append(Side("transformers sdpa + torch.compile",
                           encoder(torch.compile(reference, backend=compile_backend))))
    return listed


def sampler(side: Side, device: torch.device, clock=time.perf_counter) -> Callable[[], dict[str, float]]:
    """One timed sample of ``side``: {"encode_s"} of one batch."""
    def sample() -> dict[str, float]:
        return {"encode_s": timed(lambda mark: side.encode(), device, clock)["total"]}
    return sample


def metrics(batch: int, samples: dict[str, list[float]]) -> dict:
    """Figures (:func:`mmfast.profile.stats.figure`) from one side's samples."""
    seconds = samples["encode_s"]
    return {"encode_s": figure(seconds), "images_per_s": figure([batch / s for s in seconds])}


def reference_note() -> str:
    return ("reference: transformers SamVisionModel (SamModel's image encoder) with the same weights, sdpa and "
            "eager attention; the mmfast side is a deep copy patched with mmfast.patch")
