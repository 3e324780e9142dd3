"""Head-dim tiling of the Triton attention kernels (kernels/_head_dim.py): the pieces
each launcher passes to each dot kernel cover the head dim with power-of-two tiles of at
least 16 columns, and issue at most 1.12x the useful tensor-core work at the vision
towers' head dims 72 and 80 (a 128-wide tile issued 1.78x and 1.6x)."""

import pytest
import torch

import mmfast
from mmfast.kernels import attention, attention_short, cross_attention
from mmfast.kernels._head_dim import head_dim_pieces, issued_over_useful, row_align
from mmfast.testing import random_tensor

# Every kernel with a tl.dot, per launcher module.
DOT_KERNELS = {
    attention: ("_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"),
    attention_short: ("_attention_short_fwd_kernel", "_attention_short_bwd_kernel"),
    cross_attention: ("_cross_attention_fwd_kernel", "_cross_attention_bwd_dkdv_kernel",
                      "_cross_attention_bwd_dq_kernel"),
}


class _Recorder:
    """Stands in for a kernel: records the constexpr arguments of each launch, then runs it."""

    def __init__(self, kernel, name, launches):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def launches(monkeypatch):
    recorded = []
    for module, names in DOT_KERNELS.items():
        for name in names:
            monkeypatch.setattr(module, name, _Recorder(getattr(module, name), name, recorded))
    return recorded


def _run_everything(head_dim, device):
    """Forward and backward of every backend that has Triton dot kernels."""
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=device)
    for backend in ("triton", "triton_short"):
        q, k, v = (random_tensor((12, 2, head_dim), torch.float16, device).requires_grad_() for _ in range(3))
        out = mmfast.ops.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=7, max_seqlen_k=7,
                                   backend=backend)
        out.float().sum().backward()
    q = random_tensor((12, 2, head_dim), torch.float16, device).requires_grad_()
    k, v = (random_tensor((9, 2, head_dim), torch.float16, device).requires_grad_() for _ in range(2))
    cu_k = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    out = mmfast.ops.cross_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu_k, backend="triton")
    out.float().sum().backward()


@pytest.mark.parametrize("head_dim", [72, 80])
def test_issued_over_useful_at_vision_head_dims(head_dim, launches, device):
    _run_everything(head_dim, device)
    seen = {name for name, _ in launches}
    assert seen == {name for names in DOT_KERNELS.values() for name in names}
    for name, kwargs in launches:
        pieces = (kwargs["HEAD_D0"], kwargs["HEAD_D1"])
        issued = sum(pieces) / head_dim
        assert issued <= 1.12, f"{name}: pieces {pieces} issue {issued:.3f}x the useful work at D={head_dim}"
        assert pieces == (64, 16), name


@pytest.mark.parametrize("head_dim,pieces", [
    (8, (16, 0)), (16, (16, 0)), (24, (32, 0)), (32, (32, 0)), (40, (32, 16)), (64, (64, 0)),
    (72, (64, 16)), (80, (64, 16)), (96, (64, 32)), (112, (128, 0)), (128, (128, 0)),
    (160, (128, 32)), (200, (256, 0)), (256, (256, 0)),
])
def test_pieces(head_dim, pieces):
    assert head_dim_pieces(head_dim) == pieces
    main, tail = pieces
    assert main >= 16 and main & (main - 1) == 0
    assert tail == 0 or (tail >= 16 and tail & (tail - 1) == 0 and main < head_dim)
    assert head_dim <= main + tail <= max(16, 1 << (head_dim - 1).bit_length())


@pytest.mark.parametrize("head_dim", range(8, 257, 8))
def test_never_worse_than_padding(head_dim):
    padded = max(16, 1 << (head_dim - 1).bit_length()) / head_dim
    assert issued_over_useful(head_dim) <= padded


def test_row_align():
    assert row_align(torch.empty(10, 16, 72)) == 8  # head stride 72, token stride 1152
    assert row_align(torch.empty(10, 3, 36)) == 4
    assert row_align(torch.empty(10, 16, 72)[:, :, 1:]) == 8  # strides, not the start
    assert row_align(torch.empty(10, 4, 64), torch.empty(5, 7)) == 1
