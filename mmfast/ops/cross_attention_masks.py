"""Structured masks for cross-attention from text tokens (queries) to image tokens (keys),
kept as a few small integer tensors rather than a dense [Tq, Tk] matrix.

Images of a sample are numbered n = 0 .. N-1 and given by three int tensors of shape [B, N]:

    image_positions  text position of image n's placeholder token; negative: unused slot
    image_lengths    how many key tokens image n has (0 allowed)
    image_offsets    first key of image n within the sample's keys (default: the exclusive
                     cumulative sum of image_lengths, i.e. images back to back); images
                     must not overlap and their offsets must not decrease, so that keys
                     between images (padding tiles, say) are seen by nobody

Used slots come first, in order of position. Positions and offsets count from the start of
the sample in both layouts (packed: from cu_seqlens[b]). A text token at position t
"follows" image n when 0 <= image_positions[n] <= t (the placeholder itself follows).

- :class:`ImagesUpToPositionMask` (Llama 3.2 Vision / Mllama): token t sees every image
  it follows.
- :class:`LatestImageMask` (Flamingo): token t sees only the last image it follows.
- :class:`KeyPaddingMask`: every query of sample b sees its first ``key_lengths[b]`` keys.

A query that sees no key gets a zero attention output (see mmfast.ops.cross_attention).
With ``empty_rows_see_all_keys=True`` an image mask lets a text token that follows no
image see every key of its sample instead, padding included: what Hugging Face's Mllama
does (its additive mask zeroes fully masked rows), for drop-in use.
Every mask has ``materialize(q, k, cu_seqlens_q=None, cu_seqlens_k=None)``: the dense
boolean mask ([Tq, Tk] packed, block-diagonal; [B, Tq, Tk] padded), computed directly from
the definition above, for tests and for backends that need a dense mask.

What the kernels read (``lower``): per key row its image index within the sample (-1 for
keys nobody sees), per query row the images [first, last) it sees and the key range
[lo, hi) they cover, all int32, built on the device without a sync. Values (sorted
positions, non-overlapping images) are the caller's promise and are not checked.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


_EVERY_GROUP = 2**30


class LoweredMask(NamedTuple):
    """Flat per-row int32 arrays the Triton kernels read (see the module docstring)."""

    key_group: Tensor
    query_first: Tensor
    query_last: Tensor
    query_key_lo: Tensor
    query_key_hi: Tensor


def _rows(cu_seqlens: Tensor | None, t: Tensor) -> tuple[Tensor, Tensor]:
    """(sample, position in the sample) of every row of q or k (packed or padded)."""
    if cu_seqlens is None:  # padded [B, T, H, D]
        batch, length = t.shape[0], t.shape[1]
        index = torch.arange(batch * length, device=t.device)
        return index // max(length, 1), index % max(length, 1)
    index = torch.arange(t.shape[0], device=t.device)
    sample = torch.searchsorted(cu_seqlens[1:], index.to(cu_seqlens.dtype), right=True)
    return sample, index - cu_seqlens[sample]


def _batch(q: Tensor, cu_seqlens_q: Tensor | None) -> int:
    return q.shape[0] if cu_seqlens_q is None else cu_seqlens_q.numel() - 1


def _check_int(name: str, t, dims: int, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"mask: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"mask: {name} must have an integer dtype, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"mask: {name} must have {dims} dims, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"mask: {name} is on {t.device}, q on {device}")


def _block_diagonal(seen: Tensor, q: Tensor, k: Tensor, cu_q: Tensor | None, cu_k: Tensor | None) -> Tensor:
    """[rows_q, rows_k] -> the dense mask of the layout: packed keeps it (rows of different
    samples never see each other); padded takes each sample's own [Tq, Tk] block."""
    if cu_q is not None:
        return seen
    batch, tq, tk = q.shape[0], q.shape[1], k.shape[1]
    return seen.view(batch, tq, batch, tk).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


