"""Triton kernels for pointwise activations and gated (GLU-style) activations, forward
and backward, each one elementwise pass computed in float32.

Activations (``KIND``, a compile-time constant):

    gelu        y = x/2 * (1 + erf(x / sqrt(2)))
    gelu_tanh   y = x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
    quick_gelu  y = x * sigmoid(1.702 x)                  (CLIP)
    silu        y = x * sigmoid(x)

Plain:  X, Y, DY, DX are contiguous, viewed flat (n elements).
Gated:  out = act(gate) * up over [M, N] rows; GATE, UP, OUT and the gradients are
        row-major with their own row strides (so gate and up may be the two halves of
        one [M, 2N] tensor), unit stride along N.
        d gate = dout * up * act'(gate),  d up = dout * act(gate)
"""

import math

import triton
import triton.language as tl

from ._launch import dense, empty, unit_last

KINDS = ("gelu", "gelu_tanh", "quick_gelu", "silu")
_KIND_ID = {name: i for i, name in enumerate(KINDS)}

# tl.constexpr: the compiler (unlike the interpreter) refuses plain module-level floats
# inside @triton.jit code. They multiply from the right (tensor * constant): the
# interpreter cannot put a constexpr on the left of a tensor.
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_TANH_CUBIC = tl.constexpr(0.044715)
_QUICK = tl.constexpr(1.702)


@triton.jit
def _sigmoid_pair(z):
    """(sigmoid(z), 1 - sigmoid(z)), both to full relative precision: from one exp of a
    non-positive argument (no overflow), never subtracting from 1."""
    e = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + e)
    return tl.where(z >= 0, r, e * r), tl.where(z >= 0, e * r, r)


@triton.jit
def _act_and_grad(x, KIND: tl.constexpr, NEED_GRAD: tl.constexpr):
    """(act(x), act'(x)) in float32; the derivative only when NEED_GRAD (else 0)."""
    if KIND == 0:  # gelu (erf)
        cdf = 0.5 * (1.0 + tl.math.erf(x * _SQRT_HALF))
        y = x * cdf
        if NEED_GRAD:
            d = cdf + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)
        else:
            d = 0.0
    elif KIND == 1:  # gelu_tanh, as x * sigmoid(2u) since (1 + tanh u) / 2 = sigmoid(2u):
        # no 1 - tanh^2 cancellation in the tails, and one exp.
        s, s_c = _sigmoid_pair((x + x * x * x * _TANH_CUBIC) * (2.0 * _SQRT_2_OVER_PI))
        y = x * s
        if NEED_GRAD:
            d = s + x * s * s_c * (2.0 * _SQRT_2_OVER_PI) * (1.0 + x * x * (3.0 * _TANH_CUBIC))
        else:
            d = 0.0
    else:  # quick_gelu, silu: x * sigmoid(a x)
        if KIND == 2:
            a = _QUICK
        else:
            a = 1.0
        s, s_c = _sigmoid_pair(x * a)
        y = x * s
        if NEED_GRAD:
            d = s + x * a * s * s_c
        else:
            d = 0.0
    return y, d


