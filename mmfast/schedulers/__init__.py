"""Fused sampler steps: guidance and the scheduler update in one pass per step, built on
``mmfast.ops.guided_step``. One file per scheduler family; each stepper is built from a
schedule's numbers and matches the diffusers scheduler of the same name step by step
(``mmfast.integrations.diffusers.schedulers.fused_stepper`` builds one from a diffusers
scheduler).

    stepper = fused_stepper(pipe.scheduler)        # after set_timesteps
    for t in stepper.timesteps:
        eps = unet(torch.cat([x] * 2), t, text).sample
        x = stepper.step(eps, x, guidance_scale=7.5)
"""

from mmfast.schedulers.base import FusedStepper
from mmfast.schedulers.ddim import DDIMStepper, ddim_coefficients
from mmfast.schedulers.dpm_solver import DPMSolverPP2MStepper, dpm_solver_coefficients
from mmfast.schedulers.euler import (EulerDiscreteStepper, FlowMatchEulerStepper, euler_coefficients,
                                     flow_match_coefficients)

__all__ = [
    "DDIMStepper", "DPMSolverPP2MStepper", "EulerDiscreteStepper", "FlowMatchEulerStepper", "FusedStepper",
    "ddim_coefficients", "dpm_solver_coefficients", "euler_coefficients", "flow_match_coefficients",
]
