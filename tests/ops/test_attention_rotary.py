"""attention(..., rotary=(cos, sin)): the fused Triton kernels, general and short-segment
(q/k rotated as they are loaded, dq/dk rotated back in the backward kernels), against
the float64 reference of the composition attention(*apply_rotary(q, k, cos, sin), v),
outputs, lse and dq/dk/dv, by the flash-attention rule; every backend taking the argument; table errors. Tiny shapes:
on CPU the kernels run under the Triton interpreter."""

import importlib

import pytest
import torch

import mmfast
from mmfast.ops.attention import attention_reference
from mmfast.ops.rotary import rotary_reference
from mmfast.testing import assert_matches_reference, random_tensor

# Empty and length-1 segments, and one longer than a 16-row CPU tile.
LENGTHS = [3, 0, 1, 23, 6]


def _cu(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _tables(lead, half, device):
    """Half-width cos/sin of random angles, float32 (the reference upcasts them)."""
    angles = torch.rand(*lead, half, dtype=torch.float64) * 6.3
    return angles.cos().float().to(device), angles.sin().float().to(device)


def _finite(lse):
    return lse.masked_fill(lse.isinf(), 0.0)


def _case(backend, cos, sin, *, cu=None, max_seqlen=None, causal=False, window=(-1, -1), return_lse=True):
    """(op, reference): the fused call, and the composition in plain PyTorch."""
    left, right = window[0], 0 if causal else window[1]

    def op(q, k, v):
        result = mmfast.ops.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_seqlen,
                                      max_seqlen_k=max_seqlen, causal=causal, window=window,
                                      rotary=(cos, sin), return_lse=return_lse, backend=backend)
        return (result[0], _finite(result[1])) if return_lse else result

    def reference(q, k, v):
        q, k = rotary_reference(q, cos, sin), rotary_reference(k, cos, sin)
        out, lse = attention_reference(q, k, v, cu, cu, left, right, upcast=False)
        return (out, _finite(lse)) if return_lse else out

    return op, reference


def _inputs(lead, heads, kv_heads, head_dim, dtype, device):
    return {"q": random_tensor((*lead, heads, head_dim), dtype, device),
            "k": random_tensor((*lead, kv_heads, head_dim), dtype, device),
            "v": random_tensor((*lead, kv_heads, head_dim), dtype, device)}


def _check_packed(backend, dtype, device, *, heads=4, kv_heads=2, head_dim=80, half=24, causal=True,
                  return_lse=True):
    cu = _cu(LENGTHS, device)
    cos, sin = _tables((sum(LENGTHS),), half, device)
    op, reference = _case(backend, cos, sin, cu=cu, max_seqlen=max(LENGTHS), causal=causal,
                          return_lse=return_lse)
    inputs = _inputs((sum(LENGTHS),), heads, kv_heads, head_dim, dtype, device)
    assert_matches_reference(op, reference, inputs, grad_inputs=("q", "k", "v"))


# ---- the fused kernels -------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "triton_short"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_packed_gqa_causal_partial_rotary(dtype, backend, device):
    # hd 80 (tiled as 64 + 16 columns), R = 48 < D: the last 32 columns pass through.
    # triton_short: several segments share a CPU tile, and the 23-token one spans two
    # query chunks, so dk is summed over chunks before it is rotated back.
    _check_packed(backend, dtype, device)


@pytest.mark.parametrize("backend", ["triton", "triton_short"])
@pytest.mark.parametrize("table_batch", [False, True], ids=["shared-table", "per-batch-table"])
def test_padded_window_full_rotary(table_batch, backend, device):
    # R = D = 80: the partners of columns 40..79 are 0..39; MQA; a two-sided window.
    # triton_short flattens the batch into segments: each must find its own table rows.
    batch, tokens = 2, 19
    cos, sin = _tables((batch, tokens) if table_batch else (tokens,), 40, device)
    op, reference = _case(backend, cos, sin, window=(6, 2))
    inputs = _inputs((batch, tokens), 4, 1, 80, torch.float16, device)
    assert_matches_reference(op, reference, inputs, grad_inputs=("q", "k", "v"))


