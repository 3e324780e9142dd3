"""Launcher of the CUDA C++ short-segment attention forward (csrc/attention_short.cu,
attention_short_ops.cpp): whole segments of at most 128 tokens per block, on tensor
cores, for float16 / bfloat16 and head dims that are multiples of 8 up to 128.

``attention_short_fwd`` takes the packed-layout arguments of the Triton launcher
mmfast.kernels.attention_short.attention_short_fwd (without rotary tables) and returns the
same (out, lse). There is no backward kernel: the attention op's ``cuda_short`` backend
refuses calls whose inputs require grad, so nothing ever needs one.

Inputs are read with 16-byte vector loads: a q, k or v whose rows are not 16-byte aligned
(a token or head stride that is not a multiple of 8 elements, a misaligned view) is
copied first. If the library cannot be loaded (no compiler, failed build: see
mmfast.cuda.build, which logs it once), the Triton launcher runs instead; from then on
dispatch no longer offers ``cuda_short``, since it reports the failure as its reason.
"""

from __future__ import annotations

import torch

from mmfast.cuda import build
from mmfast.kernels._launch import dense, empty

# Mirror kAttnShortMaxSeqlen / kAttnShortMaxHeadDim of csrc/attention_short.h.
MAX_SEQLEN = 128
MAX_HEAD_DIM = 128
HEAD_DIM_MULTIPLE = 8  # one 16-byte vector of 16-bit elements


def _vector_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its rows suit 16-byte vector access, else an aligned copy."""
    if t.numel() == 0:
        return t.new_empty(t.shape)  # nothing is read; a fresh tensor has plain strides
    if t.stride(-1) == 1 and t.stride(0) % 8 == 0 and t.stride(1) % 8 == 0 and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def attention_short_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                        window_left: int, window_right: int, scale: float):
    """Forward over packed segments of at most MAX_SEQLEN tokens. Returns (out, lse): out
    like q (contiguous), lse float32 [Hq, Tq]. max_seqlen_* should bound every segment
    (they size the blocks; nothing is read back to the host): a longer segment is left by
    the CUDA kernel to the Triton general kernel, launched next, whose programs skip every
    segment that fits. cu_seqlens values are clamped on the device."""
    q, k, v = _vector_rows(q), _vector_rows(k), _vector_rows(v)
    cu_seqlens_q, cu_seqlens_k = dense(cu_seqlens_q), dense(cu_seqlens_k)
    if not build.load(q.device):
        from mmfast.kernels.attention_short import attention_short_fwd as triton_attention_short_fwd

        return triton_attention_short_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          window_left, window_right, scale)
    out = empty(q.shape, dtype=q.dtype, device=q.device)
    lse = empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    torch.ops.mmfast_cuda.attention_short_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                              window_left, window_right, scale, out, lse)
    if q.shape[0] and q.shape[1] and cu_seqlens_q.numel() > 1:
        from mmfast.kernels.attention import attention_fwd

        attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, 1, 1, window_left, window_right, scale,
                      skip_up_to=(max_seqlen_q, max_seqlen_k), into=(out, lse))
    return out, lse


def register_fakes() -> None:
    """Fake of the C++ op for torch.compile: it writes into its arguments, returns nothing."""
    torch.library.register_fake("mmfast_cuda::attention_short_fwd")(lambda *args, **kwargs: None)
