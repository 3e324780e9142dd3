"""Inputs that gave a silent wrong result, an out-of-bounds read or an unclear error
(issue 16 items 6, 7 and the "unclear errors" list): each is now a ValueError / TypeError
naming the argument, or the right answer."""

import math

import pytest
import torch

import mmfast
from mmfast.ops import StepCoefficients, StepTable
from mmfast.ops.attention import attention_mask


@pytest.mark.parametrize("chunk", [0, -1, 2.0, True])
def test_zero_shot_topk_chunk_must_be_positive(chunk):
    x, classes = torch.randn(5, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="chunk: expected a positive int"):
        mmfast.ops.zero_shot_topk(x, classes, k=2, chunk=chunk)
    scores, idx = mmfast.ops.zero_shot_topk(x, classes, k=2, chunk=1)
    torch.testing.assert_close(idx, torch.topk(x @ classes.T, 2, dim=1).indices)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_step_table_reset_out_of_range_and_negative_counter(backend):
    table = StepTable.build([StepCoefficients(cx=1.0, cm=-0.1), StepCoefficients(cx=1.0, cm=-0.2)], "cpu")
    for step in (-5, 3, 1.0, True):
        with pytest.raises(ValueError, match=r"step: expected an int in \[0, 2\]"):
            table.reset(step)
    x, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    table.reset(1)
    out = mmfast.ops.guided_step(x, eps, table, backend=backend)
    torch.testing.assert_close(out, x - 0.2 * eps)
    # A counter written negative behind reset's back reads the NaN sentinel row, never
    # out of bounds (torch raised IndexError; Triton read before the table).
    table.counter.fill_(-5)
    out = mmfast.ops.guided_step(x, eps, table, backend=backend)
    assert out.isnan().all()
    table.counter.fill_(1000)
    assert mmfast.ops.guided_step(x, eps, table, backend=backend).isnan().all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_cross_entropy_small_integer_targets_and_ignore_index_range(backend):
    h, w = torch.randn(6, 16), torch.randn(10, 16)
    target = torch.tensor([1, 2, 3, 9, 0, 4])
    expected = mmfast.ops.linear_cross_entropy(h, w, target, backend="torch")
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        torch.testing.assert_close(mmfast.ops.linear_cross_entropy(h, w, target.to(dtype), backend=backend), expected)
    for dtype in (torch.float32, torch.bool, torch.uint16):
        with pytest.raises(TypeError, match=r"target: expected an integer dtype of class indices \(int64"):
            mmfast.ops.linear_cross_entropy(h, w, target.to(dtype), backend=backend)
    for ignore_index in (2 ** 63, -2 ** 63 - 1):
        with pytest.raises(ValueError, match="ignore_index: expected an int64 value"):
            mmfast.ops.linear_cross_entropy(h, w, target, ignore_index=ignore_index, backend=backend)


def test_patch_embed_zero_size_patch():
    with pytest.raises(ValueError, match=r"weight: expected a patch size P >= 1"):
        mmfast.ops.patch_embed(torch.randn(1, 3, 4, 4), torch.randn(8, 3, 0, 0))


def test_default_attention_with_last_entry_below_the_token_count():
    q = torch.randn(12, 2, 16)
    cu = torch.tensor([0, 3, 7, 10], dtype=torch.int32)
    for backend in (None, "torch", "sdpa"):
        with pytest.raises(ValueError, match="cu_seqlens_q: expected the last entry to equal the token count 12"):
            mmfast.ops.attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=4, max_seqlen_k=4,
                                 backend=backend)
    # The mask builder itself stays inside cu_seqlens (it runs on CUDA without a sync):
    # tokens past the last entry are in no segment and see nothing.
    mask = attention_mask(cu, cu, 12, 12, -1, -1, "cpu")
    assert not mask[10:].any() and not mask[:, 10:].any() and mask[7:10, 7:10].all()
    assert not attention_mask(cu[:1], cu[:1], 3, 3, -1, -1, "cpu").any()


def test_qwen_vision_indices_refuses_a_huge_grid_before_allocating():
    with pytest.raises(ValueError, match=r"grid_thw: 1099511627776 patches in all"):
        mmfast.ops.qwen_vision_indices(torch.tensor([[1, 2 ** 20, 2 ** 20]]))


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 10 ** 400])
def test_contrastive_losses_refuse_a_non_finite_python_scale(value):
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="logit_scale: expected a finite number"):
        mmfast.ops.clip_loss(x, y, value)
    with pytest.raises(ValueError, match="logit_scale: expected a finite number"):
        mmfast.ops.siglip_loss(x, y, value, -10.0)
    with pytest.raises(ValueError, match="logit_bias: expected a finite number"):
        mmfast.ops.siglip_loss(x, y, 10.0, value)
