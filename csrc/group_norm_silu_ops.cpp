// Torch ops mmfast_cuda::group_norm_fwd / group_norm_bwd over the kernels of
// group_norm_silu.cu. x, y, dy, dx come as [B, C, S] views sharing one layout (NCHW:
// stride_s == 1, or channels-last: stride_c == 1); outputs are allocated by the caller
// (mmfast/cuda/group_norm.py), the workspace here from torch's caching allocator.
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "group_norm_silu.h"
#include "torch_utils.h"

namespace mmfast {
namespace {

GroupNormShape shape_of(const at::Tensor& x, int64_t groups) {
  TORCH_CHECK(x.dim() == 3 && x.is_cuda(), "x: expected a [B, C, S] CUDA tensor, got ", x.sizes(), " on ",
              x.device());
  TORCH_CHECK(groups > 0 && x.size(1) % groups == 0, "num_groups: ", groups, " does not divide ", x.size(1));
  GroupNormShape sh{};
  sh.dtype = dtype_of(x, "x");
  sh.batch = x.size(0);
  sh.channels = x.size(1);
  sh.spatial = x.size(2);
  sh.groups = static_cast<int>(groups);
  sh.stride_b = x.stride(0);
  sh.stride_c = x.stride(1);
  sh.stride_s = x.stride(2);
  const bool nchw = sh.spatial <= 1 || sh.stride_s == 1;
  TORCH_CHECK(nchw || sh.channels <= 1 || sh.stride_c == 1, "x: expected NCHW or channels-last strides, got ",
              x.strides());
  sh.layout = nchw ? GroupNormLayout::kNCHW : GroupNormLayout::kNHWC;
  return sh;
}

void check_same_layout(const at::Tensor& t, const at::Tensor& x, const char* name) {
  check_cuda(t, x, name);
  TORCH_CHECK(t.sizes() == x.sizes() && t.strides() == x.strides() && t.scalar_type() == x.scalar_type(), name,
              ": expected the shape, strides and dtype of x");
}

void group_norm_fwd_op(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& y,
                       const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups, double eps, bool silu) {
  GroupNormFwdArgs a{};
  a.shape = shape_of(x, num_groups);
  check_same_layout(y, x, "y");
  check_vector(weight, x.size(1), x.scalar_type(), x, "weight");
  check_vector(bias, x.size(1), x.scalar_type(), x, "bias");
  check_vector(mean, x.size(0) * num_groups, at::kFloat, x, "mean");
  check_vector(rstd, x.size(0) * num_groups, at::kFloat, x, "rstd");
  a.x = x.data_ptr();
  a.weight = weight.data_ptr();
  a.bias = bias.data_ptr();
  a.y = y.data_ptr();
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.eps = static_cast<float>(eps);
  a.silu = silu;
  if (x.numel() == 0) return;

  const c10::DeviceGuard guard(x.device());
  const int device = x.device().index();
  at::Tensor workspace = at::empty({group_norm_fwd_workspace_floats(a.shape, device)}, x.options().dtype(at::kFloat));
  a.workspace = workspace.data_ptr<float>();
  const char* err = group_norm_fwd(a, device, current_stream(x));
  TORCH_CHECK(err == nullptr, "mmfast_cuda::group_norm_fwd: ", err);
}

void group_norm_bwd_op(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& dx,
                       const at::Tensor& dweight, const at::Tensor& dbias, int64_t num_groups, bool silu) {
  GroupNormBwdArgs a{};
  a.shape = shape_of(x, num_groups);
  check_same_layout(dy, x, "dy");
  check_same_layout(dx, x, "dx");
  check_vector(weight, x.size(1), x.scalar_type(), x, "weight");
  check_vector(bias, x.size(1), x.scalar_type(), x, "bias");
  check_vector(mean, x.size(0) * num_groups, at::kFloat, x, "mean");
  check_vector(rstd, x.size(0) * num_groups, at::kFloat, x, "rstd");
  check_vector(dweight, x.size(1), at::kFloat, x, "dweight");
  check_vector(dbias, x.size(1), at::kFloat, x, "dbias");
  a.dy = dy.data_ptr();
  a.x = x.data_ptr();
  a.weight = weight.data_ptr();
  a.bias = bias.data_ptr();
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.dx = dx.data_ptr();
  a.dweight = dweight.data_ptr<float>();
  a.dbias = dbias.data_ptr<float>();
  a.silu = silu;

  const c10::DeviceGuard guard(x.device());
  const int device = x.device().index();
  at::Tensor workspace;
  if (x.numel() > 0) {
    workspace = at::empty({group_norm_bwd_workspace_floats(a.shape, device)}, x.options().dtype(at::kFloat));
    a.workspace = workspace.data_ptr<float>();
  }
  const char* err = group_norm_bwd(a, device, current_stream(x));  // zeroes dweight, dbias when empty
  TORCH_CHECK(err == nullptr, "mmfast_cuda::group_norm_bwd: ", err);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmfast_cuda, m) {
  m.def(
      "group_norm_fwd(Tensor x, Tensor weight, Tensor bias, Tensor(a!) y, Tensor(b!) mean, Tensor(c!) rstd, "
      "int num_groups, float eps, bool silu) -> ()");
  m.def(
      "group_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor bias, Tensor mean, Tensor rstd, Tensor(a!) dx, "
      "Tensor(b!) dweight, Tensor(c!) dbias, int num_groups, bool silu) -> ()");
}

TORCH_LIBRARY_IMPL(mmfast_cuda, CUDA, m) {
  m.impl("group_norm_fwd", &group_norm_fwd_op);
  m.impl("group_norm_bwd", &group_norm_bwd_op);
}

}  // namespace mmfast
