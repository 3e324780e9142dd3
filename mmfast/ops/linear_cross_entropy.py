"""Cross-entropy of a linear layer's output (an LM head) without the [N, V] logits.

For hidden [N, C], weight [V, C], optional bias [V] and target [N] (class indices):

    z = hidden @ weight.T + bias                                     [N, V], never stored whole
    loss_i = CE(z_i, target_i; label_smoothing) + z_loss * lse(z_i)^2    (PaLM's z-loss)
    reduction "mean": sum_i loss_i / (rows whose target is not ignore_index)
              "sum":  sum_i loss_i;   "none": loss [N]

CE is torch.nn.functional.cross_entropy's, label smoothing included. Rows whose target
is ``ignore_index`` add 0 to the loss and get 0 gradient. One difference from
F.cross_entropy: when every row is ignored, "mean" gives 0 (and zero gradients), where
F.cross_entropy gives NaN (0 / 0); a batch with nothing to learn should not poison the
weights.

How (Liger-Kernel's fused linear cross-entropy): the rows go through in chunks small
enough that one chunk's logits fit a memory budget (CHUNK_BYTES). Per chunk, a matmul
gives the logits (in the inputs' dtype, float32 accumulation: what eager's F.linear
rounds to), one softmax pass computes each row's loss and overwrites the logits with
d loss / d logits, and two more matmuls turn that into the chunk's rows of
d hidden = G @ weight and add G.T @ hidden_chunk to d weight (and G's column sums to
d bias). So for "mean" and "sum" the whole backward is done during the forward, and
``backward`` only multiplies the saved gradients by the upstream scalar. For "none"
the upstream gradient differs per row and d weight mixes rows, so nothing can be
precomputed: the forward computes only the losses and the backward recomputes the
chunks with the upstream gradient as each row's scale (one more matmul of work).

Precision: softmax statistics in float32 (float64 for float64 inputs); each row of
d hidden is one matmul, rounded once, as eager's. d weight is accumulated in the
weight's dtype across chunks (one rounding per chunk, where eager's single matmul rounds
once); the budget keeps chunks large, so there are few. d bias accumulates in float32.
The upstream gradient multiplies the saved gradients with one more rounding (none when it
is 1, as for ``loss.backward()``). The loss is float32 (float64 for float64 inputs), as
F.cross_entropy on upcast logits returns it. Deterministic: chunks run in order, no
atomics.

Memory: one chunk's logits, plus the gradients of hidden, weight and bias, held from
the forward to the backward for "mean" / "sum" (what any fused implementation holds).
The backward scales them in place, so a second backward through the same graph
(``retain_graph=True``) is refused by autograd with its "modified by an inplace
operation" error rather than answered wrongly.

Targets are not range-checked (that would need a host sync): a row whose target is
neither ``ignore_index`` nor in [0, V) gets a NaN loss and NaN gradients, which makes
the reduced loss NaN.

Backends: ``triton`` (the softmax pass is a Triton kernel, mmfast.kernels.
linear_cross_entropy; fp16, bf16, fp32; CUDA, or CPU under TRITON_INTERPRET=1), ``torch``
(the same chunks with the softmax pass in PyTorch; any device and floating dtype, O(chunk)
memory too). The matmuls are torch's (cuBLAS) in both.
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast.dispatch import Backend, Call, op_family

REDUCTIONS = ("mean", "sum", "none")

# Bytes one chunk's logits (and the PyTorch pass's temporaries) may take: few chunks on a GPU
# (each adds a rounding to d weight in half precision), a small budget on a CPU so that
# chunking is exercised at test sizes.
CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 1 << 20}
# On a GPU, chunks are a multiple of this many rows (matmul tiles).
_ROW_MULTIPLE = 128


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---- reference (dense; the test oracle) -------------------------------------------------


def linear_cross_entropy_reference(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean",
                                   label_smoothing=0.0, z_loss=0.0):
    """Plain PyTorch, as a user writes it: F.linear in the inputs' dtype, then
    F.cross_entropy on the float32 upcast (Hugging Face's recipe), plus the z-loss."""
    logits = F.linear(hidden, weight, bias).to(_compute_dtype(hidden))
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    valid = target != ignore_index
    if z_loss:
        loss = loss + z_loss * torch.where(valid, torch.logsumexp(logits, dim=-1), 0.0) ** 2
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


# ---- the softmax pass, in PyTorch (the torch backend) ------------------------------------


def softmax_pass_torch(logits: Tensor, target: Tensor, row_scale: Tensor, ignore_index: int,
                       label_smoothing: float, z_loss: float, write_grad: bool) -> Tensor:
    """What the Triton kernel does (mmfast.kernels.linear_cross_entropy), in PyTorch:
    per-row losses, and with ``write_grad`` the scaled gradient written over ``logits``."""
    v = logits.shape[1]
    z = logits.to(_compute_dtype(logits))
    lse = torch.logsumexp(z, dim=-1)
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < v)
    index = torch.where(in_range, target, 0).unsqueeze(1)
    loss = (1.0 - label_smoothing) * (lse - z.gather(1, index).squeeze(1)) + z_loss * lse * lse
    if label_smoothing:
        loss = loss + label_smoothing * (lse - z.mean(dim=-1))
    loss = torch.where(ignored, 0.0, torch.where(in_range, loss, float("nan")))
    if write_grad:
        scale = torch.where(ignored, 0.0, torch.where(in_range, row_scale.to(z.dtype), float("nan")))
        g = torch.exp(z - lse.unsqueeze(1)) * (1.0 + 2.0 * z_loss * lse).unsqueeze(1) - label_smoothing / v
        g.scatter_add_(1, index, torch.full_like(index, label_smoothing - 1.0, dtype=g.dtype))
        logits.copy_(g * scale.unsqueeze(1))
    return loss


