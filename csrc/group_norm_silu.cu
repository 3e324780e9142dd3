// GroupNorm (+ SiLU) forward and backward, NCHW and NHWC: the contract is in
// group_norm_silu.h. Every kernel runs blocks of 256 threads on a (b, g, split) triple:
// blockIdx.x = b * G + g, blockIdx.y = split, covering positions [s0, s1) of S.
//
// NCHW walks the group channel by channel, threads along S in 16-byte packs (one channel
// per pack; needs S % VEC == 0). NHWC puts a pack of channels on each thread and spreads
// the positions over the block (needs Cg % VEC == 0). Anything unaligned takes VEC = 1.
//
// Forward: (1) per block, Welford (count, mean, M2) of its elements, merged across the
// block in lane order -> workspace; (2) every block merges its group's partials in split
// order (Chan's formula: stable for large means), writes y, and split 0 stores mean, rstd.
// Backward: (1) per block, group sums A, Bx and per-channel partial dweight, dbias;
// (2) dx from the group's summed A, Bx; (3) column sums of the partial gradients.
#include "common.cuh"
#include "group_norm_silu.h"

namespace mmfast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMinElemsPerBlock = 4096;
constexpr int kMaxSplits = 128;

using Layout = GroupNormLayout;

struct Welford {
  float n, mean, m2;
};

__device__ __forceinline__ void welford_add(Welford& w, float x) {
  w.n += 1.f;
  const float d = x - w.mean;
  w.mean += d / w.n;
  w.m2 += d * (x - w.mean);
}

// Chan's merge; ``a`` is always the lower-indexed part, so every thread merging the same
// two parts gets the same bits.
__device__ __forceinline__ Welford welford_merge(const Welford& a, const Welford& b) {
  const float n = a.n + b.n;
  if (n == 0.f) return a;
  const float d = b.mean - a.mean, f = b.n / n;
  return {n, a.mean + d * f, a.m2 + b.m2 + d * d * a.n * f};
}

__device__ Welford warp_welford(Welford w) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    Welford o;
    o.n = __shfl_xor_sync(0xffffffffu, w.n, offset);
    o.mean = __shfl_xor_sync(0xffffffffu, w.mean, offset);
    o.m2 = __shfl_xor_sync(0xffffffffu, w.m2, offset);
    w = (lane & offset) ? welford_merge(o, w) : welford_merge(w, o);
  }
  return w;
}

// The block's merged Welford triple, in every thread (blockDim.x == kThreads).
__device__ Welford block_welford(Welford w) {
  __shared__ float parts[3][32];
  w = warp_welford(w);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) {
    parts[0][warp] = w.n;
    parts[1][warp] = w.mean;
    parts[2][warp] = w.m2;
  }
  __syncthreads();
  Welford v{0.f, 0.f, 0.f};
  if (lane < warps) v = {parts[0][lane], parts[1][lane], parts[2][lane]};
  return warp_welford(v);
}

struct Span {
  int64_t b, g, s0, s1, cg;
};

__device__ __forceinline__ Span span_of(const GroupNormShape& sh, int64_t run) {
  Span sp;
  sp.b = blockIdx.x / sh.groups;
  sp.g = blockIdx.x % sh.groups;
  sp.s0 = static_cast<int64_t>(blockIdx.y) * run;
  sp.s1 = min(sh.spatial, sp.s0 + run);
  sp.cg = sh.channels / sh.groups;
  return sp;
}

// Calls f(offset, channel, channel_step) for every pack of this thread in the block's
// span: element i of the pack at ``offset`` has channel ``channel + i * channel_step``.
template <int VEC, Layout L, typename F>
__device__ __forceinline__ void for_each_pack(const GroupNormShape& sh, const Span& sp, F f) {
  if constexpr (L == Layout::kNCHW) {
    for (int64_t c = sp.g * sp.cg; c < (sp.g + 1) * sp.cg; ++c) {
      const int64_t base = sp.b * sh.stride_b + c * sh.stride_c;
      for (int64_t s = sp.s0 + threadIdx.x * VEC; s < sp.s1; s += kThreads * VEC) f(base + s, c, 0);
    }
  } else {
    const int64_t packs = sp.cg / VEC, lanes = kThreads / packs;
    const int64_t lane = threadIdx.x / packs;
    if (lane >= lanes) return;
    const int64_t c = sp.g * sp.cg + (threadIdx.x % packs) * VEC;
    for (int64_t s = sp.s0 + lane; s < sp.s1; s += lanes) f(sp.b * sh.stride_b + s * sh.stride_s + c, c, 1);
  }
}

