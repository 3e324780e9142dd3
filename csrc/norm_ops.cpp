// Torch ops mmfast_cuda::norm_fwd / norm_bwd over the kernels of norm.cu. They write into
// outputs the caller allocates (so tests can poison them) and return nothing; their fake
// implementations are registered from Python (mmfast/cuda/norm.py). The contract is the
// one of the Triton launchers in mmfast/kernels/norm.py.
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "norm.h"
#include "torch_utils.h"

namespace mmfast {
namespace {

void check_param(const std::optional<at::Tensor>& p, const at::Tensor& x, const char* name) {
  if (p.has_value()) check_vector(*p, x.size(1), x.scalar_type(), x, name);
}

void norm_fwd_op(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                 const at::Tensor& y, const at::Tensor& res_out, const at::Tensor& mean,
                 const at::Tensor& rstd, double eps, bool is_rms) {
  TORCH_CHECK(x.dim() == 2 && x.is_cuda(), "x: expected a 2-d CUDA tensor, got ", x.sizes(), " on ", x.device());
  TORCH_CHECK(x.size(1) <= kNormMaxCols, "x: at most ", kNormMaxCols, " columns, got ", x.size(1));
  const int64_t rows = x.size(0), cols = x.size(1);
  check_rows(x, x, "x");
  check_rows(y, x, "y");
  if (residual.has_value()) {
    check_rows(*residual, x, "residual");
    check_rows(res_out, x, "res_out");
  }
  check_param(weight, x, "weight");
  check_param(bias, x, "bias");
  check_vector(rstd, rows, at::kFloat, x, "rstd");
  if (!is_rms) check_vector(mean, rows, at::kFloat, x, "mean");

  NormFwdArgs a{};
  a.dtype = dtype_of(x, "x");
  a.x = x.data_ptr();
  a.residual = ptr_or_null(residual);
  a.weight = ptr_or_null(weight);
  a.bias = ptr_or_null(bias);
  a.y = y.data_ptr();
  a.res_out = residual.has_value() ? res_out.data_ptr() : nullptr;
  a.mean = is_rms ? nullptr : mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.rows = rows;
  a.cols = cols;
  a.stride_x = x.stride(0);
  a.stride_residual = residual.has_value() ? residual->stride(0) : 0;
  a.stride_y = y.stride(0);
  a.stride_res_out = residual.has_value() ? res_out.stride(0) : 0;
  a.eps = static_cast<float>(eps);
  a.is_rms = is_rms;
  if (rows == 0 || cols == 0) return;

  const c10::DeviceGuard guard(x.device());
  const char* err = norm_fwd(a, current_stream(x));
  TORCH_CHECK(err == nullptr, "mmfast_cuda::norm_fwd: ", err);
}

void norm_bwd_op(const at::Tensor& dy, const at::Tensor& h, const std::optional<at::Tensor>& weight,
                 const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& dres_out,
                 const at::Tensor& dx, const at::Tensor& dweight, const at::Tensor& dbias, bool is_rms) {
  TORCH_CHECK(h.dim() == 2 && h.is_cuda(), "h: expected a 2-d CUDA tensor, got ", h.sizes(), " on ", h.device());
  TORCH_CHECK(h.size(1) <= kNormMaxCols, "h: at most ", kNormMaxCols, " columns, got ", h.size(1));
  const int64_t rows = h.size(0), cols = h.size(1);
  check_rows(h, h, "h");
  check_rows(dy, h, "dy");
  check_rows(dx, h, "dx");
  if (dres_out.has_value()) check_rows(*dres_out, h, "dres_out");
  check_param(weight, h, "weight");
  check_vector(rstd, rows, at::kFloat, h, "rstd");
  if (!is_rms) check_vector(mean, rows, at::kFloat, h, "mean");
  const bool want_dw = dweight.numel() > 0, want_db = dbias.numel() > 0;
  if (want_dw) check_vector(dweight, cols, at::kFloat, h, "dweight");
  if (want_db) check_vector(dbias, cols, at::kFloat, h, "dbias");
  TORCH_CHECK(!want_dw || weight.has_value(), "dweight: given without a weight");

  NormBwdArgs a{};
  a.dtype = dtype_of(h, "h");
  a.dy = dy.data_ptr();
  a.h = h.data_ptr();
  a.weight = ptr_or_null(weight);
  a.dres_out = ptr_or_null(dres_out);
  a.mean = is_rms ? nullptr : mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.dx = dx.data_ptr();
  a.dweight = want_dw ? dweight.data_ptr<float>() : nullptr;
  a.dbias = want_db ? dbias.data_ptr<float>() : nullptr;
  a.rows = rows;
  a.cols = cols;
  a.stride_dy = dy.stride(0);
  a.stride_h = h.stride(0);
  a.stride_dres_out = dres_out.has_value() ? dres_out->stride(0) : 0;
  a.stride_dx = dx.stride(0);
  a.is_rms = is_rms;
  if (cols == 0) return;

  const c10::DeviceGuard guard(h.device());
  const int device = h.device().index();
  // The partial sums live in torch's caching allocator, on the current stream.
  const int64_t floats = norm_bwd_workspace_floats(a, device);
  at::Tensor workspace;
  if (floats > 0) {
    workspace = at::empty({floats}, h.options().dtype(at::kFloat));
    a.workspace = workspace.data_ptr<float>();
  }
  const char* err = norm_bwd(a, device, current_stream(h));
  TORCH_CHECK(err == nullptr, "mmfast_cuda::norm_bwd: ", err);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmfast_cuda, m) {
  m.def(
      "norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, Tensor(a!) y, "
      "Tensor(b!) res_out, Tensor(c!) mean, Tensor(d!) rstd, float eps, bool is_rms) -> ()");
  m.def(
      "norm_bwd(Tensor dy, Tensor h, Tensor? weight, Tensor mean, Tensor rstd, Tensor? dres_out, "
      "Tensor(a!) dx, Tensor(b!) dweight, Tensor(c!) dbias, bool is_rms) -> ()");
}

TORCH_LIBRARY_IMPL(mmfast_cuda, CUDA, m) {
  m.impl("norm_fwd", &norm_fwd_op);
  m.impl("norm_bwd", &norm_bwd_op);
}

}  // namespace mmfast