class CrossAttentionMask:
    """Base class: which keys each query sees. Subclasses give ``check``, ``lower`` and
    ``materialize``; see the module docstring."""

    def check(self, q: Tensor, k: Tensor, cu_seqlens_q: Tensor | None) -> None:
        raise NotImplementedError

    def lower(self, q: Tensor, k: Tensor, cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None) -> LoweredMask:
        raise NotImplementedError

    def materialize(self, q: Tensor, k: Tensor, cu_seqlens_q: Tensor | None = None,
                    cu_seqlens_k: Tensor | None = None) -> Tensor:
        raise NotImplementedError


class KeyPaddingMask(CrossAttentionMask):
    """Sample b's queries see its keys 0 .. key_lengths[b] - 1 (int tensor [B]); or, with
    ``key_valid`` (bool [B, Tk], padded layout), exactly the keys marked True (padding
    anywhere, as in a 2-D patch grid)."""

    def __init__(self, key_lengths: Tensor | None = None, *, key_valid: Tensor | None = None):
        if (key_lengths is None) == (key_valid is None):
            raise ValueError("mask: give exactly one of key_lengths and key_valid")
        self.key_lengths = key_lengths
        self.key_valid = key_valid

    def check(self, q, k, cu_seqlens_q):
        if self.key_valid is not None:
            valid = self.key_valid
            if not isinstance(valid, Tensor) or valid.dtype != torch.bool:
                raise TypeError("mask: key_valid must be a bool Tensor")
            if cu_seqlens_q is not None or valid.shape != k.shape[:2]:
                raise ValueError(f"mask: key_valid must be [B, Tk] = {tuple(k.shape[:2])} (padded layout), "
                                 f"got {tuple(valid.shape)}")
            if valid.device != q.device:
                raise ValueError(f"mask: key_valid is on {valid.device}, q on {q.device}")
            return
        _check_int("key_lengths", self.key_lengths, 1, q.device)
        if self.key_lengths.shape[0] != _batch(q, cu_seqlens_q):
            raise ValueError(f"mask: key_lengths has {self.key_lengths.shape[0]} entries, "
                             f"expected the batch size {_batch(q, cu_seqlens_q)}")

    def _valid_rows(self, k, cu_seqlens_k) -> Tensor:
        if self.key_valid is not None:
            return self.key_valid.reshape(-1)
        sample_k, pos_k = _rows(cu_seqlens_k, k)
        return pos_k < self.key_lengths[sample_k]

    def lower(self, q, k, cu_seqlens_q, cu_seqlens_k):
        sample_q, _ = _rows(cu_seqlens_q, q)
        key_group = torch.where(self._valid_rows(k, cu_seqlens_k), 0, -1).to(torch.int32)
        ones = torch.ones_like(sample_q, dtype=torch.int32)
        if self.key_valid is not None:
            hi = ones * k.shape[1]
        else:
            hi = self.key_lengths[sample_q].clamp(min=0).to(torch.int32)
        return LoweredMask(key_group, ones * 0, ones, ones * 0, hi)

    def materialize(self, q, k, cu_seqlens_q=None, cu_seqlens_k=None):
        sample_q, _ = _rows(cu_seqlens_q, q)
        sample_k, _ = _rows(cu_seqlens_k, k)
        seen = (sample_q[:, None] == sample_k[None, :]) & self._valid_rows(k, cu_seqlens_k)[None, :]
        return _block_diagonal(seen, q, k, cu_seqlens_q, cu_seqlens_k)


