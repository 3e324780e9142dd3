"""CLIP and SigLIP losses over a global batch sharded across torch.distributed ranks.

Each rank passes its shard (rank r's rows are the global rows offset_r .. offset_r + B_r,
in rank order within ``group``) and gets the loss of the global batch, the same value on
every rank. Gradient convention: each rank receives exactly its slice of d loss / d
features, and its share of d loss / d scale (and bias), the terms of the rows it owns, so
that the shares sum over ranks to the full gradient. DDP sums (then averages) parameter
gradients over ranks, so feature and scale gradients stay consistent with each other;
mmfast.nn.ClipLoss / SigLipLoss scale their gradients by the world size, so that DDP's
average is the global loss's gradient, as with open_clip.

Strategies (``strategy=``):

- ``"all_gather"``: gather every rank's image and text features (2 B D elements per rank)
  and the row and column log-sum-exp vectors (O(B)). Each rank then computes its own
  rows (image -> text) and columns (text -> image) against the whole batch, forward and
  backward, with no communication in the backward pass. (Its row and column softmaxes
  see the scores of one pair from differently aligned tiles, equal up to float32
  rounding; the single-device path and the ring use one tile grid and agree exactly.)
- ``"ring"``: text blocks travel around the ring (isend/irecv to the next rank, from the
  previous), the next block in flight while the current one is computed; a rank never
  holds more than its own shard and two travelling blocks. The column statistics (and in
  the backward the text gradients, in float32) travel with their block and come home
  after W hops. Communication per rank and pass: the whole text batch once (B D
  elements), plus the accumulators (O(B) forward, B D float32 backward).

Ranks may hold different local batch sizes (rank 0 could hold 3 rows and rank 1 five): the
sizes are exchanged on every call, one small all_gather and a device->host sync. The
exchange also carries each rank's argument check, feature dim, dtype, strategy and the
arguments that must be equal everywhere (``reduction``, the logit scale and bias values),
so a mismatch raises the same ValueError on every rank instead of hanging a collective or
giving each rank a different "global" loss.
Works with any backend that has all_gather, all_reduce and isend/irecv (NCCL, gloo);
the features' device must suit it (CUDA for NCCL).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mmfast.ops.contrastive import REDUCTIONS, grad_coef
from mmfast.ops.contrastive_blocks import combine_stats, softmax_loss_terms

STRATEGIES = ("all_gather", "ring")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_SAME = 4  # values that must agree across ranks, at most (see agree)


# ---- agreement between ranks --------------------------------------------------------


def agree(group, x: Tensor | None, local_error: Exception | None, strategy: str, what: str,
          same: dict[str, float | Tensor] | None = None) -> list[int]:
    """Exchange (ok, batch, dim, dtype, strategy, and the values in ``same``) between
    ranks; raise on every rank when any rank's arguments are bad or the ranks disagree.
    ``same``: arguments that must be equal on every rank (reduction, logit scale and
    bias), as numbers or one-element tensors, compared bit for bit in float64. Returns
    the batch sizes."""
    ok = local_error is None
    same = same if ok and same is not None else {}
    device = x.device if isinstance(x, Tensor) else torch.device("cpu")
    mine = torch.tensor([
        int(ok),
        x.shape[0] if ok else -1,
        x.shape[1] if ok else -1,
        _DTYPES.index(x.dtype) if ok and x.dtype in _DTYPES else -1,
        STRATEGIES.index(strategy) if strategy in STRATEGIES else -1,
        len(same),
    ], dtype=torch.int64, device=device)
    # Every rank sends the same length: the values padded to _MAX_SAME (a bad rank sends
    # none). Built on the device: read back with the rest, in the one sync.
    values = torch.zeros(_MAX_SAME, dtype=torch.float64, device=device)
    for i, value in enumerate(same.values()):
        values[i] = value.detach().reshape(()) if isinstance(value, Tensor) else value
    mine = torch.cat([mine, values.view(torch.int64)])
    world = dist.get_world_size(group)
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine, group=group)
    rows = [t.tolist() for t in table]  # the one device->host sync of a call
    if local_error is not None:
        raise local_error
    bad = [r for r, row in enumerate(rows) if not row[0]]
    if bad:
        raise ValueError(f"{what}: invalid arguments on rank(s) {bad} of the group (see the error there)")
    if -1 in [row[4] for row in rows]:
        raise ValueError(f"strategy: expected one of {', '.join(STRATEGIES)} on every rank, got {strategy!r}")
    for col, name in ((2, "feature dim"), (3, "dtype"), (4, "strategy")):
        values = [row[col] for row in rows]
        if len(set(values)) > 1:
            shown = values if col == 2 else [(_DTYPES if col == 3 else STRATEGIES)[v] for v in values]
            raise ValueError(f"{what}: the ranks disagree on the {name}: {shown} (rank order)")
    for i, name in enumerate(same):
        bits = [row[6 + i] for row in rows]
        if len(set(bits)) > 1:
            shown = [table[r][6:].cpu().view(torch.float64)[i].item() for r in range(world)]
            raise ValueError(f"{name}: must be the same on every rank of the group, got {shown} (rank order)")
    sizes = [row[1] for row in rows]
    if sum(sizes) == 0:
        raise ValueError(f"{what}: expected at least one row over the group, every rank has 0")
    return sizes


def gather_rows(t: Tensor, sizes: list[int], group) -> Tensor:
    """Concatenate every rank's rows (sizes may differ: padded to the largest, then cut)."""
    longest = max(sizes)
    padded = t.new_zeros((longest,) + tuple(t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _all_reduce(t: Tensor, group) -> Tensor:
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


class Ring:
    """Neighbours of this rank in ``group``: blocks go to the next rank, come from the previous."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world)
        # Shifts in flight at the same time (texts and column statistics) get their own
        # tags, so no message can be matched to another's receive buffer. Every rank runs
        # the same sequence of shifts, so the counters agree.
        self._tag = 0

    def owner(self, step: int) -> int:
        """Whose block this rank holds at ``step`` (its own at step 0)."""
        return (self.rank - step) % self.world

    def shift(self, tensors: list[Tensor], incoming_rows: int):
        """Start sending ``tensors`` to the next rank and receiving the previous rank's
        (with ``incoming_rows`` rows); returns the receive buffers and a wait function."""
        received = [t.new_empty((incoming_rows,) + tuple(t.shape[1:])) for t in tensors]
        ops = []
        for out, into in zip(tensors, received):
            tag, self._tag = self._tag, self._tag + 1
            ops.append(dist.P2POp(dist.isend, out.contiguous(), self.next, self.group, tag))
            ops.append(dist.P2POp(dist.irecv, into, self.prev, self.group, tag))
        works = dist.batch_isend_irecv(ops)

        def wait():
            for w in works:
                w.wait()
            return received

        return wait


# ---- CLIP (softmax) ---------------------------------------------------------------------


class AllGatherClipFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, scale, norm, blocks, group, sizes):
        rank = dist.get_rank(group)
        offset = sum(sizes[:rank])
        s = scale.detach()
        xs, ys = gather_rows(x, sizes, group), gather_rows(y, sizes, group)
        lse_rows, pos_rows = blocks.lse_rows(x, ys, s, offset)    # my images against every text
        lse_cols, pos_cols = blocks.lse_cols(xs, y, s, -offset)   # every image against my texts
        share = softmax_loss_terms(lse_rows, pos_rows).sum() + softmax_loss_terms(lse_cols, pos_cols).sum()
        # Softmax statistics [2, B_r] of every rank, gathered as rows.
        all_rows = gather_rows(lse_rows.T, sizes, group).T
        all_cols = gather_rows(lse_cols.T, sizes, group).T
        ctx.save_for_backward(x, y, scale, xs, ys, lse_rows, lse_cols, all_rows, all_cols)
        ctx.norm, ctx.blocks, ctx.offset = norm, blocks, offset
        return (_all_reduce(share, group) * norm).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, y, scale, xs, ys, lse_rows, lse_cols, all_rows, all_cols = ctx.saved_tensors
        s = scale.detach()
        coef = grad_coef(grad_out, s, ctx.norm)
        off = ctx.offset
        dx, ds, _ = ctx.blocks.grad_rows(x, ys, s, None, lse_rows, all_cols, coef, off, None, "clip", False, x.dtype)
        dy = ctx.blocks.grad_cols(xs, y, s, None, all_rows, lse_cols, coef, -off, None, "clip", False, y.dtype)
        ds = ds.to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None
        return dx, dy, ds, None, None, None, None


class RingClipFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, scale, norm, blocks, group, sizes):
        ring = Ring(group)
        s = scale.detach()
        empty_stats = torch.zeros((2, x.shape[0]), dtype=torch.float32, device=x.device)
        empty_stats[0] = float("-inf")
        lse_rows, text, cols = empty_stats, y, empty_stats.T.contiguous()
        for step in range(ring.world):
            last = step == ring.world - 1
            text_arriving = None if last else ring.shift([text], sizes[ring.owner(step + 1)])
            pair = 0 if step == 0 else None  # my own texts hold my positive pairs
            stats, pos = blocks.lse_rows(x, text, s, pair)
            lse_rows = combine_stats(lse_rows, stats.float())
            stats, pos_t = blocks.lse_cols(x, text, s, pair)
            # Column statistics travel as rows [n, 2], like the features they belong to.
            cols = combine_stats(cols.T, stats.float()).T
            if step == 0:
                pos_rows, pos_cols = pos.float(), pos_t.float()
            # The statistics of the block just computed follow it; after the last step
            # they reach their owner.
            cols = ring.shift([cols], sizes[ring.owner(step + 1)])()[0]
            if not last:
                text = text_arriving()[0]
        lse_cols = cols.T.contiguous()
        share = softmax_loss_terms(lse_rows, pos_rows).sum() + softmax_loss_terms(lse_cols, pos_cols).sum()
        ctx.save_for_backward(x, y, scale, lse_rows, lse_cols)
        ctx.norm, ctx.blocks, ctx.group, ctx.sizes = norm, blocks, group, sizes
        return (_all_reduce(share, group) * norm).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, y, scale, lse_rows, lse_cols = ctx.saved_tensors
        ring, sizes, blocks = Ring(ctx.group), ctx.sizes, ctx.blocks
        s = scale.detach()
        coef = grad_coef(grad_out, s, ctx.norm)
        dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        ds = torch.zeros((), dtype=torch.float32, device=x.device)
        text, cols = y, lse_cols.T.contiguous()
        dtext = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
        for step in range(ring.world):
            last = step == ring.world - 1
            arriving = None if last else ring.shift([text, cols], sizes[ring.owner(step + 1)])
            pair = 0 if step == 0 else None  # my own texts hold my positive pairs
            args = (x, text, s, None, lse_rows, cols.T, coef, pair, None, "clip", False, torch.float32)
            d, ds_part, _ = blocks.grad_rows(*args)
            dx += d
            ds += ds_part
            dtext = ring.shift([dtext + blocks.grad_cols(*args)], sizes[ring.owner(step + 1)])()[0]
            if not last:
                text, cols = arriving()
        ds = ds.to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None
        return dx.to(x.dtype), dtext.to(y.dtype), ds, None, None, None, None


# ---- SigLIP (sigmoid) ----------------------------------------------------------------------


class AllGatherSigLipFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, scale, bias, blocks, group, sizes):
        offset = sum(sizes[: dist.get_rank(group)])
        xs, ys = gather_rows(x, sizes, group), gather_rows(y, sizes, group)
        share = blocks.sigmoid_rows(x, ys, scale.detach(), bias.detach(), offset).sum()
        ctx.save_for_backward(x, y, scale, bias, xs, ys)
        ctx.blocks, ctx.offset, ctx.total = blocks, offset, sum(sizes)
        return (_all_reduce(share, group) / ctx.total).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, y, scale, bias, xs, ys = ctx.saved_tensors
        s, b = scale.detach(), bias.detach()
        coef = grad_coef(grad_out, s, 1.0 / ctx.total)
        dx, ds, db = ctx.blocks.grad_rows(x, ys, s, b, None, None, coef, ctx.offset, None, "sigmoid", False, x.dtype)
        dy = ctx.blocks.grad_cols(xs, y, s, b, None, None, coef, -ctx.offset, None, "sigmoid", False, y.dtype)
        ds = ds.to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None
        db = db.to(bias.dtype).reshape(bias.shape) if ctx.needs_input_grad[3] else None
        return dx, dy, ds, db, None, None, None


class RingSigLipFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, scale, bias, blocks, group, sizes):
        ring = Ring(group)
        s, b = scale.detach(), bias.detach()
        share = torch.zeros((), dtype=torch.float32, device=x.device)
        text = y
        for step in range(ring.world):
            last = step == ring.world - 1
            arriving = None if last else ring.shift([text], sizes[ring.owner(step + 1)])
            share = share + blocks.sigmoid_rows(x, text, s, b, 0 if step == 0 else None).sum().float()
            if not last:
                text = arriving()[0]
        ctx.save_for_backward(x, y, scale, bias)
        ctx.blocks, ctx.group, ctx.sizes = blocks, group, sizes
        return (_all_reduce(share, group) / sum(sizes)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, y, scale, bias = ctx.saved_tensors
        ring, sizes, blocks = Ring(ctx.group), ctx.sizes, ctx.blocks
        s, b = scale.detach(), bias.detach()
        coef = grad_coef(grad_out, s, 1.0 / sum(sizes))
        dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        ds = torch.zeros((), dtype=torch.float32, device=x.device)
        db = torch.zeros((), dtype=torch.float32, device=x.device)
        text = y
        dtext = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
        for step in range(ring.world):
            last = step == ring.world - 1
            arriving = None if last else ring.shift([text], sizes[ring.owner(step + 1)])
            pair = 0 if step == 0 else None
            args = (x, text, s, b, None, None, coef, pair, None, "sigmoid", False, torch.float32)
            d, ds_part, db_part = blocks.grad_rows(*args)
            dx += d
            ds += ds_part
            db += db_part
            dtext = ring.shift([dtext + blocks.grad_cols(*args)], sizes[ring.owner(step + 1)])()[0]
            if not last:
                text = arriving()[0]
        ds = ds.to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None
        db = db.to(bias.dtype).reshape(bias.shape) if ctx.needs_input_grad[3] else None
        return dx.to(x.dtype), dtext.to(y.dtype), ds, db, None, None, None


# ---- entry points (called by mmfast.ops.clip_loss / siglip_loss) ----------------------------


def _checked_everywhere(checked, x, strategy, group, what, same):
    """Run the local argument checks, then agree with the other ranks; raises on every
    rank if any rank's checks failed. ``same(args)``: the arguments that must agree across
    ranks, as {name: number or one-element tensor}. Returns (what ``checked`` returned, sizes)."""
    try:
        args, error = checked(), None
        values = same(args)
    except (TypeError, ValueError, RuntimeError) as e:  # any local failure: no rank may hang
        args, error, values = None, e, None
    return args, agree(group, x, error, strategy, what, values)


def distributed_clip_loss(checked, x, y, reduction, group, strategy):
    def same(args):
        return {"reduction": float(REDUCTIONS.index(reduction)), "logit_scale": args[0]}

    (scale, blocks), sizes = _checked_everywhere(checked, x, strategy, group, "clip_loss", same)
    norm = 1.0 / (2 * sum(sizes)) if reduction == "mean" else 0.5
    fn = AllGatherClipFunction if strategy == "all_gather" else RingClipFunction
    return fn.apply(x, y, scale, norm, blocks, group, sizes)


def distributed_siglip_loss(checked, x, y, group, strategy):
    def same(args):
        return {"logit_scale": args[0], "logit_bias": args[1]}

    (scale, bias, blocks), sizes = _checked_everywhere(checked, x, strategy, group, "siglip_loss", same)
    fn = AllGatherSigLipFunction if strategy == "all_gather" else RingSigLipFunction
    return fn.apply(x, y, scale, bias, blocks, group, sizes)
