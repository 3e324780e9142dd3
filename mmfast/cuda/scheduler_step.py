"""Launcher of the CUDA C++ guidance + sampler step (csrc/scheduler_step.cu,
scheduler_step_ops.cpp), with the arguments of the Triton launcher
mmfast.kernels.scheduler_step.guided_step_fwd minus what the kernel does not do
(guidance rescale; operands of different dtypes): dispatch keeps those calls on Triton.

Operands arrive contiguous in the sample's element order (the op layer permutes
channels-last tensors to match); ``out`` and ``x0_out`` are written, and a StepTable's
counter advanced. When the library cannot be loaded, the Triton launcher runs instead
(mmfast.cuda.build logs why, once).
"""

from __future__ import annotations

import torch

from mmfast.cuda import build


def guided_step_fwd(sample, uncond, cond, prev_x0, noise, out, x0_out, coefficients, table, step,
                    guidance_scale: float, clip: bool, need_x0: bool) -> None:
    if not build.load(sample.device):
        from mmfast.kernels.scheduler_step import guided_step_fwd as triton_guided_step_fwd

        triton_guided_step_fwd(sample, uncond, cond, prev_x0, noise, out, x0_out, coefficients, table, step,
                               guidance_scale, 0.0, clip, need_x0)
        return
    absent = sample.new_empty((0,))
    torch.ops.mmfast_cuda.guided_step(
        sample, uncond, cond, prev_x0, noise, out, x0_out if x0_out is not None else absent,
        list(coefficients), table, step if step is not None else absent.int(), guidance_scale, clip,
    )


def register_fakes() -> None:
    """Fake of the C++ op for torch.compile: it writes into its arguments, returns nothing."""
    torch.library.register_fake("mmfast_cuda::guided_step")(lambda *args, **kwargs: None)