template <typename T>
__device__ __forceinline__ float param(const T* p, int64_t c, float absent) {
  return p != nullptr ? to_float(p[c]) : absent;
}

__device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + __expf(-z)); }

// Mean and rstd of group (b, g) from its splits' Welford partials, merged in split order.
__device__ __forceinline__ void group_stats(const float* ws, int64_t bg, int splits, int64_t total,
                                            float eps, float& mean, float& rstd) {
  Welford w{0.f, 0.f, 0.f};
  for (int i = 0; i < splits; ++i) {
    const float* p = ws + (bg * splits + i) * 3;
    w = welford_merge(w, Welford{p[0], p[1], p[2]});
  }
  mean = w.mean;
  rstd = 1.f / sqrtf(w.m2 / static_cast<float>(total) + eps);
}

// ---- forward -------------------------------------------------------------------------------

template <typename T, int VEC, Layout L>
__global__ void __launch_bounds__(kThreads) group_norm_stats_kernel(const GroupNormFwdArgs a, int64_t run) {
  const Span sp = span_of(a.shape, run);
  const T* x = static_cast<const T*>(a.x);
  Welford w{0.f, 0.f, 0.f};
  for_each_pack<VEC, L>(a.shape, sp, [&](int64_t offset, int64_t, int) {
    float v[VEC];
    load_pack<T, VEC>(x + offset, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) welford_add(w, v[i]);
  });
  w = block_welford(w);
  if (threadIdx.x == 0) {
    float* out = a.workspace + (static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y) * 3;
    out[0] = w.n;
    out[1] = w.mean;
    out[2] = w.m2;
  }
}

template <typename T, int VEC, Layout L>
__global__ void __launch_bounds__(kThreads) group_norm_apply_kernel(const GroupNormFwdArgs a, int64_t run) {
  const Span sp = span_of(a.shape, run);
  float mean, rstd;
  group_stats(a.workspace, blockIdx.x, gridDim.y, sp.cg * a.shape.spatial, a.eps, mean, rstd);
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    a.mean[blockIdx.x] = mean;
    a.rstd[blockIdx.x] = rstd;
  }
  const T* x = static_cast<const T*>(a.x);
  const T* weight = static_cast<const T*>(a.weight);
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
  const bool silu = a.silu;
  for_each_pack<VEC, L>(a.shape, sp, [=](int64_t offset, int64_t c, int step) {
    float v[VEC];
    load_pack<T, VEC>(x + offset, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float z = (v[i] - mean) * rstd * param(weight, c + i * step, 1.f) + param(bias, c + i * step, 0.f);
      v[i] = silu ? z * sigmoid(z) : z;
    }
    store_pack<T, VEC>(y + offset, v);
  });
}

// ---- backward ------------------------------------------------------------------------------

struct Grad {
  float xhat, dz;  // dz = dL/dz, the gradient before the affine map
};

__device__ __forceinline__ Grad grad_at(float x, float dy, float mean, float rstd, float w, float b, bool silu) {
  const float xhat = (x - mean) * rstd;
  float dz = dy;
  if (silu) {
    const float z = xhat * w + b, s = sigmoid(z);
    dz = dy * s * (1.f + z * (1.f - s));
  }
  return {xhat, dz};
}

