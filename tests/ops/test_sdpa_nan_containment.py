"""A NaN or Inf in one sequence's keys or values stays in that sequence on the sdpa
backends of attention and cross_attention (issue 16, item 5: one NaN key of a packed
batch made all 12 output tokens NaN) and on the torch references (a NaN value reached
every query through 0 * NaN)."""

import pytest
import torch

import mmfast

BAD = [float("nan"), float("inf"), float("-inf")]
BACKENDS = ["sdpa", "torch"]


def _finite_rows(t):
    return t.isfinite().all(-1)


def _expect_contained(got, want, sees_bad):
    """Rows (token, head) outside ``sees_bad`` (those that see the bad token) are finite
    and equal the reference computed without the bad token; inside, every row is
    non-finite that the reference makes non-finite (SDPA may make more: it gives NaN to
    every query that sees a non-finite key, where the reference ignores a key whose
    score is -inf), and the finite ones equal it."""
    assert _finite_rows(got[~sees_bad]).all(), f"leaked to rows {(~_finite_rows(got) & ~sees_bad).nonzero().tolist()}"
    assert not (~_finite_rows(want) & _finite_rows(got)).any(), "rows the reference makes non-finite"
    kept = _finite_rows(got)
    torch.testing.assert_close(got[kept], want[kept], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("value", BAD)
def test_packed_attention_keeps_a_bad_token_in_its_segment(backend, where, value, device):
    q, k, v = (torch.randn(12, 2, 32, device=device) for _ in range(3))
    cu = torch.tensor([0, 3, 7, 12], dtype=torch.int32, device=device)
    clean = mmfast.ops.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, backend="torch")
    {"k": k, "v": v}[where][4, 0, 3] = value  # token 4 (segment 3..6), K/V head 0
    got = mmfast.ops.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, backend=backend)
    want = mmfast.ops.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, backend="torch")
    sees_bad = torch.zeros(12, 2, dtype=torch.bool, device=device)
    sees_bad[3:7, 0] = True
    torch.testing.assert_close(want[~sees_bad], clean[~sees_bad])  # the reference keeps it in
    assert not _finite_rows(got[3:7, 0]).all(), "the bad token's segment must see it"
    _expect_contained(got, want, sees_bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_attention_window_hides_a_bad_key(backend, device):
    # A sliding window of 2 keys: only queries 9 (and none before) see key 9.
    q, k, v = (torch.randn(1, 10, 2, 32, device=device) for _ in range(3))
    k[0, 9, 1, 0] = float("nan")
    v[0, 9, 1, 1] = float("nan")
    want = mmfast.ops.attention(q, k, v, window=(2, 0), backend="torch")
    got = mmfast.ops.attention(q, k, v, window=(2, 0), backend=backend)
    sees_bad = torch.zeros(1, 10, 2, dtype=torch.bool, device=device)
    sees_bad[0, 9, 1] = True
    _expect_contained(got, want, sees_bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_attention_gradients_stay_finite_elsewhere(backend, device):
    q, k, v = (torch.randn(12, 2, 32, device=device, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        v[4, 1, 0] = float("nan")
    cu = torch.tensor([0, 3, 7, 12], dtype=torch.int32, device=device)
    out = mmfast.ops.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, backend=backend)
    out[:3].sum().backward()  # the first segment's outputs only
    for t in (q, k, v):
        assert t.grad.isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("value", BAD)
def test_packed_cross_attention_keeps_a_bad_key_in_its_sample(backend, where, value, device):
    q = torch.randn(9, 2, 32, device=device)
    k, v = torch.randn(14, 1, 32, device=device), torch.randn(14, 1, 32, device=device)
    cu_q = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 6, 14], dtype=torch.int32, device=device)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, residual=torch.randn(9, 2, 32, device=device))
    clean = mmfast.ops.cross_attention(q, k, v, **kw, backend="torch")
    {"k": k, "v": v}[where][8, 0, 5] = value  # a key of sample 1 (keys 6..13, queries 4..8)
    got = mmfast.ops.cross_attention(q, k, v, **kw, backend=backend)
    want = mmfast.ops.cross_attention(q, k, v, **kw, backend="torch")
    sees_bad = torch.zeros(9, 2, dtype=torch.bool, device=device)
    sees_bad[4:] = True  # both query heads share K/V head 0
    torch.testing.assert_close(want[~sees_bad], clean[~sees_bad])
    assert not _finite_rows(got[4:]).all()
    _expect_contained(got, want, sees_bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_cross_attention_keeps_a_bad_value_in_its_sample(backend, device):
    q = torch.randn(3, 5, 2, 32, device=device)
    k, v = torch.randn(3, 7, 2, 32, device=device), torch.randn(3, 7, 2, 32, device=device)
    v[1, 2, 0, 0] = float("nan")
    want = mmfast.ops.cross_attention(q, k, v, backend="torch")
    got = mmfast.ops.cross_attention(q, k, v, backend=backend)
    sees_bad = torch.zeros(3, 5, 2, dtype=torch.bool, device=device)
    sees_bad[1, :, 0] = True
    _expect_contained(got, want, sees_bad)
