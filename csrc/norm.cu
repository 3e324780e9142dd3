// RMSNorm / LayerNorm (+ residual) forward and backward: the contract is in norm.h.
//
// Layout of the work: a row is split over threads_per_row threads (a power of two from
// 32 to 512, the smallest with threads_per_row * 16 >= cols); each thread keeps its at
// most 16 elements in registers as packs of VEC elements (16 bytes when the row is
// aligned, else VEC = 1), so x, residual and dy are read from memory exactly once.
// Small rows share a block (threadIdx.y picks the row). Statistics and the backward's two
// row sums accumulate in float32 in a fixed order: results are bitwise reproducible.
//
// Weight and bias gradients: the backward runs a grid of about one wave of blocks, each
// looping over rows with a fixed stride and adding dy * xhat and dy into per-thread
// float32 accumulators in shared memory (each thread owns its columns, so no atomics and
// no races). Each block then writes one row of partial sums to a workspace, and a second
// kernel adds the partial rows per column in block order: deterministic, like the Triton
// backend.
#include "common.cuh"
#include "norm.h"

namespace mmfast {
namespace {

constexpr int kElems = kNormElemsPerThread;
constexpr int kFwdThreadsPerBlock = 256;
constexpr int kBwdThreadsPerBlock = 512;

int threads_per_row(int64_t cols) {
  int threads = 32;
  while (static_cast<int64_t>(threads) * kElems < cols) threads *= 2;
  return threads;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T, int VEC>
__global__ void __launch_bounds__(kNormMaxThreadsPerRow) norm_fwd_kernel(const NormFwdArgs a) {
  constexpr int ITERS = kElems / VEC;
  __shared__ float scratch[32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < a.rows;  // inactive rows still join the block's reductions
  const int64_t packs = a.cols / VEC;
  const int64_t safe_row = active ? row : 0;
  const T* x = static_cast<const T*>(a.x) + safe_row * a.stride_x;
  const T* res = static_cast<const T*>(a.residual) + safe_row * a.stride_residual;
  T* res_out = static_cast<T*>(a.res_out) + safe_row * a.stride_res_out;

  float h[ITERS][VEC];
  float sum[1] = {0.f};
#pragma unroll
  for (int k = 0; k < ITERS; ++k) {
    const int64_t p = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (active && p < packs) {
      load_pack<T, VEC>(x + p * VEC, h[k]);
      if (a.residual != nullptr) {
        float r[VEC];
        load_pack<T, VEC>(res + p * VEC, r);
        // The residual stream is stored in T: normalise exactly what is stored.
#pragma unroll
        for (int i = 0; i < VEC; ++i) h[k][i] = round_to<T>(h[k][i] + r[i]);
        store_pack<T, VEC>(res_out + p * VEC, h[k]);
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum[0] += h[k][i];
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) h[k][i] = 0.f;
    }
  }

  const float inv_cols = 1.f / static_cast<float>(a.cols);
  float mean = 0.f;
  if (!a.is_rms) {
    row_sum(sum, scratch);
    mean = sum[0] * inv_cols;
  }
  float squares[1] = {0.f};
#pragma unroll
  for (int k = 0; k < ITERS; ++k) {
    const int64_t p = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (active && p < packs) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        h[k][i] -= mean;
        squares[0] += h[k][i] * h[k][i];
      }
    }
  }
  row_sum(squares, scratch);  // two passes over registers: no cancellation in the variance
  const float rstd = 1.f / sqrtf(squares[0] * inv_cols + a.eps);
  if (!active) return;  // after the last block-wide reduction
  if (threadIdx.x == 0) {
    a.rstd[row] = rstd;
    if (!a.is_rms) a.mean[row] = mean;
  }

  const T* w = static_cast<const T*>(a.weight);
  const T* b = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y) + row * a.stride_y;
#pragma unroll
  for (int k = 0; k < ITERS; ++k) {
    const int64_t p = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (p < packs) {
      float out[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = h[k][i] * rstd;
      if (w != nullptr) {
        float wv[VEC];
        load_pack<T, VEC>(w + p * VEC, wv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) out[i] *= wv[i];
      }
      if (b != nullptr) {
        float bv[VEC];
        load_pack<T, VEC>(b + p * VEC, bv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) out[i] += bv[i];
      }
      store_pack<T, VEC>(y + p * VEC, out);
    }
  }
}

// Shared memory per row group: float32 dweight and dbias accumulators, laid out
// [2][kElems][threads_per_row] so that a warp touches consecutive words (no bank conflicts).
size_t bwd_shared_bytes(int threads, int rows_per_block) {
  return sizeof(float) * 2 * kElems * static_cast<size_t>(threads) * rows_per_block;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kNormMaxThreadsPerRow) norm_bwd_kernel(const NormBwdArgs a) {
  constexpr int ITERS = kElems / VEC;
  extern __shared__ float acc[];
  __shared__ float scratch[2 * 32];
  const int64_t packs = a.cols / VEC;
  const bool want_dw = a.dweight != nullptr, want_db = a.dbias != nullptr;
  const int group_floats = 2 * kElems * blockDim.x;
  float* dw_acc = acc + threadIdx.y * group_floats;
  float* db_acc = dw_acc + kElems * blockDim.x;
  // Slot of element i of this thread's pack k in an accumulator.
  auto slot = [&](int k, int i) { return (k * VEC + i) * blockDim.x + threadIdx.x; };

  float w[ITERS][VEC];
  const T* weight = static_cast<const T*>(a.weight);
#pragma unroll
  for (int k = 0; k < ITERS; ++k) {
    const int64_t p = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (weight != nullptr && p < packs) {
      load_pack<T, VEC>(weight + p * VEC, w[k]);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) w[k][i] = 1.f;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) dw_acc[slot(k, i)] = db_acc[slot(k, i)] = 0.f;
  }

