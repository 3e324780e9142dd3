"""open_clip's API of mmfast.nn.ClipLoss / SigLipLoss over two gloo ranks: get_logits
gathers as open_clip's does, and subclasses that override get_ground_truth or _loss get
open_clip's composition (its values and gradients: each rank's own loss, not scaled),
against the dense float64 loss of the concatenated batch."""

import torch
import torch.nn.functional as F

from tests.distributed.launcher import run_ranks
from tests.ops.test_contrastive_dist import TIMEOUT, _global_batch


def _check(rank, world):
    import mmfast

    class ShiftedLabels(mmfast.nn.ClipLoss):
        def get_ground_truth(self, device, num_logits):
            return super().get_ground_truth(device, num_logits).roll(1)

    class DenseSigLip(mmfast.nn.SigLipLoss):
        def _loss(self, *args, **kwargs):
            return super()._loss(*args, **kwargs)

    sizes, scale, bias = [3, 3], 6.0, -2.0
    xs, ys = _global_batch(sizes, 8, seed=1)
    rows = slice(3 * rank, 3 * rank + 3)

    # get_logits: global x global, or local rows x global columns with local_loss.
    x, y = xs[rows].float(), ys[rows].float()
    per_image, per_text = mmfast.nn.ClipLoss(rank=rank, world_size=2).get_logits(x, y, scale)
    torch.testing.assert_close(per_image, scale * xs.float() @ ys.float().T)
    torch.testing.assert_close(per_text, per_image.T)
    per_image, _ = mmfast.nn.ClipLoss(local_loss=True, rank=rank, world_size=2).get_logits(x, y, scale)
    torch.testing.assert_close(per_image, scale * x @ ys.float().T)

    # An overridden ground truth: open_clip's global loss on every rank, local gradients.
    x, y = xs[rows].clone().requires_grad_(), ys[rows].clone().requires_grad_()
    loss = ShiftedLabels(rank=rank, world_size=2)(x, y, scale)
    loss.backward()
    gx, gy = xs.clone().requires_grad_(), ys.clone().requires_grad_()
    logits = scale * gx @ gy.T
    labels = torch.arange(6).roll(1)
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    want.backward()
    torch.testing.assert_close(loss, want.detach())
    torch.testing.assert_close(x.grad, gx.grad[rows])
    torch.testing.assert_close(y.grad, gy.grad[rows])

    # An overridden _loss: open_clip's per-rank SigLIP loss (this rank's rows, / local B).
    x, y = xs[rows].clone().requires_grad_(), ys[rows].clone().requires_grad_()
    loss = DenseSigLip(rank=rank, world_size=2, backend="torch")(x, y, scale, bias)
    loss.backward()
    gx = xs[rows].clone().requires_grad_()
    sign = -torch.ones(3, 6, dtype=torch.float64)
    sign[torch.arange(3), torch.arange(3) + 3 * rank] = 1.0
    want = -F.logsigmoid(sign * (scale * gx @ ys.T + bias)).sum() / 3
    want.backward()
    torch.testing.assert_close(loss, want.detach())
    torch.testing.assert_close(x.grad, gx.grad)


def test_open_clip_api_over_two_ranks(tmp_path):
    run_ranks(_check, 2, tmp_path, timeout=TIMEOUT)
