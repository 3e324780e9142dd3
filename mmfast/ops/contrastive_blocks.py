"""The block primitives every contrastive loss and metric is written over, per backend,
and the ``contrastive`` op family that chooses between them.

For feature blocks x [M, D] (rows) and y [N, D] (columns), scale s and bias as 0-d
tensors, and logits L = s x @ y.T (+ bias):

    lse_rows(x, y, s, diag_offset, mask_offset, both_ways) -> (stats [2, M], pos [M]):
        the log-sum-exp of row i without column i + mask_offset, kept as two numbers
        (max, log sum exp(L - max)) so that exp(L - lse) stays exact at huge logits;
        and the positive logit
    lse_cols(x, y, s, diag_offset)   -> (stats [2, N], pos [N]): the same per column
    sigmoid_rows(x, y, s, bias, diag_offset) -> [M]: sum_j softplus(-y_ij L_ij)
    grad_rows(x, y, s, bias, stats_r, stats_c, coef, diag_offset, mask_offset, kind,
              both_ways, out_dtype) -> (dx [M, D], ds, dbias)
    grad_cols(... same arguments ...) -> dy [N, D]
    count_above(x, y, threshold, columns) -> int32 [M] (or [N]): scores x_i.y_j above
        row i's (column j's) threshold (retrieval ranks)

with G' per ``kind`` ("clip", "rows", "sigmoid") and coef = [c s, c] as documented in
mmfast.kernels.contrastive. Column i + diag_offset is row i's positive pair (with
``both_ways`` also column i - diag_offset), column i + mask_offset is left out; None
means neither exists in this block. Nothing of size M x N is ever held: the Triton
backend recomputes score tiles in its kernels, the torch backend works through CHUNK x
CHUNK tiles. Both compute every score tile as x[rows] @ y[cols].T on one grid, so the
row and column statistics agree bit for bit with what the backward recomputes.

Backends: ``triton`` (fp16, bf16, fp32 features; CUDA, or CPU under TRITON_INTERPRET=1),
``torch`` (chunked PyTorch; any device and floating dtype, float64 included).
A backend's ``run(device)`` returns its primitives.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast.dispatch import Backend, op_family

# ---- torch: chunked PyTorch ------------------------------------------------------


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _pair_mask(rows: range, cols: range, offset, device) -> Tensor | None:
    """[rows, cols] bool: column == row + offset, or None when no pair is in the tile."""
    if offset is None:
        return None
    r = torch.arange(rows.start, rows.stop, device=device)[:, None]
    c = torch.arange(cols.start, cols.stop, device=device)[None, :]
    return c == r + offset


def _tile_stats(logits: Tensor, dim: int) -> Tensor:
    """[2, n] (max, log of the sum of exp(logit - max)) along ``dim``; (-inf, 0) when empty."""
    top = logits.amax(dim=dim)
    shift = torch.where(top == float("-inf"), 0.0, top)
    total = torch.exp(logits - shift.unsqueeze(dim)).sum(dim=dim)
    return torch.stack([top, torch.log(total).nan_to_num(neginf=0.0)])


def combine_stats(a: Tensor, b: Tensor) -> Tensor:
    """Softmax statistics of the union of two column sets, from each one's (max, log-sum)."""
    top = torch.maximum(a[0], b[0])
    shift = torch.where(top == float("-inf"), 0.0, top)
    total = torch.exp(a[0] - shift + a[1]) + torch.exp(b[0] - shift + b[1])
    return torch.stack([top, torch.log(total).nan_to_num(neginf=0.0)])


def softmax_loss_terms(stats: Tensor, pos: Tensor) -> Tensor:
    """Per row, lse - positive logit = (max - positive) + log-sum: full precision."""
    return (stats[0] - pos) + stats[1]


