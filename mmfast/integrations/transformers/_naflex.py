"""SigLIP2 NaFlex inputs as packed variable-length sequences.

A NaFlex batch pads every image's patches to one length ``L``: ``pixel_values``
[B, L, C*p*p], ``pixel_attention_mask`` [B, L] (1 for the first ``h*w`` positions of
image b, 0 after) and ``spatial_shapes`` [B, 2] = (h, w) patches. Hugging Face computes
all ``B*L`` positions and masks the padding out of the keys; here only the ``sum(h*w)``
real patches are gathered into one sequence with ``cu_seqlens`` boundaries, so no padded
token costs a GEMM row or an attention tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class NaFlexPacking:
    valid: Tensor  # bool [B, L]: which padded positions hold a patch
    cu_seqlens: Tensor  # int32 [B+1]
    max_seqlen: int
    shapes: tuple[tuple[int, int], ...]  # (h, w) per image


def pack(pixel_values: Tensor, pixel_attention_mask: Tensor, spatial_shapes: Tensor,
         patch_features: int) -> NaFlexPacking:
    """Check a NaFlex batch (one host sync) and describe its packing; a ValueError names
    the argument that disagrees."""
    if pixel_values.dim() != 3 or pixel_values.shape[-1] != patch_features:
        raise ValueError(f"pixel_values: expected [batch, patches, {patch_features}] (channels * patch_size**2), "
                         f"got {tuple(pixel_values.shape)}")
    batch, length = pixel_values.shape[:2]
    if tuple(pixel_attention_mask.shape) != (batch, length):
        raise ValueError(f"pixel_attention_mask: expected shape {(batch, length)} (one entry per padded patch), "
                         f"got {tuple(pixel_attention_mask.shape)}")
    if spatial_shapes.dim() != 2 or tuple(spatial_shapes.shape) != (batch, 2):
        raise ValueError(f"spatial_shapes: expected [{batch}, 2] (patch rows, patch columns per image), "
                         f"got {tuple(spatial_shapes.shape)}")
    shapes = tuple((int(h), int(w)) for h, w in spatial_shapes.tolist())
    counts = torch.tensor([h * w for h, w in shapes], dtype=torch.long, device=pixel_attention_mask.device)
    bad = [b for b, (h, w) in enumerate(shapes) if h < 1 or w < 1 or h * w > length]
    if bad:
        raise ValueError(f"spatial_shapes: image {bad[0]} has {shapes[bad[0]]} patches, which is not a positive "
                         f"grid of at most {length} patches (pixel_values holds {length} per image)")
    valid = pixel_attention_mask.bool()
    expected = torch.arange(length, device=valid.device)[None, :] < counts[:, None]
    mismatch = (valid != expected).any(dim=1)
    if bool(mismatch.any()):
        b = int(mismatch.nonzero()[0, 0])
        raise ValueError(f"pixel_attention_mask: image {b} must mark exactly its first {shapes[b][0]}x{shapes[b][1]}"
                         f" = {shapes[b][0] * shapes[b][1]} patches (spatial_shapes) and nothing after them, "
                         f"but marks {int(valid[b].sum())}")
    cu_seqlens = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    return NaFlexPacking(valid, cu_seqlens, max(h * w for h, w in shapes), shapes)


def resized_positions(table: Tensor, shapes: tuple[tuple[int, int], ...]) -> Tensor:
    """The learned square position grid ``table`` [S*S, D] resized to each image's (h, w)
    grid (bilinear, antialiased, half-pixel centres, in float32, as Hugging Face computes
    it), concatenated in packed order: [sum(h*w), D] in the table's dtype."""
    side = int(table.shape[0] ** 0.5)
    grid = table.reshape(side, side, -1).permute(2, 0, 1)[None].float()
    resized = {}
    for shape in dict.fromkeys(shapes):  # one interpolation per distinct grid
        image = F.interpolate(grid, size=shape, mode="bilinear", align_corners=False, antialias=True)
        resized[shape] = image[0].flatten(1).t()
    return torch.cat([resized[shape] for shape in shapes]).to(table.dtype)


def unpack(packed: Tensor, packing: NaFlexPacking) -> Tensor:
    """[sum(h*w), D] back to the padded [B, L, D] layout, zeros at the padded positions."""
    out = packed.new_zeros(*packing.valid.shape, packed.shape[-1])
    out[packing.valid] = packed
    return out