def _softmax_pass_triton(*args) -> Tensor:
    from mmfast.kernels.linear_cross_entropy import linear_cross_entropy_fwd

    return linear_cross_entropy_fwd(*args)


_SOFTMAX_PASS = {"triton": _softmax_pass_triton, "torch": softmax_pass_torch}


# ---- the chunk loop -----------------------------------------------------------------------


def chunk_rows(n: int, v: int, bytes_per_logit: int, device: torch.device) -> int:
    """Rows per chunk: as many as CHUNK_BYTES allow at ``bytes_per_logit`` (at least one)."""
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"])
    rows = max(1, budget // max(1, v * bytes_per_logit))
    if device.type == "cuda" and rows >= _ROW_MULTIPLE:
        rows -= rows % _ROW_MULTIPLE
    return min(rows, max(n, 1))


def chunked_linear_cross_entropy(hidden, weight, target, bias, row_scale, ignore_index, label_smoothing, z_loss,
                                 grad_hidden: bool, grad_weight: bool, grad_bias: bool, kernel: str):
    """Per-row losses and, where asked, the gradients of hidden, weight and bias for
    per-row scales ``row_scale`` [N] (a stride-0 view for one scale). Unrequested
    gradients are empty tensors. See the module docstring."""
    n, v = hidden.shape[0], weight.shape[0]
    cd = _compute_dtype(hidden)
    softmax_pass = _SOFTMAX_PASS[kernel]
    target = target.contiguous()  # the kernel reads target[i] at offset i
    write_grad = grad_hidden or grad_weight or grad_bias
    loss = torch.empty((n,), dtype=cd, device=hidden.device)
    d_hidden = torch.empty_like(hidden) if grad_hidden else hidden.new_empty((0,))
    d_weight = torch.zeros_like(weight) if grad_weight else weight.new_empty((0,))
    d_bias = torch.zeros((v,) if grad_bias else (0,), dtype=cd, device=hidden.device)
    weight_t = weight.t()
    # The Triton pass works in place; the PyTorch one holds about three temporaries per logit.
    per_logit = hidden.element_size() + (0 if kernel == "triton" else 3 * torch.finfo(cd).bits // 8)
    step = chunk_rows(n, v, per_logit, hidden.device)
    # One buffer for every chunk's logits: never two chunks alive at once.
    buffer = hidden.new_empty((min(step, n), v))
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        h = hidden[rows]
        logits = buffer[:h.shape[0]]
        if bias is not None:
            torch.addmm(bias, h, weight_t, out=logits)
        else:
            torch.mm(h, weight_t, out=logits)
        loss[rows] = softmax_pass(logits, target[rows], row_scale[rows], ignore_index, label_smoothing, z_loss,
                                  write_grad)
        # From here on ``logits`` holds d loss / d logits of the chunk.
        if grad_hidden:
            torch.mm(logits, weight, out=d_hidden[rows])
        if grad_weight:
            d_weight.addmm_(logits.t(), h)
        if grad_bias:
            d_bias += logits.sum(dim=0, dtype=cd)
    return loss, d_hidden, d_weight, d_bias


# ---- custom op (opaque to torch.compile, traced through its fake) ------------------------


@torch.library.custom_op("mmfast::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], row_scale: Tensor,
    ignore_index: int, label_smoothing: float, z_loss: float,
    grad_hidden: bool, grad_weight: bool, grad_bias: bool, kernel: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return chunked_linear_cross_entropy(hidden, weight, target, bias, row_scale, ignore_index, label_smoothing,
                                        z_loss, grad_hidden, grad_weight, grad_bias, kernel)


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, target, bias, row_scale, ignore_index, label_smoothing, z_loss,
      grad_hidden, grad_weight, grad_bias, kernel):
    cd = _compute_dtype(hidden)
    return (hidden.new_empty((hidden.shape[0],), dtype=cd),
            hidden.new_empty(hidden.shape if grad_hidden else (0,)),
            weight.new_empty(weight.shape if grad_weight else (0,)),
            hidden.new_empty((weight.shape[0],) if grad_bias else (0,), dtype=cd))


# ---- autograd -----------------------------------------------------------------------------


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Loss of the chunked pass; gradients precomputed in the forward ("mean", "sum") or
    recomputed in the backward ("none"). ``kernel`` names the softmax pass."""

    @staticmethod
    def forward(ctx, hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, reduction, kernel):
        wants = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3])
        ctx.reduction, ctx.kernel, ctx.wants = reduction, kernel, wants
        ctx.args = (ignore_index, label_smoothing, z_loss)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        n = hidden.shape[0]
        cd = _compute_dtype(hidden)
        if reduction == "mean":
            scale = 1.0 / (target != ignore_index).sum().clamp(min=1).to(cd)
        else:
            scale = torch.ones((), dtype=cd, device=hidden.device)
        per_row = reduction == "none"
        grads = (False, False, False) if per_row else wants
        loss, d_hidden, d_weight, d_bias = torch.ops.mmfast.linear_cross_entropy(
            hidden, weight, target, bias, scale.expand(n), ignore_index, label_smoothing, z_loss, *grads, kernel)
        if per_row:
            ctx.save_for_backward(hidden, weight, target, bias)
            return loss
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        return loss.sum() * scale

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            hidden, weight, target, bias = ctx.saved_tensors
            _, d_hidden, d_weight, d_bias = torch.ops.mmfast.linear_cross_entropy(
                hidden, weight, target, bias, grad_out.to(_compute_dtype(hidden)), *ctx.args, *ctx.wants, ctx.kernel)
        else:
            # Scaled in place: no second copy of d weight. A second backward through the same
            # graph (retain_graph=True) is refused by autograd (the saved tensors have changed).
            d_hidden, d_weight, d_bias = (g.mul_(grad_out) if want else None
                                          for g, want in zip(ctx.saved_tensors, ctx.wants))
        want_h, want_w, want_b = ctx.wants
        return (d_hidden if want_h else None, d_weight if want_w else None, None,
                d_bias.to(ctx.bias_dtype) if want_b else None, None, None, None, None, None)


# ---- backends -----------------------------------------------------------------------------


def _runner(kernel: str):
    def run(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, reduction):
        return LinearCrossEntropyFunction.apply(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss,
                                                reduction, kernel)
    return run


LINEAR_CROSS_ENTROPY = op_family("linear_cross_entropy")
LINEAR_CROSS_ENTROPY.register(Backend("triton", _runner("triton"), triton=True,
                                      dtypes=(torch.float16, torch.bfloat16, torch.float32)))
LINEAR_CROSS_ENTROPY.register(Backend("torch", _runner("torch")))


# ---- public function ------------------------------------------------------------------------


def _check_tensor(name: str, t, dim: int, shape_text: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor {shape_text}, got shape {tuple(t.shape)}")


def _check_like(name: str, t: Tensor, hidden: Tensor) -> None:
    if t.dtype != hidden.dtype:
        raise TypeError(f"{name}: expected dtype {hidden.dtype} (that of hidden), got {t.dtype}")
    if t.device != hidden.device:
        raise ValueError(f"{name}: expected device {hidden.device} (that of hidden), got {t.device}")


# Widened to int64 on entry (a copy of N indices): what cross_entropy's gather takes.
_TARGET_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_args(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss) -> None:
    _check_tensor("hidden", hidden, 2, "[N, C]")
    if not hidden.dtype.is_floating_point:
        raise TypeError(f"hidden: expected a floating dtype, got {hidden.dtype}")
    _check_tensor("weight", weight, 2, "[V, C]")
    _check_like("weight", weight, hidden)
    if weight.shape[1] != hidden.shape[1] or weight.shape[0] == 0:
        raise ValueError(f"weight: expected shape [V >= 1, {hidden.shape[1]}] (C of hidden), got {tuple(weight.shape)}")
    _check_tensor("target", target, 1, "[N]")
    if target.dtype not in _TARGET_DTYPES:
        raise TypeError(f"target: expected an integer dtype of class indices (int64, int32, int16, int8 "
                        f"or uint8), got {target.dtype}")
    if target.shape[0] != hidden.shape[0]:
        raise ValueError(f"target: expected shape ({hidden.shape[0]},) (N of hidden), got {tuple(target.shape)}")
    if target.device != hidden.device:
        raise ValueError(f"target: expected device {hidden.device} (that of hidden), got {target.device}")
    if bias is not None:
        _check_tensor("bias", bias, 1, "[V]")
        _check_like("bias", bias, hidden)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},) (V of weight), got {tuple(bias.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, Integral):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if not -2 ** 63 <= ignore_index < 2 ** 63:
        raise ValueError(f"ignore_index: expected an int64 value, got {ignore_index}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, Real) or not 0 <= label_smoothing <= 1:
        raise ValueError(f"label_smoothing: expected a number in [0, 1], got {label_smoothing!r}")
    if isinstance(z_loss, bool) or not isinstance(z_loss, Real) or not 0 <= z_loss < float("inf"):
        raise ValueError(f"z_loss: expected a finite number >= 0, got {z_loss!r}")


def linear_cross_entropy(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, backend=None):
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``target``, in chunks, the
    [N, V] logits never held at once; with ``z_loss`` > 0, PaLM's z-loss
    ``z_loss * logsumexp(logits)^2`` is added per row. Equals
    ``F.cross_entropy(F.linear(hidden, weight, bias).float(), target, ...)`` except that an
    all-ignored batch gives 0 for "mean" (see the module docstring for that and for
    targets out of range, which give NaN instead of an error).

    Example::

        >>> hidden = torch.randn(10, 64, requires_grad=True)   # 10 tokens
        >>> weight = torch.randn(1000, 64, requires_grad=True)  # vocabulary of 1000
        >>> target = torch.randint(0, 1000, (10,))
        >>> loss = mmfast.ops.linear_cross_entropy(hidden, weight, target)
        >>> loss.backward()
    """
    _check_args(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss)
    call = Call(device=hidden.device, dtype=hidden.dtype)
    run = LINEAR_CROSS_ENTROPY.select(call, backend).run
    target = target if target.dtype == torch.int64 else target.long()
    return run(hidden, weight, target, bias, int(ignore_index), float(label_smoothing), float(z_loss), reduction)