class TorchBlocks:
    """Chunked PyTorch: tiles of at most ``chunk`` x ``chunk`` scores, in float32
    (float64 for float64 features)."""

    def __init__(self, chunk: int):
        self.chunk = chunk

    def _tiles(self, n: int):
        return [range(i, min(i + self.chunk, n)) for i in range(0, n, self.chunk)]

    def _grid(self, x, y, scale):
        """(rows, cols, x tile, y tile, logits) over every tile of the score matrix."""
        cd = _compute_dtype(x)
        s = scale.to(cd)
        for rows in self._tiles(x.shape[0]):
            xr = x[rows.start:rows.stop].to(cd)
            for cols in self._tiles(y.shape[0]):
                yc = y[cols.start:cols.stop].to(cd)
                yield rows, cols, xr, yc, (xr @ yc.T) * s

    @staticmethod
    def _positive(rows, cols, offset, both_ways, device):
        positive = _pair_mask(rows, cols, offset, device)
        if both_ways and positive is not None:
            positive |= _pair_mask(rows, cols, -offset, device)
        return positive

    def lse_rows(self, x, y, scale, diag_offset=None, mask_offset=None, both_ways=False):
        cd = _compute_dtype(x)
        stats = torch.stack([torch.full((x.shape[0],), float("-inf"), dtype=cd, device=x.device),
                             torch.zeros((x.shape[0],), dtype=cd, device=x.device)])
        pos = torch.zeros((x.shape[0],), dtype=cd, device=x.device)
        for rows, cols, _, _, logits in self._grid(x, y, scale):
            r = slice(rows.start, rows.stop)
            positive = self._positive(rows, cols, diag_offset, both_ways, x.device)
            if positive is not None:
                pos[r] += torch.where(positive, logits, 0.0).sum(dim=1)
            excluded = _pair_mask(rows, cols, mask_offset, x.device)
            if excluded is not None:
                logits = logits.masked_fill(excluded, float("-inf"))
            stats[:, r] = combine_stats(stats[:, r], _tile_stats(logits, 1))
        return stats, pos

    def lse_cols(self, x, y, scale, diag_offset=None):
        cd = _compute_dtype(x)
        stats = torch.stack([torch.full((y.shape[0],), float("-inf"), dtype=cd, device=x.device),
                             torch.zeros((y.shape[0],), dtype=cd, device=x.device)])
        pos = torch.zeros((y.shape[0],), dtype=cd, device=x.device)
        for rows, cols, _, _, logits in self._grid(x, y, scale):
            c = slice(cols.start, cols.stop)
            positive = _pair_mask(rows, cols, diag_offset, x.device)
            if positive is not None:
                pos[c] += torch.where(positive, logits, 0.0).sum(dim=0)
            stats[:, c] = combine_stats(stats[:, c], _tile_stats(logits, 0))
        return stats, pos

    def sigmoid_rows(self, x, y, scale, bias, diag_offset=None):
        cd = _compute_dtype(x)
        out = torch.zeros((x.shape[0],), dtype=cd, device=x.device)
        for rows, cols, _, _, logits in self._grid(x, y, scale):
            z = logits + bias.to(cd)
            positive = _pair_mask(rows, cols, diag_offset, x.device)
            if positive is not None:
                z = torch.where(positive, -z, z)
            out[rows.start:rows.stop] += F.softplus(z).sum(dim=1)
        return out

    def _g(self, rows, cols, logits, bias, stats_r, stats_c, diag_offset, mask_offset, kind, both_ways):
        positive = self._positive(rows, cols, diag_offset, both_ways, logits.device)
        if kind == "sigmoid":
            g = torch.sigmoid(logits + bias.to(logits.dtype))
            if positive is not None:
                g = torch.where(positive, g - 1.0, g)
        else:
            r = stats_r[:, rows.start:rows.stop, None].to(logits.dtype)
            g = torch.exp((logits - r[0]) - r[1])
            if kind == "clip":
                c = stats_c[:, None, cols.start:cols.stop].to(logits.dtype)
                g = g + torch.exp((logits - c[0]) - c[1])
            if positive is not None:
                g = g - (2.0 if kind == "clip" else 1.0) * positive
        excluded = _pair_mask(rows, cols, mask_offset, logits.device)
        return g.masked_fill(excluded, 0.0) if excluded is not None else g

    def grad_rows(self, x, y, scale, bias, stats_r, stats_c, coef, diag_offset, mask_offset,
                  kind, both_ways, out_dtype):
        cd = _compute_dtype(x)
        coef = coef.to(cd)
        acc = torch.zeros(x.shape, dtype=cd, device=x.device)
        ds = torch.zeros((), dtype=cd, device=x.device)
        dbias = torch.zeros((), dtype=cd, device=x.device)
        for rows, cols, xr, yc, logits in self._grid(x, y, scale):
            g = self._g(rows, cols, logits, bias, stats_r, stats_c, diag_offset, mask_offset, kind, both_ways)
            acc[rows.start:rows.stop] += g @ yc
            dbias += g.sum()
        for rows in self._tiles(x.shape[0]):
            r = slice(rows.start, rows.stop)
            ds += (x[r].to(cd) * acc[r]).sum()
        return (acc * coef[0]).to(out_dtype), ds * coef[1], dbias * coef[1]

    def grad_cols(self, x, y, scale, bias, stats_r, stats_c, coef, diag_offset, mask_offset,
                  kind, both_ways, out_dtype):
        cd = _compute_dtype(x)
        acc = torch.zeros(y.shape, dtype=cd, device=x.device)
        for rows, cols, xr, yc, logits in self._grid(x, y, scale):
            g = self._g(rows, cols, logits, bias, stats_r, stats_c, diag_offset, mask_offset, kind, both_ways)
            acc[cols.start:cols.stop] += g.T @ xr
        return (acc * coef[0].to(cd)).to(out_dtype)

    def count_above(self, x, y, threshold, columns: bool):
        count = torch.zeros((y.shape[0] if columns else x.shape[0],), dtype=torch.int32, device=x.device)
        one = torch.ones((), dtype=_compute_dtype(x), device=x.device)
        for rows, cols, _, _, scores in self._grid(x, y, one):
            if columns:
                above = scores > threshold[None, cols.start:cols.stop].to(scores.dtype)
                count[cols.start:cols.stop] += above.sum(dim=0, dtype=torch.int32)
            else:
                above = scores > threshold[rows.start:rows.stop, None].to(scores.dtype)
                count[rows.start:rows.stop] += above.sum(dim=1, dtype=torch.int32)
        return count


