// Fused classifier-free guidance + sampler step: the contract is in scheduler_step.h.
// A grid-stride loop over 16-byte packs (VEC = 1 when a pointer or the length is not a
// multiple of 16 bytes); at most one wave of blocks, so the grid size is known for the
// step counter of device mode.
#include "common.cuh"
#include "scheduler_step.h"

namespace mmfast {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC>
__device__ __forceinline__ void load_or_zero(const T* p, int64_t i, float (&out)[VEC]) {
  if (p != nullptr) {
    load_pack<T, VEC>(p + i, out);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = 0.f;
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) scheduler_step_kernel(const SchedulerStepArgs a) {
  StepCoefficients k = a.coef;
  if (a.table != nullptr) {
    // A counter outside [0, rows) (past the end, or negative) reads the NaN sentinel row.
    const int64_t step = a.step[0];
    const int64_t row = (step < 0 || step >= a.table_rows) ? a.table_rows - 1 : step;
    const float* r = a.table + row * 8;
    k = StepCoefficients{r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]};
  }
  const bool clip = a.clip;
  const T* x = static_cast<const T*>(a.x);
  const T* u = static_cast<const T*>(a.uncond);
  const T* c = static_cast<const T*>(a.cond);
  const int64_t packs = a.numel / VEC;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = p * VEC;
    float xv[VEC], m[VEC], x0p[VEC], nz[VEC], x0[VEC], out[VEC];
    load_pack<T, VEC>(x + i, xv);
    load_pack<T, VEC>(u + i, m);
    if (c != nullptr) {
      float cv[VEC];
      load_pack<T, VEC>(c + i, cv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) m[e] += a.guidance_scale * (cv[e] - m[e]);
    }
    load_or_zero<T, VEC>(static_cast<const T*>(a.x0_prev), i, x0p);
    load_or_zero<T, VEC>(static_cast<const T*>(a.noise), i, nz);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      x0[e] = k.px * xv[e] + k.pm * m[e];
      if (clip) x0[e] = fminf(fmaxf(x0[e], -k.clip), k.clip);
      out[e] = k.cx * xv[e] + k.cm * m[e] + k.c0 * x0[e] + k.c1 * x0p[e] + k.cn * nz[e];
    }
    store_pack<T, VEC>(static_cast<T*>(a.prev) + i, out);
    if (a.x0_out != nullptr) store_pack<T, VEC>(static_cast<T*>(a.x0_out) + i, x0);
  }
  if (a.table != nullptr) {
    // Every block read step[0] above; the last one to get here moves it on.
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();
      if (atomicAdd(&a.step[1], 1) == static_cast<int>(gridDim.x) - 1) {
        a.step[0] += 1;
        a.step[1] = 0;
      }
    }
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
const char* step_typed(const SchedulerStepArgs& a, int device, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const bool vec = a.numel % VEC == 0 && aligned16(a.x) && aligned16(a.uncond) && aligned16(a.cond) &&
                   aligned16(a.x0_prev) && aligned16(a.noise) && aligned16(a.prev) && aligned16(a.x0_out);
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
    (void)cudaGetLastError();
    sms = 1;
  }
  const int64_t packs = vec ? a.numel / VEC : a.numel;
  const int64_t wave = static_cast<int64_t>(sms) * (2048 / kThreads);
  int64_t blocks = (packs + kThreads - 1) / kThreads;
  blocks = blocks < wave ? (blocks > 0 ? blocks : 1) : wave;
  if (vec) {
    scheduler_step_kernel<T, VEC><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  } else {
    scheduler_step_kernel<T, 1><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* scheduler_step(const SchedulerStepArgs& a, int device, void* stream) {
  if (a.numel < 0) return "scheduler_step: negative numel";
  if (a.table != nullptr && (a.table_rows <= 0 || a.step == nullptr)) {
    return "scheduler_step: device mode needs a table with rows and a step counter";
  }
  // Even with nothing to compute, device mode must advance the step: one block runs.
  auto s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case DType::kFloat32: return step_typed<float>(a, device, s);
    case DType::kFloat16: return step_typed<__half>(a, device, s);
    case DType::kBFloat16: return step_typed<__nv_bfloat16>(a, device, s);
  }
  return "scheduler_step: unsupported dtype";
}

}  // namespace mmfast