  const float inv_cols = 1.f / static_cast<float>(a.cols);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  // The loop bounds depend on the block only, so every thread meets the same barriers.
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.y; first < a.rows; first += step) {
    const int64_t row = first + threadIdx.y;
    const bool active = row < a.rows;
    const int64_t safe_row = active ? row : 0;
    const T* h = static_cast<const T*>(a.h) + safe_row * a.stride_h;
    const T* dy = static_cast<const T*>(a.dy) + safe_row * a.stride_dy;
    const float rstd = active ? a.rstd[row] : 0.f;
    const float mean = active && !a.is_rms ? a.mean[row] : 0.f;

    float xhat[ITERS][VEC], g[ITERS][VEC];
    float sums[2] = {0.f, 0.f};  // sum(g * xhat), sum(g)
#pragma unroll
    for (int k = 0; k < ITERS; ++k) {
      const int64_t p = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (active && p < packs) {
        float dyv[VEC];
        load_pack<T, VEC>(h + p * VEC, xhat[k]);
        load_pack<T, VEC>(dy + p * VEC, dyv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          xhat[k][i] = (xhat[k][i] - mean) * rstd;
          g[k][i] = dyv[i] * w[k][i];
          sums[0] += g[k][i] * xhat[k][i];
          sums[1] += g[k][i];
          if (want_dw) dw_acc[slot(k, i)] += dyv[i] * xhat[k][i];
          if (want_db) db_acc[slot(k, i)] += dyv[i];
        }
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) xhat[k][i] = g[k][i] = 0.f;
      }
    }
    row_sum(sums, scratch);
    const float c1 = sums[0] * inv_cols;
    const float c2 = a.is_rms ? 0.f : sums[1] * inv_cols;

    if (!active) continue;
    const T* dres = static_cast<const T*>(a.dres_out) + row * a.stride_dres_out;
    T* dx = static_cast<T*>(a.dx) + row * a.stride_dx;
#pragma unroll
    for (int k = 0; k < ITERS; ++k) {
      const int64_t p = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (p < packs) {
        float out[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) out[i] = rstd * (g[k][i] - xhat[k][i] * c1 - c2);
        if (a.dres_out != nullptr) {
          float d[VEC];
          load_pack<T, VEC>(dres + p * VEC, d);
#pragma unroll
          for (int i = 0; i < VEC; ++i) out[i] += d[i];
        }
        store_pack<T, VEC>(dx + p * VEC, out);
      }
    }
  }

  if (!want_dw && !want_db) return;
  // Row group 0 adds the other groups' accumulators (in order) and writes the block's
  // partial row: workspace is [2][gridDim.x][cols], dweight partials then dbias partials.
  __syncthreads();
  if (threadIdx.y != 0) return;
  float* dw_partial = a.workspace + static_cast<int64_t>(blockIdx.x) * a.cols;
  float* db_partial = dw_partial + static_cast<int64_t>(gridDim.x) * a.cols;
