"""attention(..., qk_norm=(q_weight, k_weight, eps)): the per-head RMSNorm of q and k fused
into the Triton kernels (q tiles normalised on load, then rotated; the backward through
normalised copies and the RMSNorm backward kernel), against the float64 reference of the
composition attention(*apply_rotary(rms_norm(q), rms_norm(k)), v) by the flash-attention
rule: outputs, lse, and the gradients of q, k, v and both weights. The other backends
compose; bad arguments name ``qk_norm``. Tiny shapes: on CPU the kernels run under the
Triton interpreter."""

import importlib

import pytest
import torch

import mmfast
from mmfast.ops.attention import attention_reference
from mmfast.ops.norm import norm_reference
from mmfast.ops.rotary import rotary_reference
from mmfast.testing import assert_matches_reference, random_tensor

# An empty and a length-1 segment, and one longer than a 16-row CPU tile.
LENGTHS = [3, 0, 1, 19, 6]
EPS = 1e-6

attention_ops = importlib.import_module("mmfast.ops.attention")  # the module, not the op


def _cu(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _tables(lead, half, device):
    angles = torch.rand(*lead, half, dtype=torch.float64) * 6.3
    return angles.cos().float().to(device), angles.sin().float().to(device)


def _finite(lse):
    return lse.masked_fill(lse.isinf(), 0.0)


def _check(backend, lead, heads, kv_heads, head_dim, dtype, device, *, cu=None, max_seqlen=None, tables=None,
           causal=False, window=(-1, -1), weights=(True, True), return_lse=True):
    """The fused call against the composition, for q, k, v and the weights that are given."""
    left, right = window[0], 0 if causal else window[1]
    rows = torch.Size(lead).numel()

    def normalise(x, w):
        return norm_reference(x, w, None, None, EPS, True)[0]

    def op(q, k, v, q_weight=None, k_weight=None):
        result = mmfast.ops.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_seqlen,
                                      max_seqlen_k=max_seqlen, causal=causal, window=window, rotary=tables,
                                      qk_norm=(q_weight, k_weight, EPS), return_lse=return_lse, backend=backend)
        return (result[0], _finite(result[1])) if return_lse else result

    def reference(q, k, v, q_weight=None, k_weight=None):
        q, k = normalise(q, q_weight), normalise(k, k_weight)
        if tables is not None:
            q, k = rotary_reference(q, *tables), rotary_reference(k, *tables)
        out, lse = attention_reference(q, k, v, cu, cu, left, right, upcast=False)
        return (out, _finite(lse)) if return_lse else out

    inputs = {"q": random_tensor((*lead, heads, head_dim), dtype, device),
              "k": random_tensor((*lead, kv_heads, head_dim), dtype, device),
              "v": random_tensor((*lead, kv_heads, head_dim), dtype, device)}
    grads = ["q", "k", "v"]
    summed = {}
    for name, given, h in (("q_weight", weights[0], heads), ("k_weight", weights[1], kv_heads)):
        if given:  # around 1, as trained norms are; summed over every row of its tensor
            inputs[name] = random_tensor((head_dim,), dtype, device, scale=0.5, offset=1.0)
            grads.append(name)
            summed[f"grad of {name}"] = rows * h
    assert_matches_reference(op, reference, inputs, grad_inputs=tuple(grads), summed_over=summed)


# ---- the fused kernels (backend triton) ------------------------------------------------


@pytest.mark.parametrize("dtype,head_dim,half", [(torch.float16, 80, 24), (torch.float32, 80, 24),
                                                  (torch.float16, 64, 32)], ids=str)
