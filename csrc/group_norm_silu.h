// GroupNorm, optionally fused with the SiLU after it, forward and backward: the host-side
// launch API of group_norm_silu.cu (raw pointers and plain types; no CUDA or torch header).
// Not bound to a torch op yet: it will back the ``cuda`` backend of the group_norm op
// (mmfast/ops/group_norm.py) with the contract of its Triton launchers:
//
//   x, y, dy, dx: [B, C, S] through strides, all four with the same strides: NCHW
//   (stride_s == 1) or channels-last / NHWC (stride_c == 1). Group g holds channels
//   g * Cg .. g * Cg + Cg - 1, Cg = C / G. weight, bias: [C] of x's dtype (may be null).
//   forward   xhat = (x - mean_bg) * rstd_bg over the Cg x S elements of (b, g),
//             z = xhat * w[c] + b[c],  y = z, or y = z * sigmoid(z) with silu;
//             mean, rstd: float32 [B * G]
//   backward  dz = dy, or dy * s * (1 + z * (1 - s)) with s = sigmoid(z) (z recomputed),
//             A = sum(dz * w), Bx = sum(dz * w * xhat) over the group, N = Cg * S,
//             dx = rstd * (dz * w - A / N - xhat * Bx / N),
//             dweight[c] = sum(dz * xhat), dbias[c] = sum(dz)   (float32 [C])
//
// Each (b, g) is split over ``splits`` blocks along S so that small batches fill the GPU;
// partial results meet in a caller-provided float32 workspace and are combined in a
// fixed order: results are bitwise reproducible. Two kernels per pass plus, backward,
// the per-channel sums of the partial weight and bias gradients.
#pragma once

#include <cstdint>

#include "norm.h"  // DType

namespace mmfast {

enum class GroupNormLayout : int { kNCHW = 0, kNHWC = 1 };

struct GroupNormShape {
  DType dtype;
  GroupNormLayout layout;
  int64_t batch, channels, spatial;
  int groups;
  int64_t stride_b, stride_c, stride_s;  // elements; shared by x, y, dy, dx
};

struct GroupNormFwdArgs {
  GroupNormShape shape;
  const void* x;
  const void* weight;
  const void* bias;
  void* y;
  float* mean;
  float* rstd;
  float eps;
  bool silu;
  float* workspace;  // group_norm_fwd_workspace_floats(...) floats
};

struct GroupNormBwdArgs {
  GroupNormShape shape;
  const void* dy;
  const void* x;
  const void* weight;
  const void* bias;
  const float* mean;
  const float* rstd;
  void* dx;
  float* dweight;  // [C] or null
  float* dbias;    // [C] or null
  bool silu;
  float* workspace;  // group_norm_bwd_workspace_floats(...) floats
};

// Blocks per (b, g) along S for this shape on ``device`` (about two waves in total).
int group_norm_splits(const GroupNormShape& shape, int device);
int64_t group_norm_fwd_workspace_floats(const GroupNormShape& shape, int device);
int64_t group_norm_bwd_workspace_floats(const GroupNormShape& shape, int device);

// nullptr on success, else a static message. ``stream`` is a cudaStream_t.
const char* group_norm_fwd(const GroupNormFwdArgs& args, int device, void* stream);
const char* group_norm_bwd(const GroupNormBwdArgs& args, int device, void* stream);

}  // namespace mmfast
