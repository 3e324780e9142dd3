"""DPM-Solver++(2M) (diffusers ``DPMSolverMultistepScheduler`` with ``solver_order=2`` and
``algorithm_type="dpmsolver++"`` or ``"sde-dpmsolver++"``), as one fused step.

With alpha(s) = 1 / sqrt(s^2 + 1), sigma(s) = s alpha(s) (flow sigmas: 1 - s and s),
lambda = log(alpha / sigma), step i from s0 = sigmas[i] to t = sigmas[i + 1]:

    x0   = (x - sigma_s0 m) / alpha_s0     epsilon    (sample: m; v_prediction:
                                                        alpha_s0 x - sigma_s0 m;
                                                        flow_prediction: x - s0 m)
    h    = lambda_t - lambda_s0,  r0 = (lambda_s0 - lambda_s1) / h,  D1 = (x0 - x0_prev) / r0

    first order      prev = sigma_t / sigma_s0 x - alpha_t (e^-h - 1) x0
    2M, midpoint     ... - 0.5 alpha_t (e^-h - 1) D1
    2M, heun         ... + alpha_t ((e^-h - 1) / h + 1) D1
    (sde-dpmsolver++: e^-h on the x term, alpha_t (1 - e^-2h) on x0 and D1 terms, plus
     sigma_t sqrt(1 - e^-2h) noise)

x0 is the solver's state: the step reads the previous x0 and writes the new one in place
(kept in the model output's dtype, as diffusers keeps ``model_outputs``). Which order a
step takes follows diffusers: first order on the first step taken (no previous x0), and
on the last step when ``euler_at_final``, or ``lower_order_final`` with fewer than 15
steps, or the final sigma is zero; second order otherwise.
"""

from __future__ import annotations

import math
from typing import Sequence

from mmfast.ops.scheduler_step import StepCoefficients
from mmfast.schedulers.base import FusedStepper

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")


def _alpha_sigma(s: float, flow: bool) -> tuple[float, float]:
    if flow:
        return 1.0 - s, s
    alpha = 1.0 / math.sqrt(s * s + 1.0)
    return alpha, s * alpha


def _lambda(alpha: float, sigma: float) -> float:
    return math.log(alpha) - math.log(sigma) if sigma > 0 else math.inf


def dpm_solver_coefficients(s1: float | None, s0: float, t: float, *, prediction_type: str = "epsilon",
                            algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint",
                            flow_sigmas: bool = False) -> StepCoefficients:
    """One step from sigma ``s0`` to ``t``; second order when the previous sigma ``s1`` is
    given (None: first order). Float64."""
    alpha_s0, sigma_s0 = _alpha_sigma(s0, flow_sigmas)
    alpha_t, sigma_t = _alpha_sigma(t, flow_sigmas)
    if prediction_type == "epsilon":
        px, pm = 1.0 / alpha_s0, -sigma_s0 / alpha_s0
    elif prediction_type == "sample":
        px, pm = 0.0, 1.0
    elif prediction_type == "v_prediction":
        px, pm = alpha_s0, -sigma_s0
    elif prediction_type == "flow_prediction":
        px, pm = 1.0, -s0
    else:
        raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if algorithm_type not in ALGORITHMS:
        raise ValueError(f"algorithm_type: expected one of {ALGORITHMS}, got {algorithm_type!r}")
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type: expected 'midpoint' or 'heun', got {solver_type!r}")
    lambda_s0, lambda_t = _lambda(alpha_s0, sigma_s0), _lambda(alpha_t, sigma_t)
    h = lambda_t - lambda_s0
    if h == 0.0:
        # A repeated sigma (Karras or Lu sigmas with final_sigmas_type="sigma_min" end on
        # one): the step is the identity, every order and solver type -- the limit h -> 0,
        # and diffusers' result for "midpoint" (its "heun" computes 0/0 and returns NaN).
        return StepCoefficients(px=px, pm=pm, cx=1.0)
    # e^-h = (sigma_t / alpha_t) / (sigma_s0 / alpha_s0): exact 0 at a zero final sigma.
    exp_neg_h = (sigma_t * alpha_s0) / (alpha_t * sigma_s0)
    cn = 0.0
    if algorithm_type == "dpmsolver++":
        cx = sigma_t / sigma_s0
        x0_weight = -alpha_t * (exp_neg_h - 1.0)
    else:
        exp_neg_2h = exp_neg_h * exp_neg_h
        cx = sigma_t / sigma_s0 * exp_neg_h
        x0_weight = alpha_t * (1.0 - exp_neg_2h)
        cn = sigma_t * math.sqrt(1.0 - exp_neg_2h)
    if s1 is None:
        return StepCoefficients(px=px, pm=pm, cx=cx, c0=x0_weight, cn=cn)
    alpha_s1, sigma_s1 = _alpha_sigma(s1, flow_sigmas)
    r0 = (lambda_s0 - _lambda(alpha_s1, sigma_s1)) / h
    if r0 == 0.0:
        raise ValueError(f"sigmas: the previous sigma {s1} equals this step's {s0}: a second-order step "
                         "needs two different ones (diffusers divides by zero there)")
    if solver_type == "midpoint":
        d1_weight = 0.5 * x0_weight
    elif algorithm_type == "dpmsolver++":
        d1_weight = alpha_t * ((exp_neg_h - 1.0) / h + 1.0)
    else:
        d1_weight = alpha_t * ((1.0 - exp_neg_2h) / (-2.0 * h) + 1.0)
    # x0_weight x0 + d1_weight (x0 - x0_prev) / r0
    return StepCoefficients(px=px, pm=pm, cx=cx, c0=x0_weight + d1_weight / r0, c1=-d1_weight / r0, cn=cn)


