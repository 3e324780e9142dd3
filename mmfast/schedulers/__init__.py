"""Fused sampler steps: guidance and the scheduler update in one pass per step, built on
``mmfast.ops.guided_step``. One file per scheduler family; each stepper is built from a
schedule's numbers and matches the diffusers scheduler of the same name step by step
(``mmfast.integrations.diffusers.schedulers.fused_stepper`` builds one from a diffusers
scheduler).

    from mmfast.integrations.diffusers.schedulers import fused_stepper

    pipe.scheduler.set_timesteps(30)
    stepper = fused_stepper(pipe.scheduler)
    x = torch.randn(latent_shape) * stepper.init_noise_sigma
    for t in stepper.timesteps:
        eps = unet(torch.cat([stepper.scale_model_input(x)] * 2), t, text).sample
        x = stepper.step(eps, x, guidance_scale=7.5, guidance_rescale=0.7)

UniPC (Wan 2.1 / 2.2) without diffusers, the two denoiser calls' outputs as a pair::

    stepper = UniPCStepper.for_flow(50, flow_shift=5.0)
    for t in stepper.timesteps:
        cond, uncond = wan(x, t, text), wan(x, t, negative_text)
        x = stepper.step((uncond, cond), x, guidance_scale=5.0)
"""

from mmfast.schedulers.base import FusedStepper
from mmfast.schedulers.ddim import DDIMStepper, ddim_coefficients
from mmfast.schedulers.dpm_solver import DPMSolverPP2MStepper, dpm_solver_coefficients
from mmfast.schedulers.euler import (EulerDiscreteStepper, FlowMatchEulerStepper, euler_coefficients,
                                     flow_match_coefficients)
from mmfast.schedulers.unipc import UniPCStepper, flow_unipc_schedule, unipc_coefficients

__all__ = [
    "DDIMStepper", "DPMSolverPP2MStepper", "EulerDiscreteStepper", "FlowMatchEulerStepper", "FusedStepper",
    "UniPCStepper", "ddim_coefficients", "dpm_solver_coefficients", "euler_coefficients", "flow_match_coefficients",
    "flow_unipc_schedule", "unipc_coefficients",
]
