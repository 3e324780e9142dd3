"""The cu_seqlens / max_seqlen contract of the packed attention kernels (issue 16, items
2-4): general (attention.py), short-segment (attention_short.py) and cross-attention.

- a strided cu_seqlens is read through its strides (it was read as contiguous);
- max_seqlen smaller than the longest segment, or 0, still writes every row and every
  gradient (the kernels loop past the grid; the short kernel hands overflowing segments to
  the general one); on CPU tensors the op refuses it with a ValueError instead;
- out-of-range cu_seqlens values never make a kernel touch memory outside its tensors
  (they are clamped into [0, T] on the device: run in a subprocess, since a regression
  aborts the process), and on CPU tensors the op refuses them, naming the argument.

Launchers are called directly where the op layer would refuse the call on CPU, to test
what the kernels do on a GPU, where the values cannot be checked without a sync.
"""

import subprocess
import sys
import textwrap

import pytest
import torch

import mmfast

pytest.importorskip("triton")

from mmfast.kernels.attention import attention_bwd, attention_fwd  # noqa: E402
from mmfast.kernels.attention_short import attention_short_bwd, attention_short_fwd  # noqa: E402
from mmfast.kernels.cross_attention import cross_attention_bwd, cross_attention_fwd  # noqa: E402

D = 32
SCALE = D**-0.5


def _cu(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _qkv(tokens_q, tokens_k, device, heads=2, kv_heads=1):
    return (torch.randn(tokens_q, heads, D, device=device), torch.randn(tokens_k, kv_heads, D, device=device),
            torch.randn(tokens_k, kv_heads, D, device=device))


def _self_attention(fwd, bwd, q, k, v, cu_q, cu_k, max_q, max_k, window=(-1, -1)):
    """(out, lse, dq, dk, dv) of a self-attention launcher pair."""
    out, lse = fwd(q, k, v, cu_q, cu_k, max_q, max_k, *window, SCALE)
    do = torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape)
    return (out, lse, *bwd(do, q, k, v, out, lse, None, cu_q, cu_k, max_q, max_k, *window, SCALE))


def _cross_attention(q, k, v, cu_q, cu_k, max_q, max_k):
    """(out, lse, dq, dk, dv) of the cross-attention launchers (no mask, gate or residual)."""
    batch = cu_q.numel() - 1
    out, o, lse = cross_attention_fwd(q, k, v, cu_q, cu_k, batch, 0, 0, max_q, max_k, None, None, None, SCALE)
    do = torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape)
    dq, dk, dv, _ = cross_attention_bwd(do, q, k, v, o, lse, cu_q, cu_k, batch, 0, 0, max_q, max_k, None, None,
                                        SCALE)
    return out, lse, dq, dk, dv


KERNELS = {
    "general": lambda *a, **kw: _self_attention(attention_fwd, attention_bwd, *a, **kw),
    "short": lambda *a, **kw: _self_attention(attention_short_fwd, attention_short_bwd, *a, **kw),
    "cross": _cross_attention,
}


def _assert_all_close(got, want):
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert not g.isnan().any(), f"{name}: unwritten (NaN-poisoned) elements"
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


# ---- item 2: strided cu_seqlens ---------------------------------------------------------


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_strided_cu_seqlens_kernels(kernel, device):
    lengths = [3, 9, 1, 7]
    q, k, v = _qkv(20, 20, device)
    cu = _cu(lengths, device)
    strided = torch.stack([cu, cu.flip(0)], 1)[:, 0]  # the values of cu, stride 2
    assert strided.stride(0) == 2
    want = KERNELS[kernel](q, k, v, cu, cu, 9, 9)
    got = KERNELS[kernel](q, k, v, strided, strided, 9, 9)
    _assert_all_close(got, want)


