"""Index plumbing of the Qwen2-VL / Qwen2.5-VL vision encoders, loop-free and cached.

Both encoders see a packed stream of patches: image (or video) i has a grid of
``t x h x w`` patches (``grid_thw[i]``), and its patches arrive ordered block-major over
``m x m`` spatial-merge blocks (m = ``spatial_merge_size``, 2 in every released model):
frame, block row, block column, row in the block, column in the block. The m*m patches
of one block (a "merge unit") later become one LLM token.

What the encoders need from ``grid_thw``:

- ``cu_seqlens`` (int32): full-attention segments, one per frame (``h * w`` patches each,
  ``t`` per entry), as Hugging Face computes them; ``max_seqlen`` its longest segment.
- Qwen2.5-VL window attention: each frame's grid of merge units (``h/m x w/m``) is cut
  into windows of ``v x v`` units, v = ``window_size // spatial_merge_size // patch_size``
  (112 // 2 // 14 = 4: 64-patch windows); windows at the right and bottom edges are cut
  short. ``window_index`` ([units], int64) lists the merge units in window order (image,
  frame, window row, window column, then raster order inside the window);
  ``reverse_window_index`` is its inverse permutation; ``cu_window_seqlens`` (int32) are
  the window boundaries in patches, with no empty windows (Hugging Face's
  ``get_window_index`` pads each frame by a whole extra window when its size divides
  evenly and then drops the resulting repeated boundaries with ``unique_consecutive``:
  the same list).
- ``position_ids`` ([patches, 2], int64): the (row, column) of every patch in its frame,
  in stream order, for the 2D rotary embedding; :func:`vision_rotary_cos_sin` turns them
  into per-token cos/sin tables for :func:`mmfast.ops.apply_rotary`.
- Qwen3-VL's learned position grid (``position_grid_side`` S: a square S x S table,
  48 x 48 in the released models), resampled bilinearly with aligned corners to each
  frame's h x w grid: ``interp_indices`` ([patches, 4], int64, rows of the flattened
  table) and ``interp_weights`` ([patches, 4], float32), the four taps of every patch in
  stream order. Patch (r, c) of an h x w frame samples the table at
  ``(r * (S-1) / max(h-1, 1), c * (S-1) / max(w-1, 1))``; the taps are the floor and
  floor + 1 on each axis (clamped to S - 1) with weights 1 - distance, computed with the
  float32 operations of Hugging Face's ``get_vision_interpolation_indices_and_weights``
  so that the values are bit-identical to its.

Device syncs: :func:`qwen_vision_indices` reads ``grid_thw`` back to the host once per
call (``grid_thw.tolist()``) to build the cache key; everything else is computed on
``grid_thw``'s device without further syncs, once per distinct key (a small LRU cache).
The cached tensors are shared between calls: treat them as read-only.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

CACHE_SIZE = 32


class QwenVisionIndices(NamedTuple):
    """Everything a Qwen2-VL / Qwen2.5-VL vision encoder derives from ``grid_thw``."""

    position_ids: Tensor          # [patches, 2] int64: (row, column) of each patch
    cu_seqlens: Tensor            # [frames + 1] int32: one segment per frame
    max_seqlen: int
    window_index: Tensor          # [units] int64: merge units in window order
    reverse_window_index: Tensor  # [units] int64: inverse permutation of window_index
    cu_window_seqlens: Tensor     # [windows + 1] int32, in patches, no empty windows
    max_window_seqlen: int
    interp_indices: Tensor | None = None  # [patches, 4] int64: position-grid taps (Qwen3-VL)
    interp_weights: Tensor | None = None  # [patches, 4] float32: their bilinear weights


def _per_unit(counts: Tensor, values: Tensor, total: int) -> Tensor:
    return torch.repeat_interleave(values, counts, output_size=total)


def _local_index(counts: Tensor, total: int) -> Tensor:
    """For a stream of runs of ``counts`` elements: each element's index inside its run."""
    starts = counts.cumsum(0) - counts
    return torch.arange(total, device=counts.device) - _per_unit(counts, starts, total)


