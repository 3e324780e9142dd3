// One sampler step with classifier-free guidance, fused into one elementwise pass: the
// host-side launch API of scheduler_step.cu. Not bound to a torch op yet: it will back the
// ``cuda`` backend of the scheduler_step op with the coefficient contract of its Triton
// kernel (kernels/scheduler_step.py on the diffusion-schedulers branch).
//
// Every supported update (DDIM, Euler, DPM-Solver++(2M), flow-matching Euler) is, per
// element, a linear combination with per-step scalar coefficients:
//
//   m    = u + s * (c - u)               guidance scale s; m = u when there is no c
//   x0   = px * x + pm * m               predicted clean sample
//   x0   = clamp(x0, -clip, clip)        only with the ``clip`` flag (DDIM clip_sample)
//   prev = cx * x + cm * m + c0 * x0 + c1 * x0_prev + cn * noise
//
// where u / c are the unconditional / conditional model outputs (eps, v or the flow
// velocity, as the scheduler defines), x the current sample, x0_prev the previous step's
// x0 (multistep solvers), noise fresh noise (stochastic samplers). An absent operand
// counts as zero. All operands share one dtype; everything is computed in float32 and
// rounded once on store. ``x0_out`` may be ``x0_prev`` and ``prev`` may be ``x`` (each
// element is read before it is written, by the same thread).
// Guidance rescale (std matching per sample) needs a statistics pass first and is not
// done here: the Triton backend keeps those calls.
//
// Coefficients come from the arguments (host mode) or, for CUDA-graph capture, from row
// step[0] of a float32 table [rows, 8] in device memory (rows past the last read the
// last); the last block to finish then advances step[0] and resets step[1], the count of
// finished blocks, so each replay of a captured step reads the next row.
#pragma once

#include <cstdint>

#include "norm.h"  // DType

namespace mmfast {

// Table column order.
struct StepCoefficients {
  float px, pm, cx, cm, c0, c1, cn, clip;
};

struct SchedulerStepArgs {
  DType dtype;               // of every tensor operand
  const void* x;
  const void* uncond;        // the model output when there is no guidance
  const void* cond;          // null: no guidance
  const void* x0_prev;       // null: c1 ignored
  const void* noise;         // null: cn ignored
  void* prev;                // out: the next sample
  void* x0_out;              // out (null: not stored): x0, for the next multistep update
  int64_t numel;
  float guidance_scale;
  bool clip;                 // clamp x0 to [-coef.clip, coef.clip]
  StepCoefficients coef;     // host mode
  const float* table;        // device mode when not null: [table_rows, 8]
  int64_t table_rows;
  int* step;                 // device mode: {row, finished blocks}
};

// nullptr on success, else a static message. ``stream`` is a cudaStream_t.
const char* scheduler_step(const SchedulerStepArgs& args, int device, void* stream);

}  // namespace mmfast