@pytest.mark.parametrize("backend", ["triton", "triton_short"])
def test_strided_cu_seqlens_attention_op(backend, device):
    q, k, v = _qkv(12, 12, device)
    cu = _cu([3, 4, 5], device)
    strided = torch.stack([cu, cu], 1)[:, 0]
    want = mmfast.ops.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, backend="torch")
    got = mmfast.ops.attention(q, k, v, cu_seqlens_q=strided, cu_seqlens_k=strided, max_seqlen_q=5,
                               max_seqlen_k=5, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_strided_cu_seqlens_cross_attention_op(device):
    q, k, v = _qkv(9, 14, device)
    cu_q, cu_k = _cu([4, 5], device), _cu([6, 8], device)
    want = mmfast.ops.cross_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="torch")
    got = mmfast.ops.cross_attention(q, k, v, cu_seqlens_q=torch.stack([cu_q, cu_q], 1)[:, 0],
                                     cu_seqlens_k=torch.stack([cu_k, cu_k], 1)[:, 0], max_seqlen_q=5,
                                     max_seqlen_k=8, backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---- item 3: max_seqlen smaller than the longest segment ------------------------------------


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("max_seqlen", [8, 1, 0])
def test_short_max_seqlen_still_writes_every_row(kernel, max_seqlen, device):
    # One segment of 80 tokens (5 query blocks of the interpreter's 16) among short ones.
    lengths_q, lengths_k = [3, 80, 0, 5], [4, 80, 2, 5]
    q, k, v = _qkv(sum(lengths_q), sum(lengths_k), device)
    cu_q, cu_k = _cu(lengths_q, device), _cu(lengths_k, device)
    want = KERNELS[kernel](q, k, v, cu_q, cu_k, 80, 80)
    got = KERNELS[kernel](q, k, v, cu_q, cu_k, max_seqlen, max_seqlen)
    _assert_all_close(got, want)


@pytest.mark.parametrize("kernel", ["general", "short"])
def test_short_max_seqlen_with_a_causal_window(kernel, device):
    q, k, v = _qkv(70, 70, device)
    cu = _cu([33, 37], device)
    want = KERNELS[kernel](q, k, v, cu, cu, 37, 37, window=(5, 0))
    got = KERNELS[kernel](q, k, v, cu, cu, 4, 4, window=(5, 0))
    _assert_all_close(got, want)


@pytest.mark.parametrize("kernel,seg_stride", [("general", None), ("short", 0), ("short", 7)])
def test_short_max_seqlen_with_rotary(kernel, seg_stride, device):
    # The overflow pass reads rotated copies of k (and q in the backward), written for the
    # segments it runs, with the short kernel's per-segment table offsets (seg_stride rows).
    q, k, v = _qkv(48, 48, device)
    cu = _cu([4, 40, 4], device)
    cos = torch.rand(64, D // 2, device=device)
    sin = torch.rand(64, D // 2, device=device)
    tables = dict(cos=cos, sin=sin)
    fwd, bwd = attention_fwd, attention_bwd
    if kernel == "short":
        tables["table_seg_stride"] = seg_stride * cos.stride(0)
        fwd, bwd = attention_short_fwd, attention_short_bwd

    def run(max_seqlen):
        out, lse = fwd(q, k, v, cu, cu, max_seqlen, max_seqlen, -1, -1, SCALE, **tables)
        do = torch.linspace(-1, 1, out.numel(), device=device).view(out.shape)
        return (out, lse, *bwd(do, q, k, v, out, lse, None, cu, cu, max_seqlen, max_seqlen, -1, -1, SCALE,
                               **tables))

    _assert_all_close(run(3), run(40))


def test_short_kernel_overflow_matches_the_reference(device):
    # The segments past their slots go to the general kernel: check against the reference.
    lengths = [2, 40, 3]
    q, k, v = _qkv(45, 45, device)
    cu = _cu(lengths, device)
    want = mmfast.ops.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, backend="torch")
    got, _ = attention_short_fwd(q, k, v, cu, cu, 3, 3, -1, -1, SCALE)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", ["attention", "cross_attention"])
@pytest.mark.parametrize("side", ["q", "k"])
def test_short_max_seqlen_on_cpu_is_a_value_error(op, side):
    q, k, v = _qkv(12, 12, torch.device("cpu"))
    cu = _cu([3, 9], torch.device("cpu"))
    lengths = {"max_seqlen_q": 9, "max_seqlen_k": 9, f"max_seqlen_{side}": 8}
    match = f"max_seqlen_{side}: 8 is less than the longest segment 9 of cu_seqlens_{side}"
    with pytest.raises(ValueError, match=match):
        getattr(mmfast.ops, op)(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, **lengths, backend="triton")


# ---- item 4: out-of-range cu_seqlens ------------------------------------------------------

# Bad cu_seqlens for 12 tokens, and the valid ones they act as once clamped into [0, 12]
# (a segment that ends before it starts is empty), or None where the clamped segments
# overlap (rows then written twice: unspecified values, but inside the tensors).
BAD_CU = {
    "past_the_end": ([0, 3, 7, 20], [0, 3, 7, 12]),
    "negative": ([0, -3, 7, 12], [0, 0, 7, 12]),
    "decreasing": ([0, 7, 3, 12], None),
    "huge": ([0, 2**30, -(2**30), 2**31 - 1], [0, 12, 12, 12]),
}


@pytest.mark.parametrize("case", list(BAD_CU))
def test_out_of_range_cu_seqlens_stay_inside_the_tensors(case, device):
    bad, clamped = BAD_CU[case]
    code = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        from test_cu_seqlens_contract import KERNELS, _assert_all_close, _qkv
        torch.manual_seed(0)
        device = torch.device({str(device)!r})
        q, k, v = _qkv(12, 12, device)
        bad = torch.tensor({bad}, dtype=torch.int32, device=device)
        clamped = {clamped!r}
        for name, kernel in KERNELS.items():
            for max_seqlen in (12, 4):
                got = kernel(q, k, v, bad, bad, max_seqlen, max_seqlen)
                if clamped is not None:
                    cu = torch.tensor(clamped, dtype=torch.int32, device=device)
                    _assert_all_close(got, kernel(q, k, v, cu, cu, 12, 12))
        if device.type == "cpu":  # the ops check CPU values before any kernel runs
            import mmfast
            for op in (mmfast.ops.attention, mmfast.ops.cross_attention):
                try:
                    op(q, k, v, cu_seqlens_q=bad, cu_seqlens_k=bad, max_seqlen_q=12, max_seqlen_k=12,
                       backend="triton")
                except ValueError as error:
                    assert "cu_seqlens_q" in str(error), error
                else:
                    raise AssertionError("no ValueError")
        if device.type == "cuda":
            torch.cuda.synchronize()
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


@pytest.mark.parametrize("op", ["attention", "cross_attention"])
@pytest.mark.parametrize("side", ["q", "k"])
@pytest.mark.parametrize("values,match", [
    ([0, 3, 7, 20], "expected the last entry to equal the token count 12, got 20"),
    ([0, -3, 7, 12], "expected non-decreasing entries"),
    ([0, 7, 3, 12], "expected non-decreasing entries"),
    ([2, 3, 7, 12], "expected the first entry to be 0"),
])
def test_out_of_range_cu_seqlens_on_cpu_are_value_errors(op, side, values, match):
    # max_seqlen given: on a device nothing is read back, but a CPU tensor costs no sync.
    # (The checks run before dispatch; the Triton backend is also tried in the subprocess
    # test above, since before them its kernels corrupted memory.)
    q, k, v = _qkv(12, 12, torch.device("cpu"))
    good = torch.tensor([0, 3, 7, 12], dtype=torch.int32)
    cu = {"cu_seqlens_q": good, "cu_seqlens_k": good.clone()}
    cu[f"cu_seqlens_{side}"] = torch.tensor(values, dtype=torch.int32)
    with pytest.raises(ValueError, match=f"cu_seqlens_{side}: {match}"):
        getattr(mmfast.ops, op)(q, k, v, **cu, max_seqlen_q=20, max_seqlen_k=20, backend="torch")