@pytest.mark.parametrize("backend", ["triton", "triton_short"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim,half", [(72, 36), (24, 12)])
def test_full_rotary_across_head_dim_pieces(head_dim, half, dtype, backend, device):
    # 72 = 64 + 16 (8 masked): columns 28..35 pair with 64..71 in the tail piece, so the
    # backward's rotation gathers across pieces. 24: one 32-wide piece, 8 columns masked.
    _check_packed(backend, dtype, device, head_dim=head_dim, half=half)


def test_odd_pair_count_small_head_dim(device):
    # half = 5 (R = 10 of D = 32): partner offsets that are no power of two; MHA, no mask.
    _check_packed("triton", torch.float32, device, heads=2, kv_heads=2, head_dim=32, half=5, causal=False)


def test_fused_is_the_composition(device):
    # Against the unfused op itself (same kernels, q/k rotated beforehand): equal up to
    # the rounding of dq/dk, which the composition rounds once more before rotating back.
    cu = _cu(LENGTHS, device)
    tokens = sum(LENGTHS)
    cos, sin = _tables((tokens,), 24, device)
    q, k, v = (t.requires_grad_() for t in _inputs((tokens,), 4, 2, 80, torch.float32, device).values())
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=23, max_seqlen_k=23, causal=True, backend="triton")
    fused = mmfast.ops.attention(q, k, v, rotary=(cos, sin), **kw)
    grads_fused = torch.autograd.grad(fused, (q, k, v), torch.ones_like(fused))
    composed = mmfast.ops.attention(*mmfast.ops.apply_rotary(q, k, cos, sin), v, **kw)
    grads_composed = torch.autograd.grad(composed, (q, k, v), torch.ones_like(composed))
    torch.testing.assert_close(fused, composed, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads_fused, grads_composed):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "triton_short"])
