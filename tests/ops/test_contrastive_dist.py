"""Distributed CLIP / SigLIP losses on CPU with gloo: 2 and 4 processes, both strategies,
against the dense float64 loss and gradients of the concatenated batch; ranks with
different local batch sizes; a bad argument on one rank raises on every rank (no hang).

Processes are few and tiny, started by tests/distributed/launcher.py (forked where the
platform forks: no import cost per process)."""

import datetime

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launcher import run_ranks

TIMEOUT = datetime.timedelta(seconds=180)  # a hang fails the test instead of blocking CI


def _global_batch(sizes, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b = sum(sizes)
    return torch.randn(b, d, generator=gen, dtype=torch.float64), torch.randn(b, d, generator=gen, dtype=torch.float64)


def _exact(kind, x, y, scale, bias):
    """Loss and gradients of the concatenated batch, densely in float64."""
    from mmfast.ops.contrastive import clip_loss_reference, siglip_loss_reference

    x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    loss = clip_loss_reference(x, y, s) if kind == "clip" else siglip_loss_reference(x, y, s, b)
    loss.backward()
    return loss.detach(), x.grad, y.grad, s.grad, b.grad


def _check_rank(rank, sizes, backend):
    import mmfast

    d, scale, bias = 12, 9.0, -3.0
    xs, ys = _global_batch(sizes, d)
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    for kind in ("clip", "siglip"):
        loss_ref, dx_ref, dy_ref, ds_ref, db_ref = _exact(kind, xs, ys, scale, bias)
        for strategy in ("all_gather", "ring"):
            x = xs[start:stop].float().requires_grad_()
            y = ys[start:stop].float().requires_grad_()
            s = torch.tensor(scale, requires_grad=True)
            b = torch.tensor(bias, requires_grad=True)
            if kind == "clip":
                loss = mmfast.ops.clip_loss(x, y, s, group=dist.group.WORLD, strategy=strategy, backend=backend)
            else:
                loss = mmfast.ops.siglip_loss(x, y, s, b, group=dist.group.WORLD, strategy=strategy, backend=backend)
            (loss * 1.5).backward()  # an upstream gradient other than 1
            what = f"rank {rank} {kind} {strategy} {backend}"
            # float32 against float64: the logits (|s x.y| up to ~100 here) carry rounding
            # of ~1e-5, and under all_gather the row and column softmaxes see scores from
            # differently aligned tiles, which agree only to that rounding.
            close = dict(rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(loss.double(), loss_ref, **close, msg=what)
            torch.testing.assert_close(x.grad.double(), 1.5 * dx_ref[start:stop], **close, msg=what)
            torch.testing.assert_close(y.grad.double(), 1.5 * dy_ref[start:stop], **close, msg=what)
            # Scale and bias gradients are shares: they add up over the ranks.
            shares = torch.stack([s.grad, b.grad if kind == "siglip" else torch.tensor(0.0)])
            dist.all_reduce(shares)
            torch.testing.assert_close(shares[0].double(), 1.5 * ds_ref, **close, msg=what)
            if kind == "siglip":
                torch.testing.assert_close(shares[1].double(), 1.5 * db_ref, **close, msg=what)


def _check_bad_argument_fails_everywhere(rank):
    import mmfast

    # Rank 1 passes a feature dim of 7 where rank 0 passes 8; then rank 0 a bad strategy.
    d = 8 if rank == 0 else 7
    x = torch.randn(3, d)
    with pytest.raises(ValueError, match="disagree on the feature dim"):
        mmfast.ops.clip_loss(x, x, 2.0, group=dist.group.WORLD, backend="torch")
    y = torch.randn(3, 8) if rank == 0 else torch.randn(4, 8)  # rank 1: text rows != image rows
    x = torch.randn(3, 8)
    expected = "text_features: expected shape" if rank == 1 else r"invalid arguments on rank\(s\) \[1\]"
    with pytest.raises(ValueError, match=expected):
        mmfast.ops.siglip_loss(x, y, 2.0, group=dist.group.WORLD, strategy="ring", backend="torch")
    # Arguments that must agree across ranks (issue 16): each rank would get another
    # "global" loss (3.62 vs 28.97 for the reduction).
    x = torch.randn(3, 8)
    reduction = "mean" if rank == 0 else "sum"
    with pytest.raises(ValueError, match=r"reduction: must be the same on every rank of the group, got \[0.0, 1.0\]"):
        mmfast.ops.clip_loss(x, x, 2.0, reduction=reduction, group=dist.group.WORLD, backend="torch")
    with pytest.raises(ValueError, match=r"logit_scale: must be the same on every rank of the group, got \[2.0, 3.0\]"):
        mmfast.ops.clip_loss(x, x, torch.tensor(2.0 + rank), group=dist.group.WORLD, backend="torch")
    with pytest.raises(ValueError, match=r"logit_bias: must be the same on every rank"):
        mmfast.ops.siglip_loss(x, x, 2.0, None if rank == 0 else -1.0, group=dist.group.WORLD, backend="torch")
    loss = mmfast.ops.clip_loss(x, x, 2.0, reduction="sum", group=dist.group.WORLD, backend="torch")
    assert torch.isfinite(loss)  # the agreement did not break the call that agrees


def _check(rank, world, sizes, backend, check_errors):
    _check_rank(rank, sizes, backend)
    if check_errors:
        _check_bad_argument_fails_everywhere(rank)


def test_two_ranks_unequal_shards_and_errors(tmp_path):
    # Rank 0 holds 5 rows and rank 1 holds 3. The strategies are written over the block
    # primitives, which tests/ops/test_contrastive.py checks per backend; the workers use
    # the torch backend (the Triton interpreter would make them slow and load-sensitive).
    run_ranks(_check, 2, tmp_path, [5, 3], "torch", True, timeout=TIMEOUT)


def test_four_ranks_torch_backend(tmp_path):
    # Four ranks, one of them empty: the ring passes an empty block along.
    run_ranks(_check, 4, tmp_path, [3, 2, 0, 4], "torch", False, timeout=TIMEOUT)