// Per block: group sums A = sum(dz * w), Bx = sum(dz * w * xhat) -> workspace [2][B*G][splits];
// per channel of the group, sum(dz * xhat) and sum(dz) over the span -> partial rows
// [B][splits][C] of dweight and dbias after them in the workspace.
template <typename T, int VEC, Layout L>
__global__ void __launch_bounds__(kThreads) group_norm_bwd_reduce_kernel(const GroupNormBwdArgs a, int64_t run) {
  __shared__ float scratch[2 * 32];
  const GroupNormShape& sh = a.shape;
  const Span sp = span_of(sh, run);
  const int splits = gridDim.y;
  const int64_t groups_total = static_cast<int64_t>(gridDim.x) * splits;
  const float mean = a.mean[blockIdx.x], rstd = a.rstd[blockIdx.x];
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(a.dy);
  const T* weight = static_cast<const T*>(a.weight);
  const T* bias = static_cast<const T*>(a.bias);
  float* dw_rows = a.workspace + 2 * groups_total;
  float* db_rows = dw_rows + sh.batch * splits * sh.channels;
  const int64_t row = (sp.b * splits + blockIdx.y) * sh.channels;  // this block's partial row
  float group_sums[2] = {0.f, 0.f};

  if constexpr (L == Layout::kNCHW) {
    for (int64_t c = sp.g * sp.cg; c < (sp.g + 1) * sp.cg; ++c) {
      const float w = param(weight, c, 1.f), b = param(bias, c, 0.f);
      const int64_t base = sp.b * sh.stride_b + c * sh.stride_c;
      float channel_sums[2] = {0.f, 0.f};  // sum(dz * xhat), sum(dz)
      for (int64_t s = sp.s0 + threadIdx.x * VEC; s < sp.s1; s += kThreads * VEC) {
        float xv[VEC], dyv[VEC];
        load_pack<T, VEC>(x + base + s, xv);
        load_pack<T, VEC>(dy + base + s, dyv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const Grad g = grad_at(xv[i], dyv[i], mean, rstd, w, b, a.silu);
          channel_sums[0] += g.dz * g.xhat;
          channel_sums[1] += g.dz;
        }
      }
      group_sums[0] += channel_sums[1] * w;
      group_sums[1] += channel_sums[0] * w;
      row_sum(channel_sums, scratch);
      if (threadIdx.x == 0) {
        dw_rows[row + c] = channel_sums[0];
        db_rows[row + c] = channel_sums[1];
      }
    }
  } else {
    __shared__ float lane_sums[2][kThreads * VEC];
    const int64_t packs = sp.cg / VEC, lanes = kThreads / packs;
    const int64_t lane = threadIdx.x / packs, c = sp.g * sp.cg + (threadIdx.x % packs) * VEC;
    float dw[VEC] = {}, db[VEC] = {};
    if (lane < lanes) {
      float w[VEC], b[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        w[i] = param(weight, c + i, 1.f);
        b[i] = param(bias, c + i, 0.f);
      }
      for (int64_t s = sp.s0 + lane; s < sp.s1; s += lanes) {
        const int64_t offset = sp.b * sh.stride_b + s * sh.stride_s + c;
        float xv[VEC], dyv[VEC];
        load_pack<T, VEC>(x + offset, xv);
        load_pack<T, VEC>(dy + offset, dyv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const Grad g = grad_at(xv[i], dyv[i], mean, rstd, w[i], b[i], a.silu);
          dw[i] += g.dz * g.xhat;
          db[i] += g.dz;
          group_sums[0] += g.dz * w[i];
          group_sums[1] += g.dz * w[i] * g.xhat;
        }
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        lane_sums[0][lane * sp.cg + (c - sp.g * sp.cg) + i] = dw[i];
        lane_sums[1][lane * sp.cg + (c - sp.g * sp.cg) + i] = db[i];
      }
    }
    __syncthreads();
    // Per channel, the lanes' sums in lane order.
    for (int64_t k = threadIdx.x; k < sp.cg; k += kThreads) {
      float dw_sum = 0.f, db_sum = 0.f;
      for (int64_t l = 0; l < lanes; ++l) {
        dw_sum += lane_sums[0][l * sp.cg + k];
        db_sum += lane_sums[1][l * sp.cg + k];
      }
      dw_rows[row + sp.g * sp.cg + k] = dw_sum;
      db_rows[row + sp.g * sp.cg + k] = db_sum;
    }
  }
  row_sum(group_sums, scratch);
  if (threadIdx.x == 0) {
    const int64_t at = static_cast<int64_t>(blockIdx.x) * splits + blockIdx.y;
    a.workspace[at] = group_sums[0];
    a.workspace[groups_total + at] = group_sums[1];
  }
}