def test_packed_gqa_causal_partial_rotary(dtype, head_dim, half, device):
    # hd 80 (tiled as 64 + 16 columns: q is prepared by the pass that prepares k), R = 48 < D,
    # GQA 2/1; hd 64 (one piece: q normalised and rotated as the forward loads it).
    cu = _cu(LENGTHS, device)
    tables = _tables((sum(LENGTHS),), half, device)
    _check("triton", (sum(LENGTHS),), 2, 1, head_dim, dtype, device, cu=cu, max_seqlen=max(LENGTHS),
           tables=tables, causal=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_padded_without_rotary_one_weight(dtype, device):
    # The norm alone (k prepared without a rotation); q without affine, k with; MQA; a window.
    _check("triton", (2, 13), 3, 1, 64, dtype, device, window=(4, 2), weights=(False, True))


def test_padded_full_rotary_per_batch_table_no_weights(device):
    # R = D = 72 (64 + 16, 8 masked: partners across pieces), tables [B, T, R/2], no affine.
    tables = _tables((2, 11), 36, device)
    _check("triton", (2, 11), 2, 2, 72, torch.float16, device, tables=tables, weights=(False, False))


def test_fused_runs_no_separate_norm(monkeypatch, device):
    # The triton backend takes the norm itself: rms_norm is never called by the op layer.
    def no_norm_pass(*args, **kwargs):
        raise AssertionError("rms_norm called: the triton backend should fuse qk_norm")

    monkeypatch.setattr(attention_ops, "rms_norm", no_norm_pass)
    q = random_tensor((2, 9, 2, 32), torch.float32, device)
    w = random_tensor((32,), torch.float32, device)
    out = mmfast.ops.attention(q, q, q, qk_norm=(w, w, EPS), rotary=_tables((9,), 16, device), backend="triton")
    assert out.shape == q.shape


def test_compile_fullgraph_with_qk_norm(device):
    cu = _cu([5, 0, 12], device)
    tables = _tables((17,), 8, device)

    def block(q, kv, w):
        out = mmfast.ops.attention(q, kv, kv, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=12, max_seqlen_k=12,
                                   causal=True, rotary=tables, qk_norm=(w, w, EPS), backend="triton")
        return torch.tanh(out).sum()

    q = random_tensor((17, 2, 32), torch.float32, device)
    kv = random_tensor((17, 1, 32), torch.float32, device)
    w = random_tensor((32,), torch.float32, device, offset=1.0)
    results = []
    for fn in (block, torch.compile(block, fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in (q, kv, w)]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss] + [t.grad for t in leaves])
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_flux_like(dtype, device):
    # FLUX-like: hd 128, every column rotated, padded; and packed hd 80 with GQA.
    tables = _tables((1, 700), 64, device)
    _check("triton", (1, 700), 8, 8, 128, dtype, device, tables=tables)
    cu = _cu([517, 1, 300], device)
    _check("triton", (818,), 8, 2, 80, dtype, device, cu=cu, max_seqlen=517, tables=_tables((818,), 40, device),
           causal=True)


# ---- every other backend composes ---------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton_short", "sdpa", "torch"])
def test_other_backends_compose(backend, device):
    cu = _cu(LENGTHS, device)
    tables = _tables((sum(LENGTHS),), 16, device)
    _check(backend, (sum(LENGTHS),), 2, 1, 32, torch.float32, device, cu=cu, max_seqlen=max(LENGTHS),
           tables=tables, causal=True, return_lse=backend != "sdpa")


def test_tables_with_grad_compose_norm_first(device):
    # Tables that require grad make the op compose the rotation, so the norm is composed
    # too (it must come first); the result is the fused one.
    q = random_tensor((2, 7, 2, 32), torch.float32, device)
    w = random_tensor((32,), torch.float32, device, offset=1.0)
    cos, sin = _tables((7,), 16, device)
    fused = mmfast.ops.attention(q, q, q, rotary=(cos, sin), qk_norm=(w, w, EPS), backend="triton")
    composed = mmfast.ops.attention(q, q, q, rotary=(cos.requires_grad_(), sin), qk_norm=(w, w, EPS),
                                    backend="triton")
    assert cos.requires_grad and composed.requires_grad
    torch.testing.assert_close(composed.detach(), fused, rtol=1e-5, atol=1e-6)


# ---- bad arguments -------------------------------------------------------------------------


def _bad_cases(device):
    w = torch.ones(32, device=device)
    return [
        ((w, w), ValueError, "qk_norm: expected None or"),
        ("norm", TypeError, "qk_norm: expected None or"),
        ((w, w, 1e-6, 0), ValueError, "qk_norm: expected None or"),
        ((torch.ones(16, device=device), w, 1e-6), ValueError, "qk_norm: q_weight: expected shape"),
        ((w, torch.ones(2, 32, device=device), 1e-6), ValueError, "qk_norm: k_weight: expected shape"),
        ((w, torch.ones(32, dtype=torch.int32, device=device), 1e-6), TypeError,
         "qk_norm: k_weight: expected a floating"),
        ((w, [1.0] * 32, 1e-6), TypeError, "qk_norm: k_weight: expected a Tensor"),
        ((torch.ones(32, device="meta"), w, 1e-6), ValueError, "qk_norm: q_weight: expected device"),
        ((w, w, 0.0), ValueError, "qk_norm: eps"),
        ((w, w, -1e-6), ValueError, "qk_norm: eps"),
        ((w, w, float("inf")), ValueError, "qk_norm: eps"),
        ((w, w, True), ValueError, "qk_norm: eps"),
        ((w, w, None), ValueError, "qk_norm: eps"),
    ]


@pytest.mark.parametrize("index", range(13))
def test_bad_qk_norm(index, device):
    qk_norm, error, message = _bad_cases(device)[index]
    q = torch.randn(1, 4, 2, 32, device=device)
    with pytest.raises(error, match=message):
        mmfast.ops.attention(q, q, q, qk_norm=qk_norm)
