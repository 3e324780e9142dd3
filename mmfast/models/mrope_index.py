"""M-RoPE position ids of a Qwen2.5-VL prompt, as transformers 5's ``get_rope_index``.

Each maximal run of image (or video) placeholder tokens is one image (video), taking the
next row of ``image_grid_thw`` (``video_grid_thw``) in order across the batch; it must
hold ``t * (h / m) * (w / m)`` tokens (m = spatial_merge_size). With ``p`` the position
where the run starts:

    text token k of a text run starting at p:      (p + k, p + k, p + k)
    placeholder (i, j, k) of a grid (row-major):   (p + time(i), p + j, p + k)
    after a grid, the next position is             p + max(h, w) / m

with ``time(i) = int(i * tokens_per_second * second_per_grid_ts[v])`` for video v and
``time(i) = i`` for images. Padding (``attention_mask`` 0) gets position 0. The rope
delta of a sequence is (largest position + 1) - (its token count): a generated token
at index n of the sequence (counting its unpadded tokens) sits at ``n + delta``.

Transformers takes the placeholder runs from the processor's ``mm_token_type_ids``;
here they come from the placeholder token ids, which is the same for processor output.
Unlike transformers, a run whose length does not fit its grid is an error.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

TEXT, IMAGE, VIDEO = 0, 1, 2
_KIND = {IMAGE: "image", VIDEO: "video"}


def _grid_positions(t: int, h: int, w: int, time_step: float) -> Tensor:
    """[3, t*h*w] offsets (time, row, column) of one grid's placeholders, row-major;
    frame i's time offset is ``int(i * time_step)``, truncated as transformers does."""
    time = (torch.arange(t) * time_step).long()
    grid = torch.meshgrid(time, torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack(grid).reshape(3, -1)


def _runs(types: Tensor) -> list[tuple[int, int, int]]:
    """(type, start, end) of each maximal run of equal values in a 1D tensor."""
    if types.numel() == 0:
        return []
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(types[1:] != types[:-1]).flatten() + 1])
    ends = torch.cat([starts[1:], torch.tensor([types.numel()])])
    return list(zip(types[starts].tolist(), starts.tolist(), ends.tolist()))


def _host_grid(name: str, grid: Optional[Tensor]) -> list[tuple[int, int, int]]:
    if grid is None:
        return []
    if grid.dim() != 2 or grid.shape[-1] != 3:
        raise ValueError(f"{name}: expected [N, 3] (t, h, w per image or video), got shape {tuple(grid.shape)}")
    return [tuple(int(v) for v in row) for row in grid.cpu().tolist()]


def mrope_position_ids(input_ids: Tensor, *, image_token_id: int, video_token_id: int, spatial_merge_size: int,
                       tokens_per_second: float, image_grid_thw: Optional[Tensor] = None,
                       video_grid_thw: Optional[Tensor] = None, second_per_grid_ts: Optional[Tensor] = None,
                       attention_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Position ids [3, B, T] (long, on input_ids' device) and rope deltas [B, 1] (see the
    module docstring). Reads ``input_ids``, ``attention_mask`` and the grids on the host
    (one sync when they live on a GPU). Raises ValueError when the placeholder runs do not
    match the grids in number or size."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected [B, T], got shape {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, got {tuple(mask.shape)}")
    ids_host, mask_host = input_ids.cpu(), mask.cpu()
    types_host = (ids_host == image_token_id).long() * IMAGE + (ids_host == video_token_id).long() * VIDEO
    grids = {IMAGE: _host_grid("image_grid_thw", image_grid_thw), VIDEO: _host_grid("video_grid_thw", video_grid_thw)}
    seconds = second_per_grid_ts.cpu().tolist() if second_per_grid_ts is not None else None
    used = {IMAGE: 0, VIDEO: 0}

    positions = torch.zeros(3, batch, length, dtype=torch.long)
    deltas = []
    for b in range(batch):
        pieces, position = [], 0
        for kind, start, end in _runs(types_host[b][mask_host[b]]):
            if kind == TEXT:
                pieces.append(torch.arange(end - start).expand(3, -1) + position)
                position += end - start
                continue
            name = _KIND[kind]
            index = used[kind]
            if index >= len(grids[kind]):
                raise ValueError(f"input_ids: more {name}s (runs of {name} placeholder tokens) than the "
                                 f"{len(grids[kind])} that {name}_grid_thw describes")
            t, h, w = grids[kind][index]
            if h % spatial_merge_size or w % spatial_merge_size:
                raise ValueError(f"{name}_grid_thw: {name} {index} has grid {(t, h, w)}, not divisible by "
                                 f"spatial_merge_size={spatial_merge_size}")
            h, w = h // spatial_merge_size, w // spatial_merge_size
            if end - start != t * h * w:
                raise ValueError(f"input_ids: {name} {index} (sequence {b}) has {end - start} placeholder tokens, "
                                 f"its grid {grids[kind][index]} needs {t * h * w} "
                                 f"(t * h * w / {spatial_merge_size}^2)")
            step = tokens_per_second * (seconds[index] if seconds is not None else 1.0) if kind == VIDEO else 1.0
            pieces.append(_grid_positions(t, h, w, step) + position)
            position += max(h, w)
            used[kind] += 1
        sequence = torch.cat(pieces, dim=1)
        positions[:, b, mask_host[b]] = sequence
        deltas.append(int(sequence.max()) + 1 - sequence.shape[1] if sequence.numel() else 0)
    for kind, name in _KIND.items():
        if used[kind] != len(grids[kind]):
            raise ValueError(f"{name}_grid_thw: describes {len(grids[kind])} {name}s, but input_ids hold "
                             f"{used[kind]} (runs of {name} placeholder tokens)")
    return positions.to(input_ids.device), torch.tensor(deltas).view(batch, 1).to(input_ids.device)