@triton.jit
def _act_fwd_kernel(X, Y, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    y, _ = _act_and_grad(x, KIND, False)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _act_bwd_kernel(DY, X, DX, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
    _, d = _act_and_grad(x, KIND, True)
    tl.store(DX + offs, (dy * d).to(DX.dtype.element_ty), mask=ok)


@triton.jit
def _gated_fwd_kernel(
    GATE, UP, OUT, stride_gate, stride_up, stride_out, M, N,
    KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    ok = (rows < M) & (cols < N)
    g = tl.load(GATE + rows * stride_gate + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(UP + rows * stride_up + cols, mask=ok, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, KIND, False)
    tl.store(OUT + rows * stride_out + cols, (a * u).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _gated_bwd_kernel(
    DOUT, GATE, UP, DGATE, DUP,
    stride_dout, stride_gate, stride_up, stride_dgate, stride_dup, M, N,
    KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    ok = (rows < M) & (cols < N)
    dout = tl.load(DOUT + rows * stride_dout + cols, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(GATE + rows * stride_gate + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(UP + rows * stride_up + cols, mask=ok, other=0.0).to(tl.float32)
    a, d = _act_and_grad(g, KIND, True)
    tl.store(DGATE + rows * stride_dgate + cols, (dout * u * d).to(DGATE.dtype.element_ty), mask=ok)
    tl.store(DUP + rows * stride_dup + cols, (dout * a).to(DUP.dtype.element_ty), mask=ok)


_FLAT_BLOCK = 4096


def _flat_grid(n: int):
    return (triton.cdiv(n, _FLAT_BLOCK),)


def act_fwd(x, kind: str):
    """y = act(x) for ``x`` of any shape (read flat: made contiguous if it is not)."""
    x = dense(x)
    y = empty(x.shape, dtype=x.dtype, device=x.device)
    n = x.numel()
    if n:
        _act_fwd_kernel[_flat_grid(n)](x, y, n, KIND=_KIND_ID[kind], BLOCK=_FLAT_BLOCK, num_warps=8)
    return y


def act_bwd(dy, x, kind: str):
    """dx = dy * act'(x) for ``dy`` and ``x`` of the same shape (made contiguous if not)."""
    dy, x = dense(dy), dense(x)
    dx = empty(x.shape, dtype=x.dtype, device=x.device)
    n = x.numel()
    if n:
        _act_bwd_kernel[_flat_grid(n)](dy, x, dx, n, KIND=_KIND_ID[kind], BLOCK=_FLAT_BLOCK, num_warps=8)
    return dx


def _gated_grid(M: int, N: int, elements: int = 4096):
    block_n = min(triton.next_power_of_2(max(N, 1)), 1024)
    block_m = max(1, elements // block_n)
    return (triton.cdiv(M, block_m), triton.cdiv(N, block_n)), block_m, block_n


# The backward reads three tensors and writes two: at 4096 elements a program (16 a
# thread), gelu_tanh in fp16 on rows not 16-byte aligned spilled on sm_90a (ptxas kept 64
# registers); 2048 fit.
_GATED_BWD_ELEMENTS = 2048


def _rows(t):
    """[M, N] view of ``t`` (a copy only when its leading dims cannot merge)."""
    # The row count is spelled out: reshape(-1, 0) is ambiguous when N is 0.
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _launch_fwd(gate, up, out, kind):
    gate2, up2, out2 = _rows(gate), _rows(up), _rows(out)
    M, N = gate2.shape
    if M == 0 or N == 0:
        return
    grid, block_m, block_n = _gated_grid(M, N)
    _gated_fwd_kernel[grid](
        gate2, up2, out2, gate2.stride(0), up2.stride(0), out2.stride(0), M, N,
        KIND=_KIND_ID[kind], BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8,
    )


def _launch_bwd(dout, gate, up, dgate, dup, kind):
    dout2, gate2, up2, dgate2, dup2 = map(_rows, (dout, gate, up, dgate, dup))
    M, N = gate2.shape
    if M == 0 or N == 0:
        return
    grid, block_m, block_n = _gated_grid(M, N, _GATED_BWD_ELEMENTS)
    _gated_bwd_kernel[grid](
        dout2, gate2, up2, dgate2, dup2,
        dout2.stride(0), gate2.stride(0), up2.stride(0), dgate2.stride(0), dup2.stride(0), M, N,
        KIND=_KIND_ID[kind], BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8,
    )


def _halves(x, gate_first: bool):
    first, second = x.chunk(2, dim=-1)
    return (first, second) if gate_first else (second, first)


def gated_fwd(gate, up, kind: str):
    """out = act(gate) * up; ``gate``, ``up`` [..., N] (given unit stride along N if not)."""
    gate, up = unit_last(gate), unit_last(up)
    out = empty(gate.shape, dtype=gate.dtype, device=gate.device)
    _launch_fwd(gate, up, out, kind)
    return out


def gated_bwd(dout, gate, up, kind: str):
    """(d gate, d up) of out = act(gate) * up."""
    dout, gate, up = unit_last(dout), unit_last(gate), unit_last(up)
    dgate = empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = empty(up.shape, dtype=up.dtype, device=up.device)
    _launch_bwd(dout, gate, up, dgate, dup, kind)
    return dgate, dup


def gated_split_fwd(x, kind: str, gate_first: bool):
    """out [..., N] = act(gate) * up where gate and up are the halves of a contiguous
    ``x`` [..., 2N] (gate the first half when ``gate_first``); no copy of either half."""
    x = unit_last(x)
    gate, up = _halves(x, gate_first)
    return gated_fwd(gate, up, kind)


def gated_split_bwd(dout, x, kind: str, gate_first: bool):
    """d x [..., 2N] of :func:`gated_split_fwd`, both halves written by one pass."""
    dout, x = unit_last(dout), unit_last(x)
    dx = empty(x.shape, dtype=x.dtype, device=x.device)
    gate, up = _halves(x, gate_first)
    dgate, dup = _halves(dx, gate_first)
    _launch_bwd(dout, gate, up, dgate, dup, kind)
    return dx