#pragma unroll
  for (int k = 0; k < ITERS; ++k) {
    const int64_t p = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (p >= packs) continue;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float dw_sum = 0.f, db_sum = 0.f;
      for (int group = 0; group < blockDim.y; ++group) {
        dw_sum += acc[group * group_floats + slot(k, i)];
        db_sum += acc[group * group_floats + kElems * blockDim.x + slot(k, i)];
      }
      if (want_dw) dw_partial[p * VEC + i] = dw_sum;
      if (want_db) db_partial[p * VEC + i] = db_sum;
    }
  }
}

// out[c] = sum over r of partial[r][c], in row order. One thread per column.
__global__ void column_sum_kernel(const float* partial, int64_t rows, int64_t cols, float* out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float total = 0.f;
  for (int64_t r = 0; r < rows; ++r) total += partial[r * cols + c];
  out[c] = total;
}

const char* launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// ---- forward -----------------------------------------------------------------------------

template <typename T>
const char* fwd_typed(const NormFwdArgs& a, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const bool has_res = a.residual != nullptr;
  const bool vectorised =
      a.cols % VEC == 0 && a.stride_x % VEC == 0 && a.stride_y % VEC == 0 &&
      (!has_res || (a.stride_residual % VEC == 0 && a.stride_res_out % VEC == 0)) &&
      aligned16(a.x) && aligned16(a.y) && aligned16(a.residual) && aligned16(a.res_out) &&
      aligned16(a.weight) && aligned16(a.bias);
  const int threads = threads_per_row(a.cols);
  const int rows_per_block = threads >= kFwdThreadsPerBlock ? 1 : kFwdThreadsPerBlock / threads;
  const dim3 block(threads, rows_per_block);
  const dim3 grid(static_cast<unsigned>((a.rows + rows_per_block - 1) / rows_per_block));
  if (vectorised) {
    norm_fwd_kernel<T, VEC><<<grid, block, 0, stream>>>(a);
  } else {
    norm_fwd_kernel<T, 1><<<grid, block, 0, stream>>>(a);
  }
  return launch_error();
}

// ---- backward ----------------------------------------------------------------------------

template <typename T>
bool bwd_vectorised(const NormBwdArgs& a) {
  constexpr int VEC = 16 / sizeof(T);
  return a.cols % VEC == 0 && a.stride_dy % VEC == 0 && a.stride_h % VEC == 0 &&
         a.stride_dx % VEC == 0 && (a.dres_out == nullptr || a.stride_dres_out % VEC == 0) &&
         aligned16(a.dy) && aligned16(a.h) && aligned16(a.dx) && aligned16(a.dres_out) &&
         aligned16(a.weight);
}

struct BwdLaunch {
  const void* kernel;
  dim3 grid, block;
  size_t shared;
  const char* error;
};

template <typename T>
BwdLaunch bwd_launch(const NormBwdArgs& a, int device) {
  constexpr int VEC = 16 / sizeof(T);
  BwdLaunch l;
  l.kernel = bwd_vectorised<T>(a) ? reinterpret_cast<const void*>(&norm_bwd_kernel<T, VEC>)
                                  : reinterpret_cast<const void*>(&norm_bwd_kernel<T, 1>);
  const int threads = threads_per_row(a.cols);
  const int rows_per_block = threads >= kBwdThreadsPerBlock ? 1 : kBwdThreadsPerBlock / threads;
  l.block = dim3(threads, rows_per_block);
  l.shared = bwd_shared_bytes(threads, rows_per_block);
  // About one wave: as many blocks as fit on the device at once, no more than the rows need.
  int sms = 0, per_sm = 0;
  l.error = nullptr;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaFuncSetAttribute(l.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(l.shared)) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, l.kernel, threads * rows_per_block,
                                                    l.shared) != cudaSuccess) {
    l.error = launch_error();  // also clears the error state
  }
  const int64_t needed = (a.rows + rows_per_block - 1) / rows_per_block;
  const int64_t wave = static_cast<int64_t>(sms > 0 ? sms : 1) * (per_sm > 0 ? per_sm : 1);
  l.grid = dim3(static_cast<unsigned>(needed < wave ? (needed > 0 ? needed : 1) : wave));
  return l;
}