def _position_ids(grid: Tensor, merge: int, patches: int) -> Tensor:
    t, h, w = grid.unbind(1)
    within = _local_index(t * h * w, patches) % _per_unit(t * h * w, h * w, patches)
    blocks_w = _per_unit(t * h * w, w // merge, patches)
    in_col = within % merge
    in_row = (within // merge) % merge
    block = within // (merge * merge)
    row = (block // blocks_w) * merge + in_row
    col = (block % blocks_w) * merge + in_col
    return torch.stack([row, col], dim=-1)


def _windows(grid: Tensor, merge: int, side: int, units: int, windows: int) -> tuple[Tensor, Tensor]:
    """(window_index, merge units per window) for windows of ``side x side`` units; every
    window counted in ``windows`` holds at least one unit."""
    t, h, w = grid.unbind(1)
    uh, uw = h // merge, w // merge
    wins_h, wins_w = (uh + side - 1) // side, (uw + side - 1) // side
    # Each merge unit in stream order: its image, and its (frame, row, column) there.
    per_image = t * uh * uw
    image = _per_unit(per_image, torch.arange(len(grid), device=grid.device), units)
    local = _local_index(per_image, units)
    width = uw[image]
    frame, rest = local // (uh[image] * width), local % (uh[image] * width)
    row, col = rest // width, rest % width
    # Global window number: ordered by image, frame, window row, window column.
    windows_per_image = t * wins_h * wins_w
    first_window = windows_per_image.cumsum(0) - windows_per_image
    window = (first_window[image] + (frame * wins_h[image] + row // side) * wins_w[image]
              + col // side)
    # Inside a window, stream order is already raster order: a stable sort keeps it.
    window_index = torch.sort(window, stable=True).indices
    # index_add rather than bincount, which reads the largest value back to the host.
    sizes = torch.zeros(windows, dtype=torch.int64, device=grid.device)
    sizes.index_add_(0, window, torch.ones_like(window))
    return window_index, sizes


def _axis_taps(index: Tensor, size: Tensor, side: int) -> tuple[Tensor, Tensor]:
    """Bilinear (aligned corners) taps on one axis: [patches, 2] table indices and weights."""
    src = index.to(torch.float32) * (side - 1) / torch.clamp(size - 1, min=1)
    floor = torch.floor(src)
    offsets = torch.arange(0, 2, device=index.device)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


def _position_grid_taps(grid: Tensor, position_ids: Tensor, side: int, patches: int) -> tuple[Tensor, Tensor]:
    t, h, w = grid.unbind(1)
    row_taps, row_weights = _axis_taps(position_ids[:, 0], _per_unit(t * h * w, h, patches), side)
    col_taps, col_weights = _axis_taps(position_ids[:, 1], _per_unit(t * h * w, w, patches), side)
    indices = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
    weights = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)
    return indices, weights


@functools.lru_cache(maxsize=CACHE_SIZE)
def _cached(key: tuple, window_size: int | None, patch_size: int, merge: int, device: torch.device,
            grid_side: int | None = None) -> QwenVisionIndices:
    host = torch.tensor(key, dtype=torch.int64).reshape(-1, 3)
    t, h, w = host.unbind(1)
    patches = int((t * h * w).sum())
    frame_sizes = torch.repeat_interleave(h * w, t)
    max_seqlen = int(frame_sizes.max()) if frame_sizes.numel() else 0

    grid = host.to(device)
    d_t, d_h, d_w = grid.unbind(1)
    cu_seqlens = F.pad(torch.repeat_interleave(d_h * d_w, d_t, output_size=len(frame_sizes))
                       .cumsum(0, dtype=torch.int32), (1, 0))
    position_ids = _position_ids(grid, merge, patches)
    taps = (None, None) if grid_side is None else _position_grid_taps(grid, position_ids, grid_side, patches)

    unit = merge * merge
    units = patches // unit
    if window_size is None:
        window_index = torch.arange(units, device=device)
        return QwenVisionIndices(position_ids, cu_seqlens, max_seqlen, window_index, window_index,
                                 cu_seqlens, max_seqlen, *taps)
    side = window_size // merge // patch_size
    # Host arithmetic on the key: window counts, and the largest window, min(side, units
    # per row) x min(side, units per column).
    uh, uw = h // merge, w // merge
    windows = int((t * ((uh + side - 1) // side) * ((uw + side - 1) // side)).sum())
    largest = (uh.clamp(max=side) * uw.clamp(max=side))[t * uh * uw > 0]
    max_window_seqlen = int(largest.max()) * unit if largest.numel() else 0
    window_index, sizes = _windows(grid, merge, side, units, windows)
    cu_window_seqlens = F.pad((sizes * unit).cumsum(0, dtype=torch.int32), (1, 0))
    reverse = torch.empty_like(window_index)
    reverse[window_index] = torch.arange(units, device=device)
    return QwenVisionIndices(position_ids, cu_seqlens, max_seqlen, window_index, reverse,
                             cu_window_seqlens, max_window_seqlen, *taps)


MAX_PATCHES = 2 ** 31 - 1


def _check_size(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")


def qwen_vision_indices(grid_thw: Tensor, *, spatial_merge_size: int = 2, window_size: int | None = None,
                        patch_size: int = 14, position_grid_side: int | None = None) -> QwenVisionIndices:
    """Position ids, full-attention and window-attention plumbing for ``grid_thw``.

    ``grid_thw``: [N, 3] integer tensor, (t, h, w) in patches per image or video; h and w
    must be multiples of ``spatial_merge_size``. ``window_size`` (pixels, 112 in
    Qwen2.5-VL) enables the window fields; with None (Qwen2-VL) the "windows" are the
    frames and ``window_index`` is the identity. ``position_grid_side`` (Qwen3-VL: 48)
    adds the bilinear taps into a learned side x side position table. Reads ``grid_thw`` to the host once
    (one sync, for the cache key); results are cached per (grid values, sizes, device)
    and shared: do not modify them.

    Example::

        >>> grid = torch.tensor([[1, 6, 10], [2, 4, 4]])
        >>> ix = qwen_vision_indices(grid, spatial_merge_size=2, window_size=112, patch_size=14)
        >>> ix.cu_seqlens.tolist()
        [0, 60, 76, 92]
        >>> ix.cu_window_seqlens.tolist()
        [0, 32, 52, 60, 76, 92]
    """
    if not isinstance(grid_thw, Tensor):
        raise TypeError(f"grid_thw: expected a Tensor, got {type(grid_thw).__name__}")
    if grid_thw.dtype.is_floating_point or grid_thw.dtype.is_complex or grid_thw.dtype == torch.bool:
        raise TypeError(f"grid_thw: expected an integer dtype, got {grid_thw.dtype}")
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw: expected shape [N, 3] (t, h, w per image), got {tuple(grid_thw.shape)}")
    _check_size("spatial_merge_size", spatial_merge_size)
    _check_size("patch_size", patch_size)
    _check_size("window_size", window_size, allow_none=True)
    _check_size("position_grid_side", position_grid_side, allow_none=True)
    if window_size is not None and window_size // spatial_merge_size // patch_size < 1:
        raise ValueError(
            f"window_size: {window_size} px holds no {spatial_merge_size}x{spatial_merge_size} block "
            f"of {patch_size} px patches"
        )
    key = tuple(grid_thw.reshape(-1).tolist())  # the one device->host sync
    values = torch.tensor(key, dtype=torch.int64).reshape(-1, 3)
    if (values < 0).any():
        raise ValueError(f"grid_thw: expected entries >= 0, got {values.tolist()}")
    if (values[:, 1:] % spatial_merge_size).any():
        raise ValueError(
            f"grid_thw: h and w must be multiples of spatial_merge_size={spatial_merge_size}, "
            f"got {values.tolist()}"
        )
    # Python ints: no overflow. The stream is indexed by int32 cu_seqlens; checked before
    # anything of that size is allocated.
    patches = sum(t * h * w for t, h, w in zip(key[0::3], key[1::3], key[2::3]))
    if patches > MAX_PATCHES:
        raise ValueError(f"grid_thw: {patches} patches in all (sum of t*h*w), more than the {MAX_PATCHES} "
                         "that int32 cu_seqlens can index")
    return _cached(key, window_size, patch_size, spatial_merge_size, grid_thw.device, position_grid_side)


def vision_rotary_cos_sin(position_ids: Tensor, head_dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """The 2D rotary tables of the Qwen2-VL / Qwen2.5-VL vision encoders, per token.

    Rows use frequencies ``theta^(-2j / (head_dim/2))`` for j < head_dim/4, columns the
    same; the angles of one token are [row * freqs, column * freqs] (head_dim/2 of them,
    one per rotated pair). Returns float32 ``(cos, sin)``, each [tokens, head_dim/2], in
    the half-width form :func:`mmfast.ops.apply_rotary` takes (Hugging Face's tables are
    these, concatenated with themselves).
    """
    if not isinstance(position_ids, Tensor):
        raise TypeError(f"position_ids: expected a Tensor, got {type(position_ids).__name__}")
    if position_ids.dim() != 2 or position_ids.shape[1] != 2:
        raise ValueError(f"position_ids: expected shape [tokens, 2] (row, column), got {tuple(position_ids.shape)}")
    if position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
        raise TypeError(f"position_ids: expected integer (or real) positions, got {position_ids.dtype}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 4:
        raise ValueError(f"head_dim: expected an int >= 4, got {head_dim!r}")
    if head_dim % 4:
        raise ValueError(f"head_dim: expected a multiple of 4 (2D rotary over rows and columns), got {head_dim}")
    quarter = torch.arange(0, head_dim // 2, 2, dtype=torch.float32, device=position_ids.device)
    inv_freq = 1.0 / (theta ** (quarter / (head_dim // 2)))
    angles = (position_ids[..., None].float() * inv_freq).flatten(-2)
    return angles.cos(), angles.sin()


def cache_clear() -> None:
    """Empty the per-``grid_thw`` cache."""
    _cached.cache_clear()