class DPMSolverPP2MStepper(FusedStepper):
    """Fused DPM-Solver++(2M) steps. ``sigmas``: one per timestep plus the final one."""

    keeps_x0 = True

    def __init__(self, sigmas: Sequence[float], timesteps: Sequence[float], *, prediction_type: str = "epsilon",
                 algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint", solver_order: int = 2,
                 lower_order_final: bool = True, euler_at_final: bool = False, use_flow_sigmas: bool = False,
                 thresholding: bool = False, variance_type: str | None = None):
        super().__init__(timesteps)
        if solver_order not in (1, 2):
            raise ValueError(f"solver_order: the fused step has orders 1 and 2, got {solver_order}")
        if algorithm_type not in ALGORITHMS:
            raise ValueError(f"algorithm_type: expected one of {ALGORITHMS}, got {algorithm_type!r}")
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type: expected 'midpoint' or 'heun', got {solver_type!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if thresholding:
            raise ValueError("thresholding: dynamic thresholding (a per-sample quantile) is not fused")
        if variance_type is not None:
            raise ValueError(f"variance_type: learned variances are not fused, got {variance_type!r}")
        self.sigmas = [float(s) for s in sigmas]
        if len(self.sigmas) != len(self.timesteps) + 1:
            raise ValueError(f"sigmas: expected {len(self.timesteps) + 1} values, got {len(self.sigmas)}")
        self.prediction_type = prediction_type
        self.algorithm_type = algorithm_type
        self.solver_type = solver_type
        self.solver_order = solver_order
        self.lower_order_final = lower_order_final
        self.euler_at_final = euler_at_final
        self.use_flow_sigmas = use_flow_sigmas

    @property
    def adds_noise(self) -> bool:
        return self.algorithm_type == "sde-dpmsolver++"

    def is_first_order(self, index: int, first_taken: int) -> bool:
        """diffusers' rule; ``first_taken``: the index of the first step since reset."""
        n = len(self.timesteps)
        final = index == n - 1 and (self.euler_at_final or (self.lower_order_final and n < 15)
                                    or self.sigmas[-1] == 0.0)
        return self.solver_order == 1 or index == first_taken or final

    def coefficients(self, index: int) -> StepCoefficients:
        s1 = None if self.is_first_order(index, self._start) else self.sigmas[index - 1]
        return dpm_solver_coefficients(s1, self.sigmas[index], self.sigmas[index + 1],
                                       prediction_type=self.prediction_type, algorithm_type=self.algorithm_type,
                                       solver_type=self.solver_type, flow_sigmas=self.use_flow_sigmas)