template <typename T, int VEC, Layout L>
__global__ void __launch_bounds__(kThreads) group_norm_bwd_dx_kernel(const GroupNormBwdArgs a, int64_t run) {
  const Span sp = span_of(a.shape, run);
  const int splits = gridDim.y;
  const int64_t groups_total = static_cast<int64_t>(gridDim.x) * splits;
  float A = 0.f, Bx = 0.f;
#pragma unroll 1
  for (int i = 0; i < splits; ++i) {
    A += a.workspace[static_cast<int64_t>(blockIdx.x) * splits + i];
    Bx += a.workspace[groups_total + static_cast<int64_t>(blockIdx.x) * splits + i];
  }
  const float inv_n = 1.f / static_cast<float>(sp.cg * a.shape.spatial);
  const float mean = a.mean[blockIdx.x], rstd = a.rstd[blockIdx.x];
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(a.dy);
  const T* weight = static_cast<const T*>(a.weight);
  const T* bias = static_cast<const T*>(a.bias);
  T* dx = static_cast<T*>(a.dx);
  const bool silu = a.silu;
  for_each_pack<VEC, L>(a.shape, sp, [=](int64_t offset, int64_t c, int step) {
    float xv[VEC], dyv[VEC];
    load_pack<T, VEC>(x + offset, xv);
    load_pack<T, VEC>(dy + offset, dyv);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float w = param(weight, c + i * step, 1.f);
      const Grad g = grad_at(xv[i], dyv[i], mean, rstd, w, param(bias, c + i * step, 0.f), silu);
      xv[i] = rstd * (g.dz * w - A * inv_n - g.xhat * Bx * inv_n);
    }
    store_pack<T, VEC>(dx + offset, xv);
  });
}

__global__ void column_sum_kernel(const float* partial, int64_t rows, int64_t cols, float* out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float total = 0.f;
  for (int64_t r = 0; r < rows; ++r) total += partial[r * cols + c];
  out[c] = total;
}

// ---- host side --------------------------------------------------------------------------------

const char* launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

const char* bad_shape(const GroupNormShape& sh) {
  if (sh.groups <= 0 || sh.channels % sh.groups != 0) return "group_norm: channels must be a multiple of groups";
  const bool nchw = sh.layout == Layout::kNCHW;
  if (nchw ? (sh.spatial > 1 && sh.stride_s != 1) : (sh.channels > 1 && sh.stride_c != 1)) {
    return "group_norm: strides do not match the layout";
  }
  if (!nchw && sh.channels / sh.groups > kThreads) return "group_norm: NHWC groups wider than 256 channels";
  return nullptr;
}

int64_t run_length(const GroupNormShape& sh, int splits, int vec) {
  int64_t run = (sh.spatial + splits - 1) / splits;
  return (run + vec - 1) / vec * vec;  // NCHW packs never straddle two blocks
}

template <typename T>
bool vectorised(const GroupNormShape& sh, std::initializer_list<const void*> pointers) {
  constexpr int VEC = 16 / sizeof(T);
  const int64_t cg = sh.channels / sh.groups;
  bool ok = sh.stride_b % VEC == 0 &&
            (sh.layout == Layout::kNCHW ? sh.spatial % VEC == 0 && sh.stride_c % VEC == 0
                                        : cg % VEC == 0 && sh.stride_s % VEC == 0);
  for (const void* p : pointers) ok = ok && aligned16(p);
  return ok;
}

template <typename T, int VEC, Layout L>
const char* fwd_launch(const GroupNormFwdArgs& a, int splits, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.shape.batch * a.shape.groups), splits);
  const int64_t run = run_length(a.shape, splits, L == Layout::kNCHW ? VEC : 1);
  group_norm_stats_kernel<T, VEC, L><<<grid, kThreads, 0, stream>>>(a, run);
  group_norm_apply_kernel<T, VEC, L><<<grid, kThreads, 0, stream>>>(a, run);
  return launch_error();
}

template <typename T>
const char* fwd_typed(const GroupNormFwdArgs& a, int splits, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const bool vec = vectorised<T>(a.shape, {a.x, a.y, a.weight, a.bias});
  if (a.shape.layout == Layout::kNCHW) {
    return vec ? fwd_launch<T, VEC, Layout::kNCHW>(a, splits, stream) : fwd_launch<T, 1, Layout::kNCHW>(a, splits, stream);
  }
  return vec ? fwd_launch<T, VEC, Layout::kNHWC>(a, splits, stream) : fwd_launch<T, 1, Layout::kNHWC>(a, splits, stream);
}

