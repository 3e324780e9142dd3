// RMSNorm / LayerNorm over the last dim, with an optional residual added first: the
// host-side launch API of norm.cu. Raw pointers and plain types only, so that the torch
// binding (norm_ops.cpp) compiles with a host compiler and no CUDA headers.
//
// Rows are [rows, cols] with a row stride (in elements) and unit column stride. Contract
// (the same as the Triton kernels of mmfast/kernels/norm.py):
//   forward   h = x + residual (rounded to the input dtype; written to res_out),
//             mean = mean(h) (LayerNorm), rstd = 1 / sqrt(mean((h - mean)^2) + eps),
//             y = (h - mean) * rstd * weight + bias;           mean, rstd: float32 [rows]
//   backward  xhat = (h - mean) * rstd, g = dy * weight,
//             dx = rstd * (g - xhat * mean(g * xhat) - mean(g)) (+ dres_out),
//             dweight = sum_rows(dy * xhat), dbias = sum_rows(dy)  (float32 [cols])
// Absent tensors are null pointers. Weight and bias have the dtype of x.
#pragma once

#include <cstdint>

namespace mmfast {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Rows are held in registers, at most kNormElemsPerThread elements per thread and
// kNormMaxThreadsPerRow threads per row (so the backward keeps 128 registers a thread
// without spilling): wider rows are refused, and the Triton backend takes them.
constexpr int kNormElemsPerThread = 16;
constexpr int kNormMaxThreadsPerRow = 512;
constexpr int64_t kNormMaxCols = kNormMaxThreadsPerRow * kNormElemsPerThread;

struct NormFwdArgs {
  DType dtype;
  const void* x;
  const void* residual;
  const void* weight;
  const void* bias;
  void* y;
  void* res_out;  // written when residual is given
  float* mean;    // LayerNorm only
  float* rstd;
  int64_t rows, cols;
  int64_t stride_x, stride_residual, stride_y, stride_res_out;
  float eps;
  bool is_rms;
};

struct NormBwdArgs {
  DType dtype;
  const void* dy;
  const void* h;         // what was normalised: x, or x + residual
  const void* weight;
  const void* dres_out;  // gradient of the residual stream output, added to dx
  const float* mean;     // LayerNorm only
  const float* rstd;
  void* dx;
  float* dweight;        // [cols] or null
  float* dbias;          // [cols] or null
  float* workspace;      // norm_bwd_workspace_floats(...) floats when dweight or dbias
  int64_t rows, cols;
  int64_t stride_dy, stride_h, stride_dres_out, stride_dx;
  bool is_rms;
};

// Each launcher returns nullptr on success, else a static message naming the problem.
// ``stream`` is a cudaStream_t. ``device`` is the CUDA device index the pointers live on.
// With rows == 0 nothing is launched, and dweight / dbias are zeroed on the stream.
const char* norm_fwd(const NormFwdArgs& args, void* stream);
// Floats of workspace norm_bwd needs for these arguments (all but ``workspace`` set).
int64_t norm_bwd_workspace_floats(const NormBwdArgs& args, int device);
const char* norm_bwd(const NormBwdArgs& args, int device, void* stream);

}  // namespace mmfast