template <typename T>
int64_t workspace_typed(const NormBwdArgs& a, int device) {
  if (a.dweight == nullptr && a.dbias == nullptr) return 0;
  return 2 * static_cast<int64_t>(bwd_launch<T>(a, device).grid.x) * a.cols;
}

template <typename T>
const char* bwd_typed(const NormBwdArgs& a, int device, cudaStream_t stream) {
  const BwdLaunch l = bwd_launch<T>(a, device);
  if (l.error != nullptr) return l.error;
  NormBwdArgs args = a;
  void* params[] = {&args};
  cudaLaunchKernel(l.kernel, l.grid, l.block, params, l.shared, stream);
  if (const char* err = launch_error()) return err;
  const int64_t blocks = l.grid.x;
  const unsigned col_blocks = static_cast<unsigned>((a.cols + 255) / 256);
  if (a.dweight != nullptr) column_sum_kernel<<<col_blocks, 256, 0, stream>>>(a.workspace, blocks, a.cols, a.dweight);
  if (a.dbias != nullptr) {
    column_sum_kernel<<<col_blocks, 256, 0, stream>>>(a.workspace + blocks * a.cols, blocks, a.cols, a.dbias);
  }
  return launch_error();
}

const char* bad_shape(int64_t rows, int64_t cols) {
  if (cols <= 0 || cols > kNormMaxCols) return "norm: cols must be in 1..kNormMaxCols";
  if (rows < 0 || rows > 0x7fffffffLL * 4) return "norm: too many rows";
  return nullptr;
}

}  // namespace

const char* norm_fwd(const NormFwdArgs& a, void* stream) {
  if (a.rows == 0) return nullptr;
  if (const char* err = bad_shape(a.rows, a.cols)) return err;
  auto s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case DType::kFloat32: return fwd_typed<float>(a, s);
    case DType::kFloat16: return fwd_typed<__half>(a, s);
    case DType::kBFloat16: return fwd_typed<__nv_bfloat16>(a, s);
  }
  return "norm_fwd: unsupported dtype";
}

int64_t norm_bwd_workspace_floats(const NormBwdArgs& a, int device) {
  if (a.rows == 0 || bad_shape(a.rows, a.cols) != nullptr) return 0;
  switch (a.dtype) {
    case DType::kFloat32: return workspace_typed<float>(a, device);
    case DType::kFloat16: return workspace_typed<__half>(a, device);
    case DType::kBFloat16: return workspace_typed<__nv_bfloat16>(a, device);
  }
  return 0;
}

const char* norm_bwd(const NormBwdArgs& a, int device, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (a.rows == 0) {  // sums over no rows
    const size_t bytes = sizeof(float) * static_cast<size_t>(a.cols > 0 ? a.cols : 0);
    if (a.dweight != nullptr) cudaMemsetAsync(a.dweight, 0, bytes, s);
    if (a.dbias != nullptr) cudaMemsetAsync(a.dbias, 0, bytes, s);
    return launch_error();
  }
  if (const char* err = bad_shape(a.rows, a.cols)) return err;
  switch (a.dtype) {
    case DType::kFloat32: return bwd_typed<float>(a, device, s);
    case DType::kFloat16: return bwd_typed<__half>(a, device, s);
    case DType::kBFloat16: return bwd_typed<__nv_bfloat16>(a, device, s);
  }
  return "norm_bwd: unsupported dtype";
}

}  // namespace mmfast