template <typename T, int VEC, Layout L>
const char* bwd_launch(const GroupNormBwdArgs& a, int splits, cudaStream_t stream) {
  const GroupNormShape& sh = a.shape;
  const dim3 grid(static_cast<unsigned>(sh.batch * sh.groups), splits);
  const int64_t run = run_length(sh, splits, L == Layout::kNCHW ? VEC : 1);
  group_norm_bwd_reduce_kernel<T, VEC, L><<<grid, kThreads, 0, stream>>>(a, run);
  group_norm_bwd_dx_kernel<T, VEC, L><<<grid, kThreads, 0, stream>>>(a, run);
  const int64_t rows = sh.batch * splits;
  const float* dw_rows = a.workspace + 2 * sh.batch * sh.groups * splits;
  const unsigned blocks = static_cast<unsigned>((sh.channels + 255) / 256);
  if (a.dweight != nullptr) column_sum_kernel<<<blocks, 256, 0, stream>>>(dw_rows, rows, sh.channels, a.dweight);
  if (a.dbias != nullptr) {
    column_sum_kernel<<<blocks, 256, 0, stream>>>(dw_rows + rows * sh.channels, rows, sh.channels, a.dbias);
  }
  return launch_error();
}

template <typename T>
const char* bwd_typed(const GroupNormBwdArgs& a, int splits, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const bool vec = vectorised<T>(a.shape, {a.x, a.dy, a.dx, a.weight, a.bias});
  if (a.shape.layout == Layout::kNCHW) {
    return vec ? bwd_launch<T, VEC, Layout::kNCHW>(a, splits, stream) : bwd_launch<T, 1, Layout::kNCHW>(a, splits, stream);
  }
  return vec ? bwd_launch<T, VEC, Layout::kNHWC>(a, splits, stream) : bwd_launch<T, 1, Layout::kNHWC>(a, splits, stream);
}

}  // namespace

int group_norm_splits(const GroupNormShape& sh, int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
    (void)cudaGetLastError();
    sms = 1;
  }
  const int64_t groups = sh.batch * sh.groups;
  const int64_t wave = static_cast<int64_t>(sms) * (2048 / kThreads);
  const int64_t wanted = groups > 0 ? (2 * wave + groups - 1) / groups : 1;
  const int64_t elems = (sh.channels / (sh.groups > 0 ? sh.groups : 1)) * sh.spatial;
  const int64_t most = (elems + kMinElemsPerBlock - 1) / kMinElemsPerBlock;
  int64_t splits = wanted < most ? wanted : most;
  if (splits > kMaxSplits) splits = kMaxSplits;
  return static_cast<int>(splits > 0 ? splits : 1);
}

int64_t group_norm_fwd_workspace_floats(const GroupNormShape& sh, int device) {
  return 3 * sh.batch * sh.groups * group_norm_splits(sh, device);
}

int64_t group_norm_bwd_workspace_floats(const GroupNormShape& sh, int device) {
  const int64_t splits = group_norm_splits(sh, device);
  return 2 * sh.batch * sh.groups * splits + 2 * sh.batch * splits * sh.channels;
}

const char* group_norm_fwd(const GroupNormFwdArgs& a, int device, void* stream) {
  if (const char* err = bad_shape(a.shape)) return err;
  if (a.shape.batch * a.shape.channels * a.shape.spatial == 0) return nullptr;
  const int splits = group_norm_splits(a.shape, device);
  auto s = static_cast<cudaStream_t>(stream);
  switch (a.shape.dtype) {
    case DType::kFloat32: return fwd_typed<float>(a, splits, s);
    case DType::kFloat16: return fwd_typed<__half>(a, splits, s);
    case DType::kBFloat16: return fwd_typed<__nv_bfloat16>(a, splits, s);
  }
  return "group_norm_fwd: unsupported dtype";
}

const char* group_norm_bwd(const GroupNormBwdArgs& a, int device, void* stream) {
  if (const char* err = bad_shape(a.shape)) return err;
  auto s = static_cast<cudaStream_t>(stream);
  if (a.shape.batch * a.shape.channels * a.shape.spatial == 0) {
    const size_t bytes = sizeof(float) * static_cast<size_t>(a.shape.channels);
    if (a.dweight != nullptr) cudaMemsetAsync(a.dweight, 0, bytes, s);
    if (a.dbias != nullptr) cudaMemsetAsync(a.dbias, 0, bytes, s);
    return launch_error();
  }
  const int splits = group_norm_splits(a.shape, device);
  switch (a.shape.dtype) {
    case DType::kFloat32: return bwd_typed<float>(a, splits, s);
    case DType::kFloat16: return bwd_typed<__half>(a, splits, s);
    case DType::kBFloat16: return bwd_typed<__nv_bfloat16>(a, splits, s);
  }
  return "group_norm_bwd: unsupported dtype";
}

}  // namespace mmfast