# ---- triton: custom ops over the kernels -------------------------------------------


@torch.library.custom_op("mmfast::contrastive_lse_rows", mutates_args=())
def _lse_rows_op(x: Tensor, y: Tensor, scale: Tensor, diag_offset: Optional[int],
                 mask_offset: Optional[int], both_ways: bool) -> tuple[Tensor, Tensor]:
    from mmfast.kernels.contrastive import softmax_lse_rows

    return softmax_lse_rows(x, y, scale, diag_offset, mask_offset, both_ways)


@_lse_rows_op.register_fake
def _(x, y, scale, diag_offset, mask_offset, both_ways):
    return x.new_empty((x.shape[0],), dtype=torch.float32), x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.custom_op("mmfast::contrastive_lse_cols", mutates_args=())
def _lse_cols_op(x: Tensor, y: Tensor, scale: Tensor, diag_offset: Optional[int]) -> tuple[Tensor, Tensor]:
    from mmfast.kernels.contrastive import softmax_lse_cols

    return softmax_lse_cols(x, y, scale, diag_offset)


@_lse_cols_op.register_fake
def _(x, y, scale, diag_offset):
    return y.new_empty((y.shape[0],), dtype=torch.float32), y.new_empty((y.shape[0],), dtype=torch.float32)


@torch.library.custom_op("mmfast::contrastive_sigmoid_rows", mutates_args=())
def _sigmoid_rows_op(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, diag_offset: Optional[int]) -> Tensor:
    from mmfast.kernels.contrastive import sigmoid_rows

    return sigmoid_rows(x, y, scale, bias, diag_offset)


@_sigmoid_rows_op.register_fake
def _(x, y, scale, bias, diag_offset):
    return x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.custom_op("mmfast::contrastive_bwd_rows", mutates_args=())