class _ImageMask(CrossAttentionMask):
    """Images given by positions, lengths and offsets [B, N] (see the module docstring)."""

    def __init__(self, image_positions: Tensor, image_lengths: Tensor, image_offsets: Tensor | None = None,
                 *, empty_rows_see_all_keys: bool = False):
        self.empty_rows_see_all_keys = empty_rows_see_all_keys
        self.image_positions = image_positions
        self.image_lengths = image_lengths
        if image_offsets is None and isinstance(image_lengths, Tensor):
            image_offsets = image_lengths.cumsum(-1) - image_lengths
        self.image_offsets = image_offsets

    def check(self, q, k, cu_seqlens_q):
        for name in ("image_positions", "image_lengths", "image_offsets"):
            _check_int(name, getattr(self, name), 2, q.device)
        shape = self.image_positions.shape
        for name in ("image_lengths", "image_offsets"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"mask: {name} has shape {tuple(getattr(self, name).shape)}, "
                                 f"expected {tuple(shape)} like image_positions")
        if shape[0] != _batch(q, cu_seqlens_q):
            raise ValueError(f"mask: image_positions has {shape[0]} rows, expected the batch size "
                             f"{_batch(q, cu_seqlens_q)}")

    def _follows(self, sample_q: Tensor, pos_q: Tensor) -> Tensor:
        """[rows_q, N]: the query follows image n."""
        positions = self.image_positions[sample_q]
        return (positions >= 0) & (positions <= pos_q[:, None])

    def _sees_images(self, follows: Tensor) -> Tensor:
        raise NotImplementedError

    def _image_range(self, count: Tensor) -> tuple[Tensor, Tensor]:
        """[first, last) images seen by a query that follows ``count`` images."""
        raise NotImplementedError

    def lower(self, q, k, cu_seqlens_q, cu_seqlens_k):
        sample_q, pos_q = _rows(cu_seqlens_q, q)
        sample_k, pos_k = _rows(cu_seqlens_k, k)
        as32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
        if self.image_positions.shape[1] == 0:  # no image slots: nobody sees anything
            zeros, groups = as32(pos_q * 0), as32(pos_k * 0 - 1)
            if self.empty_rows_see_all_keys:
                every = zeros + _EVERY_GROUP
                return LoweredMask(groups, zeros - 1, every, zeros, every)
            return LoweredMask(groups, zeros, zeros, zeros, zeros)
        offsets = self.image_offsets.to(torch.int64)
        ends = offsets + self.image_lengths.to(torch.int64)
        # The key's image: the last one starting at or before it, if it reaches the key.
        image = torch.searchsorted(offsets[sample_k].contiguous(), pos_k[:, None].to(torch.int64), right=True)[:, 0] - 1
        inside = (image >= 0) & (pos_k < ends[sample_k, image.clamp(min=0)])
        key_group = torch.where(inside, image, -1).to(torch.int32)

        count = self._follows(sample_q, pos_q).sum(-1)
        first, last = self._image_range(count)
        any_image = last > first
        lo = torch.where(any_image, offsets[sample_q, first.clamp(max=offsets.shape[1] - 1)], 0)
        hi = torch.where(any_image, ends[sample_q, (last - 1).clamp(min=0)], 0)
        if self.empty_rows_see_all_keys:  # groups [-1, huge): every key, padding included
            first = torch.where(any_image, first, -1)
            last = torch.where(any_image, last, _EVERY_GROUP)
            hi = torch.where(any_image, hi, _EVERY_GROUP)
        return LoweredMask(key_group, as32(first), as32(last), as32(lo), as32(hi))

    def materialize(self, q, k, cu_seqlens_q=None, cu_seqlens_k=None):
        sample_q, pos_q = _rows(cu_seqlens_q, q)
        sample_k, pos_k = _rows(cu_seqlens_k, k)
        sees = self._sees_images(self._follows(sample_q, pos_q))  # [rows_q, N]
        offsets, lengths = self.image_offsets[sample_k], self.image_lengths[sample_k]
        holds = (offsets <= pos_k[:, None]) & (pos_k[:, None] < offsets + lengths)  # [rows_k, N]
        seen = (sees[:, None, :] & holds[None, :, :]).any(-1)
        if self.empty_rows_see_all_keys:
            seen |= ~sees.any(-1, keepdim=True)
        seen &= sample_q[:, None] == sample_k[None, :]
        return _block_diagonal(seen, q, k, cu_seqlens_q, cu_seqlens_k)


class ImagesUpToPositionMask(_ImageMask):
    """Each text token sees every image whose placeholder is at or before it (Mllama)."""

    def _sees_images(self, follows):
        return follows

    def _image_range(self, count):
        return torch.zeros_like(count), count


class LatestImageMask(_ImageMask):
    """Each text token sees only the latest image at or before it (Flamingo)."""

    def _sees_images(self, follows):
        later = follows.flip(-1).cumsum(-1).flip(-1) - follows.long()  # followed images after n
        return follows & (later == 0)

    def _image_range(self, count):
        return (count - 1).clamp(min=0), count
