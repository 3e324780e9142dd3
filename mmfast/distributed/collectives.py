"""The torch.distributed collectives sequence parallelism needs, with autograd.

Only torch.distributed's own collectives move data: ``all_to_all_single`` (NCCL and, in
torch 2.x, gloo implement it, so CPU tests and GPU runs take the same path) and
``all_gather``. Each is wrapped in a small ``autograd.Function`` whose backward is the
adjoint collective. (torch.distributed.nn.functional has autograd versions too, but they
are deprecated in favour of a private module; the adjoints are one line each.)

These functions graph-break under torch.compile: compile the model's blocks, not the
communication between them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def resolve_group(group, name: str = "group"):
    """The process group to use (``None``: the default group), checked; raises
    ValueError/TypeError naming ``name`` when torch.distributed is not usable."""
    if not dist.is_available():
        raise ValueError(f"{name}: this torch was built without torch.distributed")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name}: expected a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    if not dist.is_initialized():
        raise ValueError(f"{name}: torch.distributed is not initialised; call "
                         "torch.distributed.init_process_group first")
    if group is None:
        return dist.group.WORLD
    if dist.get_rank(group) < 0:
        raise ValueError(f"{name}: this process is not a member of the group")
    return group


class _AllToAll(torch.autograd.Function):
    """``out[r] = (rank r's x)[my rank]`` along dim 0 (equal blocks). The adjoint of
    this block permutation is the same exchange, so the backward is one more call."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def all_to_all(x: Tensor, group) -> Tensor:
    """Exchange equal blocks of ``x`` along dim 0 (size = world size): block r goes to
    rank r, and block r of the result came from rank r. Differentiable."""
    return _AllToAll.apply(x, group)


class _GatherReplicated(torch.autograd.Function):
    """Concatenate every rank's ``x`` along dim 0 (equal shapes), in rank order.

    Backward: this rank's block of the incoming gradient, no communication. That is the
    exact gradient when everything downstream of the gather is replicated (every rank
    computes the same loss from the same gathered tensor), which is how a
    sequence-parallel model is used: its gathered output is the single-process output.
    (The usual all_gather adjoint, a reduce-scatter sum, would count that loss once per
    rank.)"""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        world = dist.get_world_size(group)
        ctx.rank, ctx.rows = dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def gather_replicated(x: Tensor, group) -> Tensor:
    """Every rank's ``x`` (equal shapes) concatenated along dim 0 in rank order; the
    gradient convention is that of a replicated downstream (see _GatherReplicated)."""
    return _GatherReplicated.apply(x, group)
