// Device helpers shared by the csrc kernels: 16-byte packs, dtype conversion, and row
// reductions. Plain CUDA only (no torch headers), so every .cu compiles standalone.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace mmfast {

// ---- element conversion (all arithmetic happens in float32) ---------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Rounds through T, as a value stored in T and read back would be.
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

// ---- packs: VEC elements moved by one load or store ------------------------------------
//
// With VEC * sizeof(T) == 16 the alignment makes the compiler emit one 128-bit
// ld.global / st.global per pack; VEC == 1 is the scalar fallback for rows whose length,
// stride or base address is not a multiple of 16 bytes.

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(pack.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pack.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

// ---- reductions --------------------------------------------------------------------------

template <int K>
__device__ __forceinline__ void warp_sum(float (&v)[K]) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
  }
}

// Sums K values over the blockDim.x threads that share one row (threadIdx.y picks the
// row). blockDim.x is a power of two >= 32 and the block has at most 32 warps; ``scratch``
// holds 32 * K floats. Every thread of the row gets the sums. The order of additions is
// fixed, so results are bitwise reproducible. With more than one warp per row this
// contains __syncthreads: every thread of the block must call it the same number of times.
template <int K>
__device__ __forceinline__ void row_sum(float (&v)[K], float* scratch) {
  warp_sum(v);
  const int warps_per_row = blockDim.x >> 5;
  if (warps_per_row == 1) return;  // uniform over the block: blockDim.x is
  const int lane = threadIdx.x & 31;
  const int first = threadIdx.y * warps_per_row;  // this row's slots in scratch
  __syncthreads();  // the previous call's readers are done with scratch
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) scratch[k * 32 + first + (threadIdx.x >> 5)] = v[k];
  }
  __syncthreads();
  // Every warp of the row reduces the row's partials itself: no broadcast step needed.
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = lane < warps_per_row ? scratch[k * 32 + first + lane] : 0.f;
  warp_sum(v);
}

}  // namespace mmfast
