"""DDIM (diffusers ``DDIMScheduler``), eta = 0 or > 0, as one fused step.

With a = alphas_cumprod[t], a' = alphas_cumprod[t - T // n] (or the final value past 0),
sigma = eta * sqrt((1 - a') / (1 - a) * (1 - a / a')) and the model output m:

    x0   = (x - sqrt(1 - a) m) / sqrt(a)            epsilon
           m                                          sample
           sqrt(a) x - sqrt(1 - a) m                  v_prediction
    eps  = the matching noise prediction (m, (x - sqrt(a) m) / sqrt(1 - a), sqrt(a) m + sqrt(1 - a) x)
    prev = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma noise

All of it is linear in (x, m), so without clipping the step is prev = cx x + cm m (+ cn
noise). With ``clip_sample``, x0 is clamped to +-clip_sample_range before it is used
(and, with ``use_clipped_model_output``, eps is re-derived from the clamped x0).
``thresholding`` (a per-sample quantile) is not fused: the constructor refuses it.
"""

from __future__ import annotations

import math
from typing import Sequence

from mmfast.ops.scheduler_step import StepCoefficients
from mmfast.schedulers.base import FusedStepper

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def ddim_coefficients(alpha: float, alpha_prev: float, *, prediction_type: str = "epsilon", eta: float = 0.0,
                      clip_sample_range: float | None = None,
                      use_clipped_model_output: bool = False) -> StepCoefficients:
    """One DDIM step from alphas_cumprod at t and at the previous timestep (float64)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if alpha == 0.0 and prediction_type == "epsilon":
        raise ValueError("alpha: alphas_cumprod is 0 at this timestep (a zero-terminal-SNR schedule): an "
                         "epsilon prediction cannot give x0 there; use v_prediction")
    beta = 1.0 - alpha
    sa, sb = math.sqrt(alpha), math.sqrt(beta)
    if prediction_type == "epsilon":
        px, pm, ex, em = 1.0 / sa, -sb / sa, 0.0, 1.0
    elif prediction_type == "sample":
        px, pm, ex, em = 0.0, 1.0, 1.0 / sb, -sa / sb
    else:
        px, pm, ex, em = sa, -sb, sb, sa
    variance = (1.0 - alpha_prev) / beta * (1.0 - alpha / alpha_prev)
    std = eta * math.sqrt(variance)
    direction = math.sqrt(1.0 - alpha_prev - std * std)
    sap = math.sqrt(alpha_prev)
    cn = std if eta > 0 else 0.0
    if clip_sample_range is None:
        return StepCoefficients(px=px, pm=pm, cx=sap * px + direction * ex, cm=sap * pm + direction * em, cn=cn)
    if use_clipped_model_output:  # eps = (x - sqrt(a) x0) / sqrt(1 - a), x0 clamped
        return StepCoefficients(px=px, pm=pm, cx=direction / sb, cm=0.0, c0=sap - direction * sa / sb,
                                cn=cn, clip=clip_sample_range)
    return StepCoefficients(px=px, pm=pm, cx=direction * ex, cm=direction * em, c0=sap, cn=cn,
                            clip=clip_sample_range)


class DDIMStepper(FusedStepper):
    """Fused DDIM steps over a schedule.

    ``alphas_cumprod``: the training schedule [T]; ``timesteps``: the inference timesteps
    (integers in [0, T)); ``final_alpha_cumprod``: used past timestep 0 (1.0 with
    diffusers' ``set_alpha_to_one``). Step i goes from timesteps[i] to
    timesteps[i] - T // len(timesteps), as diffusers does.
    """

    def __init__(self, alphas_cumprod: Sequence[float], timesteps: Sequence[int], *,
                 final_alpha_cumprod: float = 1.0, prediction_type: str = "epsilon", eta: float = 0.0,
                 clip_sample: bool = False, clip_sample_range: float = 1.0,
                 use_clipped_model_output: bool = False, thresholding: bool = False):
        super().__init__(timesteps)
        if thresholding:
            raise ValueError("thresholding: dynamic thresholding (a per-sample quantile) is not fused; "
                             "use the diffusers scheduler's own step")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if not eta >= 0:
            raise ValueError(f"eta: expected a number >= 0, got {eta!r}")
        self.alphas_cumprod = [float(a) for a in alphas_cumprod]
        self.final_alpha_cumprod = float(final_alpha_cumprod)
        self.prediction_type = prediction_type
        self.eta = float(eta)
        self.clip_sample_range = float(clip_sample_range) if clip_sample else None
        self.use_clipped_model_output = use_clipped_model_output
        self.step_ratio = len(self.alphas_cumprod) // len(self.timesteps)
        for t in self.timesteps:
            self.alphas_at(t)  # timesteps outside the training schedule fail here, not mid-run

    @property
    def adds_noise(self) -> bool:
        return self.eta > 0

    def alphas_at(self, timestep) -> tuple[float, float]:
        """alphas_cumprod at ``timestep`` and at the previous timestep."""
        t = int(timestep)
        if t != timestep or not 0 <= t < len(self.alphas_cumprod):
            raise ValueError(f"timestep: expected an integer in [0, {len(self.alphas_cumprod)}), got {timestep}")
        prev = t - self.step_ratio
        return self.alphas_cumprod[t], self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod

    def coefficients(self, index: int) -> StepCoefficients:
        alpha, alpha_prev = self.alphas_at(self.timesteps[index])
        return ddim_coefficients(alpha, alpha_prev, prediction_type=self.prediction_type, eta=self.eta,
                                 clip_sample_range=self.clip_sample_range,
                                 use_clipped_model_output=self.use_clipped_model_output)
