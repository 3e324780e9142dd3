// Torch op mmfast_cuda::guided_step over the kernel of scheduler_step.cu. Operands are
// contiguous tensors of one dtype, in the sample's element order (the caller,
// mmfast/cuda/scheduler_step.py, gets them so); absent x0_out and step are empty tensors.
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "scheduler_step.h"
#include "torch_utils.h"

namespace mmfast {
namespace {

void check_operand(const at::Tensor& t, const at::Tensor& sample, const char* name) {
  check_cuda(t, sample, name);
  TORCH_CHECK(t.numel() == sample.numel() && t.is_contiguous() && t.scalar_type() == sample.scalar_type(), name,
              ": expected a contiguous tensor of ", sample.numel(), " ", sample.scalar_type(), " elements");
}

const void* operand_or_null(const std::optional<at::Tensor>& t, const at::Tensor& sample, const char* name) {
  if (!t.has_value()) return nullptr;
  check_operand(*t, sample, name);
  return t->data_ptr();
}

void guided_step_op(const at::Tensor& sample, const at::Tensor& uncond, const std::optional<at::Tensor>& cond,
                    const std::optional<at::Tensor>& prev_x0, const std::optional<at::Tensor>& noise,
                    const at::Tensor& out, const at::Tensor& x0_out, at::ArrayRef<double> coefficients,
                    const std::optional<at::Tensor>& table, const at::Tensor& step, double guidance_scale,
                    bool clip) {
  TORCH_CHECK(sample.is_cuda(), "sample: expected a CUDA tensor, got one on ", sample.device());
  check_operand(sample, sample, "sample");
  check_operand(uncond, sample, "uncond");
  check_operand(out, sample, "out");
  TORCH_CHECK(coefficients.size() == 8, "coefficients: expected 8 numbers, got ", coefficients.size());
  SchedulerStepArgs a{};
  a.dtype = dtype_of(sample, "sample");
  a.x = sample.data_ptr();
  a.uncond = uncond.data_ptr();
  a.cond = operand_or_null(cond, sample, "cond");
  a.x0_prev = operand_or_null(prev_x0, sample, "prev_x0");
  a.noise = operand_or_null(noise, sample, "noise");
  a.prev = out.data_ptr();
  if (x0_out.numel() > 0) {
    check_operand(x0_out, sample, "x0_out");
    a.x0_out = x0_out.data_ptr();
  }
  a.numel = sample.numel();
  a.guidance_scale = static_cast<float>(guidance_scale);
  a.clip = clip;
  const auto c = [&](int i) { return static_cast<float>(coefficients[i]); };
  a.coef = StepCoefficients{c(0), c(1), c(2), c(3), c(4), c(5), c(6), c(7)};
  if (table.has_value()) {
    check_cuda(*table, sample, "table");
    TORCH_CHECK(table->dim() == 2 && table->size(1) == 8 && table->size(0) > 0 && table->is_contiguous() &&
                    table->scalar_type() == at::kFloat,
                "table: expected a contiguous float32 [steps, 8] tensor");
    check_cuda(step, sample, "step");
    TORCH_CHECK(step.numel() == 2 && step.is_contiguous() && step.scalar_type() == at::kInt,
                "step: expected a contiguous int32 [2] counter");
    a.table = table->data_ptr<float>();
    a.table_rows = table->size(0);
    a.step = step.data_ptr<int>();
  }

  const c10::DeviceGuard guard(sample.device());
  const char* err = scheduler_step(a, sample.device().index(), current_stream(sample));
  TORCH_CHECK(err == nullptr, "mmfast_cuda::guided_step: ", err);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmfast_cuda, m) {
  m.def(
      "guided_step(Tensor sample, Tensor uncond, Tensor? cond, Tensor? prev_x0, Tensor? noise, Tensor(a!) out, "
      "Tensor(b!) x0_out, float[] coefficients, Tensor? table, Tensor(c!) step, float guidance_scale, "
      "bool clip) -> ()");
}

TORCH_LIBRARY_IMPL(mmfast_cuda, CUDA, m) { m.impl("guided_step", &guided_step_op); }

}  // namespace mmfast
