"""Retrieval metrics and zero-shot top-k against dense formulas. Small-integer features
make every score exact in fp16 and fp32, so ranks (ties included) must match exactly."""

import pytest
import torch

import mmfast
from mmfast.ops.retrieval import retrieval_ranks


def _int_features(b, d, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, (b, d), generator=gen).to(device=device, dtype=dtype)


def _dense_ranks(x, y):
    s = x.double() @ y.double().T
    diag = s.diagonal()
    return (s > diag[:, None]).sum(1), (s > diag[None, :]).sum(0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("b,dtype", [(1, torch.float32), (37, torch.float16), (200, torch.float32)], ids=str)
def test_ranks_match_dense(b, dtype, backend, device):
    x, y = _int_features(b, 20, dtype, device, 0), _int_features(b, 20, dtype, device, 1)
    to_text, to_image = retrieval_ranks(x, y, backend=backend)
    ref_text, ref_image = _dense_ranks(x, y)
    assert torch.equal(to_text.long().cpu(), ref_text.cpu())
    assert torch.equal(to_image.long().cpu(), ref_image.cpu())


def test_metrics_from_ranks(device):
    x, y = _int_features(40, 16, torch.float32, device, 2), _int_features(40, 16, torch.float32, device, 3)
    y[:10] = x[:10] * 2  # some easy matches, so the recalls are not all zero
    m = mmfast.ops.retrieval_metrics(x, y, ks=(1, 5, 10), backend="triton")
    to_text, to_image = _dense_ranks(x, y)
    for name, ranks in (("image_to_text", to_text.double()), ("text_to_image", to_image.double())):
        for k in (1, 5, 10):
            assert m[f"{name}_R@{k}"] == pytest.approx((ranks < k).double().mean().item())
        assert m[f"{name}_mrr"] == pytest.approx((1 / (ranks + 1)).mean().item())
        assert m[f"{name}_mean_rank"] == pytest.approx(ranks.mean().item() + 1)
        assert m[f"{name}_median_rank"] == torch.floor(ranks.median()).item() + 1
    assert m["image_to_text_R@10"] >= 0.25


def test_zero_shot_topk(device):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(70, 24, generator=gen).to(device)
    classes = torch.randn(13, 24, generator=gen).to(device)
    scores, idx = mmfast.ops.zero_shot_topk(x, classes, k=3, chunk=32)
    ref = torch.topk(x.double() @ classes.double().T, 3, dim=1)
    assert torch.equal(idx, ref.indices)
    torch.testing.assert_close(scores.double(), ref.values, rtol=1e-5, atol=1e-5)


def test_bad_input(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="ks: expected"):
        mmfast.ops.retrieval_metrics(x, x, ks=(0,))
    with pytest.raises(ValueError, match="text_features: expected shape"):
        mmfast.ops.retrieval_metrics(x, x[:3])
    with pytest.raises(ValueError, match="k: expected an int"):
        mmfast.ops.zero_shot_topk(x, x, k=5)
    with pytest.raises(ValueError, match="class_text_features: expected feature dim"):
        mmfast.ops.zero_shot_topk(x, torch.randn(3, 9, device=device), k=1)
