// Helpers for the torch bindings (*_ops.cpp): argument checks, dtype mapping and the
// current CUDA stream, using torch's device-generic headers only. Nothing here includes
// a CUDA header, so the bindings compile with a host compiler against a CPU build of
// torch (the CI check does exactly that).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>

#include <optional>

#include "norm.h"

namespace mmfast {

inline DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, name, ": expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// The current stream of t's device, as a cudaStream_t.
inline void* current_stream(const at::Tensor& t) {
  c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return impl.getStream(t.device()).native_handle();
}

inline void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device() == like.device(), name, ": expected device ", like.device(), ", got ", t.device());
}

// A [rows, cols] matrix with unit column stride (any row stride), of like's dtype.
inline void check_rows(const at::Tensor& t, const at::Tensor& like, const char* name) {
  check_cuda(t, like, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == like.size(0) && t.size(1) == like.size(1), name,
              ": expected shape ", like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, ": expected unit stride in the last dim");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, ": expected dtype ", like.scalar_type(),
              ", got ", t.scalar_type());
}

// A contiguous vector of n elements of the given dtype.
inline void check_vector(const at::Tensor& t, int64_t n, at::ScalarType dtype, const at::Tensor& like,
                         const char* name) {
  check_cuda(t, like, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.is_contiguous(), name, ": expected a contiguous [", n,
              "] tensor, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
}

template <typename P = void>
inline const P* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? static_cast<const P*>(t->data_ptr()) : nullptr;
}

}  // namespace mmfast
