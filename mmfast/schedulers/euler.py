"""Euler steps: diffusers ``EulerDiscreteScheduler`` (k-diffusion sigmas) and
``FlowMatchEulerDiscreteScheduler`` (rectified flow, SD3), each one fused step.

Euler discrete, sigma = sigmas[i], dt = sigmas[i + 1] - sigma, model output m:

    x0   = x - sigma m                               epsilon
           m                                          sample
           x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) m    v_prediction
    prev = x + (x - x0) / sigma * dt

Its input-scaling contract: the denoiser sees x / sqrt(sigma^2 + 1)
(:meth:`EulerDiscreteStepper.scale_model_input`), and the first sample is noise times
``init_noise_sigma``. The churn (``s_churn`` > 0) is not fused.

Flow matching, sigma = sigmas[i], sigma' = sigmas[i + 1], velocity m:

    prev = x + (sigma' - sigma) m                     (default)
    prev = (1 - sigma') (x - sigma m) + sigma' noise   (stochastic_sampling)
"""

from __future__ import annotations

import math
from typing import Sequence

from mmfast.ops.scheduler_step import StepCoefficients
from mmfast.schedulers.base import FusedStepper

EULER_PREDICTION_TYPES = ("epsilon", "sample", "original_sample", "v_prediction")


def _check_sigmas(sigmas: Sequence[float], timesteps: Sequence[float]) -> list[float]:
    sigmas = [float(s) for s in sigmas]
    if len(sigmas) != len(timesteps) + 1:
        raise ValueError(f"sigmas: expected {len(timesteps) + 1} values (one per timestep and the final one), "
                         f"got {len(sigmas)}")
    return sigmas


def euler_coefficients(sigma: float, sigma_next: float, prediction_type: str = "epsilon") -> StepCoefficients:
    """One Euler discrete step (float64); x0 in px/pm for ``pred_original_sample``."""
    if prediction_type == "epsilon":
        px, pm = 1.0, -sigma
    elif prediction_type in ("sample", "original_sample"):
        px, pm = 0.0, 1.0
    elif prediction_type == "v_prediction":
        px, pm = 1.0 / (sigma * sigma + 1.0), -sigma / math.sqrt(sigma * sigma + 1.0)
    else:
        raise ValueError(f"prediction_type: expected one of {EULER_PREDICTION_TYPES}, got {prediction_type!r}")
    ratio = (sigma_next - sigma) / sigma  # dt / sigma
    return StepCoefficients(px=px, pm=pm, cx=1.0 + ratio * (1.0 - px), cm=-ratio * pm)


def flow_match_coefficients(sigma: float, sigma_next: float, stochastic: bool = False) -> StepCoefficients:
    """One flow-matching Euler step (float64); x0 = x - sigma m."""
    if stochastic:
        keep = 1.0 - sigma_next
        return StepCoefficients(px=1.0, pm=-sigma, cx=keep, cm=-keep * sigma, cn=sigma_next)
    return StepCoefficients(px=1.0, pm=-sigma, cx=1.0, cm=sigma_next - sigma)


class EulerDiscreteStepper(FusedStepper):
    """Fused Euler discrete steps. ``sigmas``: one per timestep plus the final one."""

    def __init__(self, sigmas: Sequence[float], timesteps: Sequence[float], *, prediction_type: str = "epsilon",
                 init_noise_sigma: float | None = None):
        super().__init__(timesteps)
        if prediction_type not in EULER_PREDICTION_TYPES:
            raise ValueError(f"prediction_type: expected one of {EULER_PREDICTION_TYPES}, got {prediction_type!r}")
        self.sigmas = _check_sigmas(sigmas, self.timesteps)
        self.prediction_type = prediction_type
        # What the initial noise is multiplied by: diffusers uses sigma_max for "linspace"
        # and "trailing" timestep spacing, sqrt(sigma_max^2 + 1) for "leading".
        self.init_noise_sigma = float(init_noise_sigma) if init_noise_sigma is not None else max(self.sigmas)

    def input_divisor(self, index: int) -> float:
        return math.sqrt(self.sigmas[index] ** 2 + 1.0)

    def coefficients(self, index: int) -> StepCoefficients:
        return euler_coefficients(self.sigmas[index], self.sigmas[index + 1], self.prediction_type)


class FlowMatchEulerStepper(FusedStepper):
    """Fused flow-matching Euler steps (SD3). ``sigmas``: one per timestep plus the final one."""

    def __init__(self, sigmas: Sequence[float], timesteps: Sequence[float], *, stochastic_sampling: bool = False):
        super().__init__(timesteps)
        self.sigmas = _check_sigmas(sigmas, self.timesteps)
        self.stochastic_sampling = stochastic_sampling

    @property
    def adds_noise(self) -> bool:
        return self.stochastic_sampling

    def coefficients(self, index: int) -> StepCoefficients:
        return flow_match_coefficients(self.sigmas[index], self.sigmas[index + 1], self.stochastic_sampling)
