"""The sdpa backends' segment path on a CPU (mmfast.ops._sdpa_segments): one SDPA call per
run of equal segments instead of one call under a dense block-diagonal mask. Against the
torch reference for every layout it takes, and the cases it hands back to the general
(masked, NaN-containing) path."""

import sys

import pytest
import torch

import mmfast
from mmfast.ops._sdpa_segments import Run, attend_on_host, runs_of

import mmfast.ops.attention  # noqa: F401  (the module, not the function of the same name)

ATTENTION = sys.modules["mmfast.ops.attention"]


def _cu(lengths):
    return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)


def test_runs_group_equal_consecutive_segments():
    # Equal windows are one run, a shorter one starts another; segments without queries
    # produce nothing and do not break a run whose keys keep a constant stride.
    assert runs_of([0, 4, 8, 12, 14], [0, 4, 8, 12, 14]) == [Run(0, 0, 3, 4, 4, 4), Run(12, 12, 1, 2, 2, 2)]
    # The static decode step over a KV cache: [0, 1, 1, 2, 2] queries, each sequence's valid
    # keys at the start of its row of a 10-slot buffer.
    assert runs_of([0, 1, 1, 2, 2], [0, 3, 10, 13, 20]) == [Run(0, 0, 2, 1, 3, 10)]
    assert runs_of([0, 1, 1, 2, 2], [0, 3, 10, 14, 20]) == [Run(0, 0, 1, 1, 3, 3), Run(1, 10, 1, 1, 4, 4)]
    assert runs_of([0, 0, 0], [0, 5, 9]) == []


def _qkv(tokens_q, tokens_k, heads, kv_heads, dim=16, batch=None, grad=False):
    lead_q = (tokens_q,) if batch is None else (batch, tokens_q)
    lead_k = (tokens_k,) if batch is None else (batch, tokens_k)
    q = torch.randn(*lead_q, heads, dim, requires_grad=grad)
    k = torch.randn(*lead_k, kv_heads, dim, requires_grad=grad)
    v = torch.randn(*lead_k, kv_heads, dim, requires_grad=grad)
    return q, k, v


def _no_general_path(monkeypatch):
    """The general path (dense mask, containment) must not run."""
    def refuse(*args, **kwargs):
        raise AssertionError("the general masked path ran")
    monkeypatch.setattr(ATTENTION, "sdpa_contained", refuse)


PACKED = [
    # (query lengths, key lengths, causal, window)
    ([5, 5, 5], [5, 5, 5], True, (-1, -1)),
    ([3, 7, 1, 4], [3, 7, 1, 4], True, (-1, -1)),
    ([3, 0, 4], [3, 0, 4], False, (-1, -1)),
    ([2, 1, 3], [6, 4, 3], True, (-1, -1)),       # bottom-right: fewer queries than keys
    ([4, 6], [4, 9], False, (2, 1)),              # sliding window
    ([1, 1, 1], [8, 3, 5], False, (3, -1)),       # decode-like, left window only
    ([2, 3], [0, 4], False, (-1, -1)),            # a sample without keys gets 0
]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("lengths_q,lengths_k,causal,window", PACKED)
def test_packed_matches_the_reference(lengths_q, lengths_k, causal, window, heads, kv_heads, monkeypatch):
    q, k, v = _qkv(sum(lengths_q), sum(lengths_k), heads, kv_heads)
    kw = dict(cu_seqlens_q=_cu(lengths_q), cu_seqlens_k=_cu(lengths_k), causal=causal, window=window)
    want = mmfast.ops.attention(q, k, v, **kw, backend="torch")
    _no_general_path(monkeypatch)
    got = mmfast.ops.attention(q, k, v, **kw, backend="sdpa")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens_q,tokens_k,causal,window", [
    (7, 7, True, (-1, -1)), (3, 9, True, (-1, -1)), (1, 9, True, (-1, -1)), (5, 8, False, (2, 0)),
    (6, 6, False, (-1, -1)),
])
def test_padded_matches_the_reference(tokens_q, tokens_k, causal, window, monkeypatch):
    q, k, v = _qkv(tokens_q, tokens_k, 4, 2, batch=3)
    want = mmfast.ops.attention(q, k, v, causal=causal, window=window, backend="torch")
    _no_general_path(monkeypatch)
    got = mmfast.ops.attention(q, k, v, causal=causal, window=window, backend="sdpa")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradients_match_the_reference():
    lengths = [3, 3, 5]
    q, k, v = _qkv(11, 11, 4, 2, grad=True)
    kw = dict(cu_seqlens_q=_cu(lengths), cu_seqlens_k=_cu(lengths), causal=True)
    upstream = torch.randn(11, 4, 16)
    grads = []
    for backend in ("torch", "sdpa"):
        (mmfast.ops.attention(q, k, v, **kw, backend=backend) * upstream).sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_hands_back_what_it_cannot_do_exactly():
    cu = _cu([4, 4])
    q, k, v = _qkv(8, 8, 2, 2)
    assert attend_on_host(q, k, v, cu, cu, (-1, 0), 0.25) is not None
    # More queries than keys under a causal mask: the first queries see no key.
    assert attend_on_host(q, k[:6], v[:6], cu, _cu([2, 4]), (-1, 0), 0.25) is None
    # A non-finite key under a mask inside a segment.
    k_bad = k.clone()
    k_bad[5, 0, 0] = float("nan")
    assert attend_on_host(q, k_bad, v, cu, cu, (-1, 0), 0.25) is None
    # Without a mask inside the segments a NaN stays in its segment anyway, unless
    # gradients flow (SDPA's backward would spread it through a zero gradient).
    assert attend_on_host(q, k_bad, v, cu, cu, (-1, -1), 0.25) is not None
    assert attend_on_host(q.requires_grad_(), k_bad, v, cu, cu, (-1, -1), 0.25) is None


def test_many_short_segments_take_one_masked_call(monkeypatch):
    calls = []
    monkeypatch.setattr(ATTENTION, "sdpa_contained", lambda *a, **kw: calls.append(1) or a[0] * 0)
    lengths = [1 + i % 3 for i in range(40)]  # 40 runs: one masked call is cheaper
    q, k, v = _qkv(sum(lengths), sum(lengths), 2, 2)
    mmfast.ops.attention(q, k, v, cu_seqlens_q=_cu(lengths), cu_seqlens_k=_cu(lengths), backend="sdpa")
    assert calls == [1]


@pytest.mark.parametrize("gate", [False, True])
def test_cross_attention_packed_matches_the_reference(gate, monkeypatch):
    lengths_q, lengths_k = [3, 4, 2], [5, 0, 6]  # the second sample has no image tokens
    q = torch.randn(sum(lengths_q), 4, 16)
    k, v = torch.randn(sum(lengths_k), 2, 16), torch.randn(sum(lengths_k), 2, 16)
    kw = dict(cu_seqlens_q=_cu(lengths_q), cu_seqlens_k=_cu(lengths_k), residual=torch.randn_like(q),
              gate=torch.tensor([0.7]) if gate else None)
    want = mmfast.ops.cross_attention(q, k, v, **kw, backend="torch")
    cross = sys.modules["mmfast.ops.cross_attention"]
    monkeypatch.setattr(cross, "sdpa_contained", lambda *a, **kw: pytest.fail("the general masked path ran"))
    got = mmfast.ops.cross_attention(q, k, v, **kw, backend="sdpa")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[3:7], kw["residual"][3:7])  # no keys: attention 0, out = residual