def test_compile_fullgraph_with_rotary(backend, device):
    cu = _cu([5, 0, 12], device)
    cos, sin = _tables((17,), 8, device)

    def block(q, kv):
        out = mmfast.ops.attention(q, kv, kv, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=12, max_seqlen_k=12,
                                   causal=True, rotary=(cos, sin), backend=backend)
        return torch.tanh(out).sum()

    q, kv, _ = _inputs((17,), 2, 1, 32, torch.float32, device).values()
    results = []
    for fn in (block, torch.compile(block, fullgraph=True)):
        leaves = [q.clone().requires_grad_(), kv.clone().requires_grad_()]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss] + [t.grad for t in leaves])
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_shapes(dtype, device):
    # Qwen2.5-VL-like full layer (hd 80, all columns rotated) and hd 128 with partial rotary.
    for head_dim, half, lengths in ((80, 40, [700, 1, 333]), (128, 32, [1024, 517])):
        cu = _cu(lengths, device)
        cos, sin = _tables((sum(lengths),), half, device)
        op, reference = _case("triton", cos, sin, cu=cu, max_seqlen=max(lengths), causal=head_dim == 128)
        inputs = _inputs((sum(lengths),), 8, 2, head_dim, dtype, device)
        assert_matches_reference(op, reference, inputs, grad_inputs=("q", "k", "v"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_short_windows(dtype, device):
    # Qwen2.5-VL window layers: 64-token windows and a short edge one, hd 80, all columns rotated.
    lengths = [64] * 30 + [36, 64, 16]
    cu = _cu(lengths, device)
    cos, sin = _tables((sum(lengths),), 40, device)
    op, reference = _case("triton_short", cos, sin, cu=cu, max_seqlen=64)
    inputs = _inputs((sum(lengths),), 16, 16, 80, dtype, device)
    assert_matches_reference(op, reference, inputs, grad_inputs=("q", "k", "v"))


# ---- every backend ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "torch"])
def test_every_backend_accepts_rotary(backend, device):
    # They compose apply_rotary and attention; sdpa returns no lse.
    _check_packed(backend, torch.float32, device, head_dim=64, return_lse=backend != "sdpa")


def test_default_dispatch_with_rotary(monkeypatch, device):
    # Short segments still go to triton_short, which gets the tables itself: no separate
    # rotary pass, and the same answer as the general fused kernel.
    from mmfast.kernels import attention_short

    attention_ops = importlib.import_module("mmfast.ops.attention")  # the module, not the op

    launched = []
    for name in ("attention_short_fwd", "attention_short_bwd"):
        original = getattr(attention_short, name)

        def record(*args, _name=name, _original=original, **kwargs):
            launched.append((_name, args[-3] is not None))  # (.., cos, sin, table_seg_stride)
            return _original(*args, **kwargs)

        monkeypatch.setattr(attention_short, name, record)

    def no_rotary_pass(*args, **kwargs):
        raise AssertionError("apply_rotary called: the short path should fuse rotary")

    monkeypatch.setattr(attention_ops, "apply_rotary", no_rotary_pass)
    cu = _cu(LENGTHS, device)
    cos, sin = _tables((sum(LENGTHS),), 16, device)
    q, k, v = (t.requires_grad_() for t in _inputs((sum(LENGTHS),), 2, 1, 32, torch.float32, device).values())
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=23, max_seqlen_k=23, rotary=(cos, sin))
    out = mmfast.ops.attention(q, k, v, **kw)
    out.sum().backward()
    assert launched == [("attention_short_fwd", True), ("attention_short_bwd", True)]
    with torch.no_grad():
        torch.testing.assert_close(out, mmfast.ops.attention(q, k, v, backend="triton", **kw),
                                   rtol=1e-5, atol=1e-6)


def test_tables_that_require_grad_get_the_composition(device):
    # The fused kernels give the tables no gradient: such calls take the composition.
    tokens = sum(LENGTHS)
    cu = _cu(LENGTHS, device)
    cos, sin = (t.requires_grad_() for t in _tables((tokens,), 8, device))
    q, k, v = _inputs((tokens,), 2, 2, 32, torch.float32, device).values()
    out = mmfast.ops.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=23, max_seqlen_k=23,
                               rotary=(cos, sin), backend="triton")
    grad_cos, grad_sin = torch.autograd.grad(out.square().sum(), (cos, sin))
    cos_ref, sin_ref = (t.detach().double().requires_grad_() for t in (cos, sin))
    expected, _ = attention_reference(rotary_reference(q.double(), cos_ref, sin_ref),
                                      rotary_reference(k.double(), cos_ref, sin_ref), v.double(), cu, cu)
    expected_cos, expected_sin = torch.autograd.grad(expected.square().sum(), (cos_ref, sin_ref))
    torch.testing.assert_close(grad_cos.double(), expected_cos, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_sin.double(), expected_sin, rtol=1e-4, atol=1e-4)


# ---- bad tables ---------------------------------------------------------------------


def _bad_tables(device):
    tokens, half = 5, 4
    cos, sin = torch.ones(tokens, half, device=device), torch.zeros(tokens, half, device=device)
    return {
        "not-a-pair": (cos,),
        "not-tensors": (cos.tolist(), sin.tolist()),
        "int-dtype": (cos.int(), sin.int()),
        "other-device": (cos.to("meta"), sin.to("meta")),
        "sin-shape": (cos, sin[:, :2]),
        "token-count": (cos[:4], sin[:4]),
        "full-width": (torch.ones(tokens, 16, device=device), torch.zeros(tokens, 16, device=device)),
        "no-pairs": (cos[:, :0], sin[:, :0]),
        "batch-table-for-packed": (cos[None], sin[None]),
    }


@pytest.mark.parametrize("case", list(_bad_tables(torch.device("cpu"))))
def test_bad_tables_raise(case, device):
    q = torch.randn(5, 2, 16, device=device)
    cu = torch.tensor([0, 5], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="rotary"):
        mmfast.ops.attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=5, max_seqlen_k=5,
                             rotary=_bad_tables(device)[case])


def test_rotary_needs_the_same_tokens_for_q_and_k(device):
    q, k = torch.randn(1, 5, 2, 32, device=device), torch.randn(1, 7, 2, 32, device=device)
    cos, sin = _tables((5,), 8, device)
    with pytest.raises(ValueError, match="rotary: needs q and k over the same tokens"):
        mmfast.ops.attention(q, k, k, rotary=(cos, sin))
