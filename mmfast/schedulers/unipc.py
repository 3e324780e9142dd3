"""UniPC (diffusers ``UniPCMultistepScheduler`` with ``predict_x0=True``, solver orders 1-2,
``solver_type`` "bh1" or "bh2", no ``solver_p``, no thresholding; Wan 2.1 / 2.2 sample
with it in flow-prediction mode): the corrector of the previous step (UniC) and this
step's predictor (UniP), with guidance, as one fused pass.

With alpha(s), sigma(s) as in DPM-Solver (flow sigmas: 1 - s and s), lambda = log(alpha /
sigma), x0_k the data prediction of step k (x0 = x - s m for flow prediction), step i
from s0 = sigmas[i] to t = sigmas[i + 1], h = lambda_t - lambda_s0, hh = -h,
phi = e^hh - 1 and B = hh ("bh1") or e^hh - 1 ("bh2"):

    UniP, order 1    prev = sigma_t / sigma_s0 x - alpha_t phi x0_i
          order 2    ... - alpha_t B rho (x0_{i-1} - x0_i) / r,  rho = 1/2,
                     r = (lambda_{i-1} - lambda_s0) / h

UniC at step i corrects the sample that the previous step (from s0 = sigmas[i - 1] to
t = sigmas[i]) predicted, once x0_i is known, from that step's input ``last``:

    corrected = sigma_t / sigma_s0 last - alpha_t phi x0_{i-1}
                - alpha_t B (rho_t (x0_i - x0_{i-1}) + rho_1 (x0_{i-2} - x0_{i-1}) / r)

with r = (lambda_{i-2} - lambda_s0) / h; at order 1 rho_t = 1/2 and rho_1 = 0, at order 2
(rho_1, rho_t) solves [[1, 1], [r, 1]] rho = (b1, b2), b1 = (phi / hh - 1) / B,
b2 = 2 ((phi / hh - 1) / hh - 1/2) / B. The predictor then starts from the corrected
sample. Each is a linear combination of (last, x0_{i-1}, x0_{i-2}, x0_i) and (corrected,
x0_i, x0_{i-1}): ``mmfast.ops.guided_step`` with a :class:`CorrectorCoefficients`.

Orders follow diffusers: the corrector runs from the second step taken on (not after a
step listed in ``disable_corrector``), at the order of the previous predictor; the
predictor order is ``solver_order``, capped by the steps taken so far + 1 and, with
``lower_order_final``, by the steps left (the last step is first order).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from mmfast.ops.scheduler_step import CorrectorCoefficients, StepCoefficients, guided_step
from mmfast.schedulers.base import FusedStepper
from mmfast.schedulers.dpm_solver import PREDICTION_TYPES, _alpha_sigma, _lambda

SOLVER_TYPES = ("bh1", "bh2")


class NotFusable(ValueError):
    """A step whose diffusers result is not finite (or undefined) for these sigmas: the
    diffusers patch leaves it to diffusers, the stepper refuses the schedule."""


def _x0_terms(prediction_type: str, s: float, flow_sigmas: bool) -> tuple[float, float]:
    """(px, pm): x0 = px x + pm m at sigma ``s`` (diffusers' convert_model_output)."""
    alpha, sigma = _alpha_sigma(s, flow_sigmas)
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction_type == "sample":
        return 0.0, 1.0
    if prediction_type == "v_prediction":
        return alpha, -sigma
    if prediction_type == "flow_prediction":
        return 1.0, -s
    raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {prediction_type!r}")


def _solver_terms(s0: float, t: float, flow_sigmas: bool, solver_type: str):
    """(sigma_t / sigma_s0, alpha_t, h, hh, phi, B) of a step from sigma s0 to t."""
    alpha_s0, sigma_s0 = _alpha_sigma(s0, flow_sigmas)
    alpha_t, sigma_t = _alpha_sigma(t, flow_sigmas)
    h = _lambda(alpha_t, sigma_t) - _lambda(alpha_s0, sigma_s0)
    hh = -h
    phi = math.expm1(hh)
    b_h = hh if solver_type == "bh1" else phi
    return sigma_t / sigma_s0, alpha_t, h, hh, phi, b_h


def _ratio(s_earlier: float, s0: float, h: float, flow_sigmas: bool) -> float:
    """r = (lambda(s_earlier) - lambda(s0)) / h."""
    lam = _lambda(*_alpha_sigma(s_earlier, flow_sigmas))
    r = (lam - _lambda(*_alpha_sigma(s0, flow_sigmas))) / h
    if r == 0.0 or not math.isfinite(r):
        raise NotFusable(f"sigmas: a second-order step from {s0} with {s_earlier} before it has r = {r} "
                         "(diffusers divides by it)")
    return r


def unipc_coefficients(sigmas: Sequence[float], index: int, *, predictor_order: int, corrector_order: int,
                       prediction_type: str = "flow_prediction", solver_type: str = "bh2",
                       flow_sigmas: bool = True) -> tuple[StepCoefficients, CorrectorCoefficients | None]:
    """Step ``index`` of the schedule ``sigmas`` (one per timestep and the final one):
    the predictor of ``predictor_order`` (1 or 2) and, when ``corrector_order`` is 1 or 2
    (0: none), the corrector in front of it. Float64. Raises :class:`NotFusable` where
    diffusers' step is not finite."""
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type: expected one of {SOLVER_TYPES}, got {solver_type!r}")
    if predictor_order not in (1, 2) or predictor_order > index + 1:
        raise ValueError(f"predictor_order: expected 1 or 2 (at most index + 1 = {index + 1}), got {predictor_order}")
    if corrector_order not in (0, 1, 2) or corrector_order > index:
        raise ValueError(f"corrector_order: expected 0, 1 or 2 (at most index = {index}), got {corrector_order}")
    if not 0 <= index < len(sigmas) - 1:
        raise ValueError(f"index: expected 0 <= index < {len(sigmas) - 1}, got {index}")
    s0, t = float(sigmas[index]), float(sigmas[index + 1])
    px, pm = _x0_terms(prediction_type, s0, flow_sigmas)
    corrector = None
    if corrector_order:
        corrector = _corrector(sigmas, index, corrector_order, solver_type, flow_sigmas)
    ratio, alpha_t, h, _, phi, b_h = _solver_terms(s0, t, flow_sigmas, solver_type)
    if h == 0.0:
        # A repeated sigma (final_sigmas_type="sigma_min" ends on one): the identity, as in diffusers.
        return StepCoefficients(px=px, pm=pm, cx=1.0), corrector
    if not math.isfinite(b_h):
        raise NotFusable(f"solver_type: 'bh1' to sigma {t} has B(h) = -h = {b_h}: diffusers' step is NaN")
    c0, c1 = -alpha_t * phi, 0.0
    if predictor_order == 2:
        r = _ratio(float(sigmas[index - 1]), s0, h, flow_sigmas)
        c1 = -alpha_t * b_h * 0.5 / r
        c0 -= c1
    return StepCoefficients(px=px, pm=pm, cx=ratio, c0=c0, c1=c1), corrector


def _corrector(sigmas, index: int, order: int, solver_type: str, flow_sigmas: bool) -> CorrectorCoefficients:
    """UniC at step ``index``: the previous step (from sigmas[index - 1]) redone."""
    s0, t = float(sigmas[index - 1]), float(sigmas[index])
    ratio, alpha_t, h, hh, phi, b_h = _solver_terms(s0, t, flow_sigmas, solver_type)
    if h == 0.0 or not math.isfinite(h):
        raise NotFusable(f"sigmas: a corrector between sigmas {s0} and {t} has h = {h} (diffusers' is not finite)")
    if order == 1:
        rho_t, rho_1, r = 0.5, 0.0, 1.0
    else:
        r = _ratio(float(sigmas[index - 2]), s0, h, flow_sigmas)
        b1 = (phi / hh - 1.0) / b_h
        b2 = 2.0 * ((phi / hh - 1.0) / hh - 0.5) / b_h
        if r == 1.0:  # (only with sigmas that are not monotone)
            raise NotFusable(f"sigmas: a second-order corrector to sigma {t} has r = 1 (diffusers divides by 1 - r)")
        rho_1 = (b1 - b2) / (1.0 - r)
        rho_t = b1 - rho_1
    # last: ratio; x0_{i-1}: -alpha_t phi + alpha_t B (rho_1 / r + rho_t);
    # x0_{i-2}: -alpha_t B rho_1 / r; x0_i: -alpha_t B rho_t.
    k1 = -alpha_t * b_h * rho_1 / r
    kt = -alpha_t * b_h * rho_t
    return CorrectorCoefficients(kx=ratio, k0=-alpha_t * phi - k1 - kt, k1=k1, kt=kt)


def flow_unipc_schedule(num_inference_steps: int, flow_shift: float,
                        num_train_timesteps: int = 1000) -> tuple[list[float], list[float]]:
    """(sigmas, timesteps) of diffusers' UniPC ``set_timesteps`` with ``use_flow_sigmas``,
    a static ``flow_shift`` and a zero final sigma (Wan's configuration), value for value:
    sigmas float32 (the last 0), timesteps truncated to integers."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps: expected a positive int, got {num_inference_steps!r}")
    if not flow_shift > 0 or not math.isfinite(flow_shift):
        raise ValueError(f"flow_shift: expected a finite number > 0, got {flow_shift!r}")
    # numpy float64 as diffusers computes them, so float32 rounding and the integer
    # truncation of the timesteps come out the same.
    sigmas = np.linspace(1, 1 / num_train_timesteps, num_inference_steps + 1)[:-1]
    sigmas = flow_shift * sigmas / (1 + (flow_shift - 1) * sigmas)
    if np.fabs(sigmas[0] - 1) < 1e-6:
        sigmas[0] -= 1e-6  # diffusers keeps log(alpha) = log(1 - sigma) finite
    timesteps = (sigmas * num_train_timesteps).astype(np.int64)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return [float(v) for v in sigmas], [float(v) for v in timesteps]


def unipc_x0_dtype(prediction_type: str, sample_dtype: torch.dtype, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype diffusers keeps x0 in (its ``model_outputs``)."""
    return model_dtype if prediction_type == "sample" else torch.promote_types(sample_dtype, model_dtype)


class UniPCStepper(FusedStepper):
    """Fused UniPC steps (host mode). ``sigmas``: one per timestep plus the final one.

    Its state, as diffusers keeps it: the last two x0 (:attr:`x0_history`, oldest first)
    and the sample the next corrector starts from (:attr:`last_sample`); ``reset`` clears it.
    """

    keeps_x0 = True

    def __init__(self, sigmas: Sequence[float], timesteps: Sequence[float], *,
                 prediction_type: str = "flow_prediction", solver_type: str = "bh2", solver_order: int = 2,
                 lower_order_final: bool = True, disable_corrector: Sequence[int] = (),
                 use_flow_sigmas: bool = True, predict_x0: bool = True, thresholding: bool = False,
                 solver_p=None):
        super().__init__(timesteps)
        if solver_order not in (1, 2):
            raise ValueError(f"solver_order: the fused UniPC step has orders 1 and 2, got {solver_order}")
        if solver_type not in SOLVER_TYPES:
            raise ValueError(f"solver_type: expected one of {SOLVER_TYPES}, got {solver_type!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if not predict_x0:
            raise ValueError("predict_x0: the fused UniPC step is the data-prediction (predict_x0=True) form")
        if thresholding:
            raise ValueError("thresholding: dynamic thresholding (a per-sample quantile) is not fused")
        if solver_p is not None:
            raise ValueError("solver_p: another scheduler as the predictor is not fused")
        self.sigmas = [float(s) for s in sigmas]
        if len(self.sigmas) != len(self.timesteps) + 1:
            raise ValueError(f"sigmas: expected {len(self.timesteps) + 1} values, got {len(self.sigmas)}")
        if not all(0.0 <= s < (1.0 if use_flow_sigmas else math.inf) for s in self.sigmas):
            bound = " and < 1 (flow sigmas)" if use_flow_sigmas else ""
            raise ValueError(f"sigmas: expected finite values >= 0{bound}, got {self.sigmas}")
        self.prediction_type = prediction_type
        self.solver_type = solver_type
        self.solver_order = solver_order
        self.lower_order_final = lower_order_final
        self.disable_corrector = frozenset(int(i) for i in disable_corrector)
        self.use_flow_sigmas = use_flow_sigmas
        self.reset(0)

    @classmethod
    def for_flow(cls, num_inference_steps: int, flow_shift: float, *, num_train_timesteps: int = 1000,
                 **options) -> "UniPCStepper":
        """The stepper of a Wan pipeline's scheduler after ``set_timesteps(num_inference_steps)``
        (flow prediction, flow sigmas, ``flow_shift`` 3.0 at 480p / 5.0 at 720p, bh2, order
        2), without diffusers; ``options``: the constructor's other keywords."""
        sigmas, timesteps = flow_unipc_schedule(num_inference_steps, flow_shift, num_train_timesteps)
        return cls(sigmas, timesteps, **options)

    # -- the plan: every step's orders and coefficients for a run from step ``start`` ------

    def orders(self, index: int, start: int) -> tuple[int, int]:
        """(predictor order, corrector order; 0: none) of step ``index`` in a run that began
        at step ``start`` (diffusers' rule)."""
        def predictor(i):
            order = min(self.solver_order, len(self) - i) if self.lower_order_final else self.solver_order
            return min(order, i - start + 1)  # lower_order_nums + 1
        corrector = predictor(index - 1) if index > start and index - 1 not in self.disable_corrector else 0
        return predictor(index), corrector

    def reset(self, start: int = 0) -> None:
        if not 0 <= start < len(self):
            raise ValueError(f"start: expected 0 <= start < {len(self)}, got {start}")
        # The whole run's coefficients up front: a schedule diffusers would make non-finite
        # is refused here, not half-way.
        plan = []
        for i in range(start, len(self)):
            p, c = self.orders(i, start)
            try:
                plan.append(unipc_coefficients(self.sigmas, i, predictor_order=p, corrector_order=c,
                                               prediction_type=self.prediction_type,
                                               solver_type=self.solver_type, flow_sigmas=self.use_flow_sigmas))
            except NotFusable as e:
                raise ValueError(f"sigmas: step {i} of this schedule is not finite in diffusers "
                                 f"(solver_type={self.solver_type!r}, lower_order_final="
                                 f"{self.lower_order_final}): {e}") from None
        self._plan = [None] * start + plan
        self.step_index = self._start = start
        self.x0_history: list[Tensor | None] = [None, None]
        self.last_sample: Tensor | None = None

    def coefficients(self, index: int) -> StepCoefficients:
        """The predictor of step ``index`` (the corrector: :meth:`corrector_coefficients`)."""
        return self._plan[index][0]

    def corrector_coefficients(self, index: int) -> CorrectorCoefficients | None:
        return self._plan[index][1]

    def use_device_schedule(self, device) -> None:
        raise NotImplementedError("use_device_schedule: the fused UniPC step runs in host mode (its state, two x0 "
                                  "and the last sample, changes buffers every step)")

    # -- the step --------------------------------------------------------------------------

    def step(self, model_output, sample: Tensor, *, guidance_scale: float | None = None,
             guidance_rescale: float = 0.0, noise: Tensor | None = None, timestep=None,
             out: Tensor | None = None, x0_out: Tensor | None = None, backend: str | None = None) -> Tensor:
        """Guidance, the corrector of the previous step and this step's predictor in one
        pass; returns the new sample (in sample's dtype; ``out`` may be ``sample``)."""
        if noise is not None:
            raise ValueError("noise: UniPCStepper adds no noise")
        self._check_not_finished()
        self._check_timestep(timestep)
        if not isinstance(sample, Tensor):
            raise TypeError(f"sample: expected a Tensor, got {type(sample).__name__}")
        index = self.step_index
        coef, corrector = self._plan[index]
        model_dtype = (model_output[0] if isinstance(model_output, (tuple, list)) else model_output).dtype
        x0 = torch.empty(sample.shape, dtype=unipc_x0_dtype(self.prediction_type, sample.dtype, model_dtype),
                         device=sample.device)
        older, previous = self.x0_history
        if index > self._start and (previous is None or previous.shape != sample.shape):
            raise ValueError(f"sample: shape {tuple(sample.shape)} changed mid-schedule (the solver state is "
                             f"{tuple(previous.shape) if previous is not None else None}); call reset()")
        corrected = last = None
        if corrector is not None:
            last = self.last_sample
            corrected = torch.empty(sample.shape, dtype=last.dtype, device=sample.device)
        elif out is not None and out.untyped_storage().data_ptr() == sample.untyped_storage().data_ptr():
            corrected = sample.clone()  # the next corrector starts from this sample: keep it
        uses_previous = corrector is not None or coef.c1 != 0.0
        prev = guided_step(sample, model_output, coef, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                           prev_x0=previous if uses_previous else None, x0_out=x0, out=out,
                           out_dtype=out.dtype if out is not None else (last if last is not None else sample).dtype,
                           corrector=corrector, last_sample=last,
                           older_x0=older if corrector is not None and corrector.k1 != 0.0 else None,
                           corrected_out=corrected if corrector is not None else None, backend=backend)
        if x0_out is not None:
            x0_out.copy_(x0)
        self.x0_history = [previous, x0]
        self.last_sample = corrected if corrected is not None else sample
        self.step_index += 1
        return prev
