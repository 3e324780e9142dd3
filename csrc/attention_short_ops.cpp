// Torch op mmfast_cuda::attention_short_fwd over the kernel of attention_short.cu. It writes
// out and lse, which the caller allocates (mmfast/cuda/attention.py, NaN-poisoned under the
// tests), and returns nothing; its fake implementation is registered from Python. Every
// check reads shapes, strides and pointers only (no device value: no sync).
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "attention_short.h"
#include "torch_utils.h"

namespace mmfast {
namespace {

// [T, H, D] of q's dtype and head dim, rows fit for 16-byte vector access.
void check_tokens(const at::Tensor& t, const at::Tensor& q, const char* name) {
  check_cuda(t, q, name);
  TORCH_CHECK(t.dim() == 3, name, ": expected a [T, H, D] tensor, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, ": expected dtype ", q.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.size(2) == q.size(2), name, ": expected head dim ", q.size(2), ", got ", t.size(2));
  TORCH_CHECK(t.stride(2) == 1, name, ": expected unit stride in the last dim, got strides ", t.strides());
  TORCH_CHECK(t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0, name,
              ": token and head strides must be multiples of 8 elements (16-byte rows), got ", t.strides());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, ": data must be 16-byte aligned");
}

void check_cu_seqlens(const at::Tensor& cu, const at::Tensor& q, int64_t entries, const char* name) {
  check_cuda(cu, q, name);
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) == entries && cu.is_contiguous() && cu.scalar_type() == at::kInt, name,
              ": expected a contiguous int32 [", entries, "] tensor, got ", cu.scalar_type(), " ", cu.sizes());
}

int window_side(int64_t side, const char* name) {
  TORCH_CHECK(side >= -1, name, ": expected an int >= -1 (-1: unbounded), got ", side);
  return static_cast<int>(std::min<int64_t>(side, 1 << 20));  // the kernel clamps further
}

void attention_short_fwd_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                            int64_t max_seqlen_k, int64_t window_left, int64_t window_right, double scale,
                            const at::Tensor& out, const at::Tensor& lse) {
  TORCH_CHECK(q.dim() == 3 && q.is_cuda(), "q: expected a [T, H, D] CUDA tensor, got ", q.sizes(), " on ",
              q.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "q: expected float16 or bfloat16, got ", q.scalar_type());
  const int64_t tokens = q.size(0), heads = q.size(1), head_dim = q.size(2);
  TORCH_CHECK(head_dim % 8 == 0 && head_dim >= 8 && head_dim <= kAttnShortMaxHeadDim,
              "q: head dim must be a multiple of 8 in 8..", kAttnShortMaxHeadDim, ", got ", head_dim);
  check_tokens(q, q, "q");
  check_tokens(k, q, "k");
  check_tokens(v, q, "v");
  TORCH_CHECK(v.sizes() == k.sizes(), "v: expected shape ", k.sizes(), " (that of k), got ", v.sizes());
  const int64_t kv_heads = k.size(1);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "k: expected a head count that divides q's ", heads, ", got ",
              kv_heads);
  TORCH_CHECK(heads <= 65535, "q: at most 65535 heads, got ", heads);
  TORCH_CHECK(std::max(tokens, k.size(0)) < (int64_t{1} << 31), "q, k: fewer than 2^31 tokens");
  TORCH_CHECK(cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) >= 1, "cu_seqlens_q: expected B+1 >= 1 entries, got ",
              cu_seqlens_q.sizes());
  const int64_t batch = cu_seqlens_q.size(0) - 1;
  check_cu_seqlens(cu_seqlens_q, q, batch + 1, "cu_seqlens_q");
  check_cu_seqlens(cu_seqlens_k, q, batch + 1, "cu_seqlens_k");
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_q <= kAttnShortMaxSeqlen && max_seqlen_k >= 0 &&
                  max_seqlen_k <= kAttnShortMaxSeqlen,
              "max_seqlen_q, max_seqlen_k: expected 0..", kAttnShortMaxSeqlen, ", got ", max_seqlen_q, ", ",
              max_seqlen_k);
  check_tokens(out, q, "out");
  TORCH_CHECK(out.sizes() == q.sizes(), "out: expected shape ", q.sizes(), ", got ", out.sizes());
  check_cuda(lse, q, "lse");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == heads && lse.size(1) == tokens && lse.scalar_type() == at::kFloat &&
                  (tokens <= 1 || lse.stride(1) == 1),
              "lse: expected a float32 [", heads, ", ", tokens, "] tensor with unit token stride, got ",
              lse.scalar_type(), " ", lse.sizes());

  AttentionShortFwdArgs a{};
  a.dtype = dtype_of(q, "q");
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  a.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  a.stride_qt = q.stride(0);
  a.stride_qh = q.stride(1);
  a.stride_kt = k.stride(0);
  a.stride_kh = k.stride(1);
  a.stride_vt = v.stride(0);
  a.stride_vh = v.stride(1);
  a.stride_ot = out.stride(0);
  a.stride_oh = out.stride(1);
  a.stride_lh = lse.stride(0);
  a.batch = static_cast<int>(batch);
  a.heads = static_cast<int>(heads);
  a.kv_heads = static_cast<int>(kv_heads);
  a.head_dim = static_cast<int>(head_dim);
  a.max_seqlen_q = static_cast<int>(max_seqlen_q);
  a.max_seqlen_k = static_cast<int>(max_seqlen_k);
  a.tokens_q = static_cast<int>(tokens);
  a.tokens_k = static_cast<int>(k.size(0));
  a.window_left = window_side(window_left, "window_left");
  a.window_right = window_side(window_right, "window_right");
  a.scale = static_cast<float>(scale);
  if (tokens == 0 || heads == 0) return;

  const c10::DeviceGuard guard(q.device());
  const char* err = attention_short_fwd(a, current_stream(q));
  TORCH_CHECK(err == nullptr, "mmfast_cuda::attention_short_fwd: ", err);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmfast_cuda, m) {
  m.def(
      "attention_short_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, int window_left, int window_right, float scale, "
      "Tensor(a!) out, Tensor(b!) lse) -> ()");
}

TORCH_LIBRARY_IMPL(mmfast_cuda, CUDA, m) { m.impl("attention_short_fwd", &attention_short_fwd_op); }

}  // namespace mmfast