def _bwd_rows_op(
    x: Tensor, y: Tensor, scale: Tensor, bias: Optional[Tensor], stats_r: Optional[Tensor],
    stats_c: Optional[Tensor], coef: Tensor, diag_offset: Optional[int], mask_offset: Optional[int],
    kind: str, both_ways: bool, out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    from mmfast.kernels.contrastive import contrastive_bwd_rows

    return contrastive_bwd_rows(x, y, scale, bias, stats_r, stats_c, coef, diag_offset, mask_offset,
                                kind, both_ways, out_dtype)


@_bwd_rows_op.register_fake
def _(x, y, scale, bias, stats_r, stats_c, coef, diag_offset, mask_offset, kind, both_ways, out_dtype):
    scalar = x.new_empty((), dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype), scalar, scalar.clone()


@torch.library.custom_op("mmfast::contrastive_bwd_cols", mutates_args=())
def _bwd_cols_op(
    x: Tensor, y: Tensor, scale: Tensor, bias: Optional[Tensor], stats_r: Optional[Tensor],
    stats_c: Optional[Tensor], coef: Tensor, diag_offset: Optional[int], mask_offset: Optional[int],
    kind: str, both_ways: bool, out_dtype: torch.dtype,
) -> Tensor:
    from mmfast.kernels.contrastive import contrastive_bwd_cols

    return contrastive_bwd_cols(x, y, scale, bias, stats_r, stats_c, coef, diag_offset, mask_offset,
                                kind, both_ways, out_dtype)


@_bwd_cols_op.register_fake
def _(x, y, scale, bias, stats_r, stats_c, coef, diag_offset, mask_offset, kind, both_ways, out_dtype):
    return y.new_empty(y.shape, dtype=out_dtype)


@torch.library.custom_op("mmfast::contrastive_count_above", mutates_args=())
def _count_above_op(x: Tensor, y: Tensor, threshold: Tensor, columns: bool) -> Tensor:
    from mmfast.kernels.contrastive import count_above

    return count_above(x, y, threshold, columns)


@_count_above_op.register_fake
def _(x, y, threshold, columns):
    return x.new_empty((y.shape[0] if columns else x.shape[0],), dtype=torch.int32)


def _rows_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _opt(t: Tensor | None) -> Tensor | None:
    return t.float() if t is not None else None


class TritonBlocks:
    """The fused kernels of mmfast.kernels.contrastive (rows made unit-stride first)."""

    def lse_rows(self, x, y, scale, diag_offset=None, mask_offset=None, both_ways=False):
        return torch.ops.mmfast.contrastive_lse_rows(
            _rows_contiguous(x), _rows_contiguous(y), scale.float(), diag_offset, mask_offset, both_ways)

    def lse_cols(self, x, y, scale, diag_offset=None):
        return torch.ops.mmfast.contrastive_lse_cols(
            _rows_contiguous(x), _rows_contiguous(y), scale.float(), diag_offset)

    def sigmoid_rows(self, x, y, scale, bias, diag_offset=None):
        return torch.ops.mmfast.contrastive_sigmoid_rows(
            _rows_contiguous(x), _rows_contiguous(y), scale.float(), bias.float(), diag_offset)

    def grad_rows(self, x, y, scale, bias, stats_r, stats_c, coef, diag_offset, mask_offset,
                  kind, both_ways, out_dtype):
        return torch.ops.mmfast.contrastive_bwd_rows(
            _rows_contiguous(x), _rows_contiguous(y), scale.float(), _opt(bias), stats_r, stats_c,
            coef.float(), diag_offset, mask_offset, kind, both_ways, out_dtype)

    def count_above(self, x, y, threshold, columns: bool):
        return torch.ops.mmfast.contrastive_count_above(_rows_contiguous(x), _rows_contiguous(y),
                                                        threshold, columns)

    def grad_cols(self, x, y, scale, bias, stats_r, stats_c, coef, diag_offset, mask_offset,
                  kind, both_ways, out_dtype):
        return torch.ops.mmfast.contrastive_bwd_cols(
            _rows_contiguous(x), _rows_contiguous(y), scale.float(), _opt(bias), stats_r, stats_c,
            coef.float(), diag_offset, mask_offset, kind, both_ways, out_dtype)


# ---- the op family -----------------------------------------------------------------

# Tiles of the torch backend: 4096^2 float32 scores (64 MiB) on a GPU, smaller on a CPU.
TORCH_CHUNK = {"cuda": 4096}
_TORCH_CHUNK_CPU = 512

_TRITON = TritonBlocks()


def torch_blocks(device: torch.device) -> TorchBlocks:
    return TorchBlocks(TORCH_CHUNK.get(device.type, _TORCH_CHUNK_CPU))


CONTRASTIVE = op_family("contrastive")
CONTRASTIVE.register(Backend("triton", lambda device: _TRITON, triton=True, dot=True,
                             dtypes=(torch.float16, torch.bfloat16, torch.float32)))
CONTRASTIVE.register(Backend("torch", torch_blocks))
