// Softmax attention over many short packed segments (at most 128 tokens each, such as the
// 64-token windows of the Qwen2.5-VL vision encoder), forward only, on tensor cores: the
// host-side launch API of attention_short.cu (raw pointers and plain types; no CUDA or
// torch header). The contract is that of the Triton kernel kernels/attention_short.py:
//
//   q [Tq, Hq, D], k, v [Tk, Hk, D] through token and head strides (unit stride along D);
//   Hk divides Hq, query head h reads K/V head h / (Hq / Hk). Segment b is query tokens
//   cu_seqlens_q[b] .. cu_seqlens_q[b+1] and key tokens cu_seqlens_k[b] .. [b+1].
//   Query i of a segment with lq queries and lk keys sees key j when
//       i + lk - lq - left <= j <= i + lk - lq + right   (-1: that side unbounded);
//   causal is right = 0 (bottom-right aligned, as flash-attn >= 2.1).
//   out_i = sum_j softmax_j(scale q_i.k_j) v_j  (q's dtype, [Tq, Hq, D] through strides),
//   lse_i = log sum_j exp(scale q_i.k_j)        (float32 [Hq, Tq] through a head stride);
//   a query that sees no key gets out = 0 and lse = -inf.
//
// Limits (checked; the torch binding turns a violation into an error): float16 or
// bfloat16; head dim a multiple of 8 up to kAttnShortMaxHeadDim; max_seqlen_q/k at most
// kAttnShortMaxSeqlen; q, k, v and out 16-byte aligned with token and head strides that
// are multiples of 8 elements (16-byte vector loads and stores). max_seqlen_q/k must bound
// every segment, as in flash-attn: a longer segment is cut to the bound (its extra queries
// are left unwritten, its extra keys unseen), never read or written out of place.
#pragma once

#include <cstdint>

#include "norm.h"  // DType

namespace mmfast {

constexpr int kAttnShortMaxSeqlen = 128;
constexpr int kAttnShortMaxHeadDim = 128;

struct AttentionShortFwdArgs {
  DType dtype;  // kFloat16 or kBFloat16, for q, k, v and out
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  const int32_t* cu_seqlens_q;  // [batch + 1]
  const int32_t* cu_seqlens_k;  // [batch + 1]
  // Strides in elements.
  int64_t stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh;
  int64_t stride_lh;
  int batch, heads, kv_heads, head_dim;
  int max_seqlen_q, max_seqlen_k;
  int tokens_q, tokens_k;  // rows of q and k: cu_seqlens values are clamped into [0, tokens]
  int window_left, window_right;  // -1: unbounded on that side
  float scale;
};

// Launches the kernel on ``stream`` (a cudaStream_t); returns nullptr on success, else a
// static message naming the problem. Nothing is launched when there is no query token.
const char* attention_short_fwd(const AttentionShortFwdArgs& args, void* stream);

}  // namespace mmfast
