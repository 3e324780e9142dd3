"""diffusers schedulers with the fused step: DDIMScheduler, EulerDiscreteScheduler,
DPMSolverMultistepScheduler (orders 1-2, dpmsolver++ / sde-dpmsolver++),
FlowMatchEulerDiscreteScheduler and UniPCMultistepScheduler (orders 1-2, bh1 / bh2,
predict_x0: what Wan 2.1 / 2.2 pipelines run, the previous step's corrector and this
step's predictor in one pass).

Three ways in:

* ``patch_scheduler(scheduler, handle)`` (or ``mmfast.patch(scheduler)``) gives this
  instance a fused ``step`` with diffusers' signature, return type and state updates
  (``step_index``, ``model_outputs``, ``lower_order_nums``; UniPC's ``timestep_list``,
  ``last_sample``, ``this_order`` too), so an existing pipeline loop
  runs the fused update; ``handle.undo()`` restores the original. Configurations the
  fused step does not cover (thresholding, Euler churn, third order, per-token timesteps,
  learned variances, DDIM's epsilon prediction where alphas_cumprod is 0, UniPC with
  ``predict_x0=False`` or a ``solver_p``, and UniPC steps diffusers makes non-finite: a
  "bh1" step to a zero sigma, a second-order step to it without ``lower_order_final``)
  fall back to the original ``step`` for that call; schedulers of other classes are left untouched.
  Samples and outputs may have any strides. One deliberate difference: a DPM-Solver++
  "heun" step between two equal sigmas (Karras / Lu sigmas with
  ``final_sigmas_type="sigma_min"`` end on one) is the identity, the limit of the step,
  where diffusers computes 0/0 and returns NaN (its "midpoint" gives the identity too).
  A stock pipeline computes guidance itself before calling ``step``, so this fuses the
  update but not the guidance.
* ``guided_scheduler_step(scheduler, noise_pred, t, latents, guidance_scale=...)``
  replaces a denoising loop's three lines (chunk, guidance (+ rescale), ``step``) with one
  fused pass; it works on patched and unpatched schedulers (any class: others get
  guidance in PyTorch and their own step) and updates the same state::

      noise_pred = unet(torch.cat([latents] * 2), t, prompt_embeds).sample
      latents = guided_scheduler_step(pipe.scheduler, noise_pred, t, latents,
                                      guidance_scale=7.5, guidance_rescale=0.7)

* ``fused_stepper(scheduler)`` builds the stand-alone mmfast stepper for the scheduler's
  current schedule (after ``set_timesteps``). Its device-side mode is what a CUDA graph
  captures: the patched diffusers ``step`` keeps its state on the host, as diffusers does,
  and cannot be replayed from a graph.

Syncs: diffusers' DDIM step reads its timestep on the host, and the other three find the
first step's index from the timestep; a timestep on the GPU costs one device->host read
there, as in diffusers. Timesteps that are not in the schedule raise ValueError (diffusers'
DPM-Solver silently takes the last step instead).
"""

from __future__ import annotations

import inspect
import types
from typing import Any, Callable

import torch
from torch import Tensor

from mmfast.integrations.patching import Family, PatchHandle
from mmfast.ops.scheduler_step import guided_model_output, guided_step
from mmfast.schedulers import (DDIMStepper, DPMSolverPP2MStepper, EulerDiscreteStepper, FlowMatchEulerStepper,
                               FusedStepper, ddim_coefficients, dpm_solver_coefficients, euler_coefficients,
                               flow_match_coefficients)
from mmfast.schedulers.dpm_solver import ALGORITHMS
from mmfast.schedulers.unipc import SOLVER_TYPES, NotFusable, UniPCStepper, unipc_coefficients, unipc_x0_dtype

SUPPORTED = ("DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
             "FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler")


def _kind(scheduler: Any) -> str:
    for cls in type(scheduler).__mro__:
        if cls.__name__ in SUPPORTED:
            return cls.__name__
    raise TypeError(f"scheduler: {type(scheduler).__name__} has no fused step (supported: {', '.join(SUPPORTED)})")


def _floats(t) -> list[float]:
    return [float(v) for v in torch.as_tensor(t).double().cpu().tolist()]


def _randn(shape, generator, device, dtype) -> Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


# ---- the stand-alone stepper -----------------------------------------------------------


def fused_stepper(scheduler: Any, *, eta: float = 0.0) -> FusedStepper:
    """The mmfast stepper for ``scheduler``'s current schedule (``eta``: DDIM only)."""
    kind = _kind(scheduler)
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("scheduler: call scheduler.set_timesteps(...) before building its fused stepper")
    config = scheduler.config
    timesteps = _floats(scheduler.timesteps)
    if kind == "DDIMScheduler":
        stepper = DDIMStepper(_floats(scheduler.alphas_cumprod), [int(t) for t in timesteps],
                              final_alpha_cumprod=float(scheduler.final_alpha_cumprod),
                              prediction_type=config.prediction_type, eta=eta, clip_sample=config.clip_sample,
                              clip_sample_range=config.clip_sample_range, thresholding=config.thresholding)
    elif kind == "EulerDiscreteScheduler":
        stepper = EulerDiscreteStepper(_floats(scheduler.sigmas), timesteps, prediction_type=config.prediction_type,
                                       init_noise_sigma=float(scheduler.init_noise_sigma))
    elif kind == "DPMSolverMultistepScheduler":
        stepper = DPMSolverPP2MStepper(
            _floats(scheduler.sigmas), timesteps, prediction_type=config.prediction_type,
            algorithm_type=config.algorithm_type, solver_type=config.solver_type, solver_order=config.solver_order,
            lower_order_final=config.lower_order_final, euler_at_final=config.euler_at_final,
            use_flow_sigmas=config.use_flow_sigmas, thresholding=config.thresholding,
            variance_type=config.variance_type)
    elif kind == "UniPCMultistepScheduler":
        stepper = UniPCStepper(
            _floats(scheduler.sigmas), timesteps, prediction_type=config.prediction_type,
            solver_type=config.solver_type, solver_order=config.solver_order,
            lower_order_final=config.lower_order_final, disable_corrector=scheduler.disable_corrector,
            use_flow_sigmas=config.use_flow_sigmas, predict_x0=scheduler.predict_x0,
            thresholding=config.thresholding, solver_p=scheduler.solver_p)
    else:
        stepper = FlowMatchEulerStepper(_floats(scheduler.sigmas), timesteps,
                                        stochastic_sampling=config.stochastic_sampling)
    if getattr(scheduler, "begin_index", None):
        stepper.reset(scheduler.begin_index)
    return stepper


# ---- fused steps with diffusers' semantics ------------------------------------------------
# Each takes (scheduler, original step, guidance, want_x0) and then diffusers' arguments;
# it returns diffusers' output, or None to have the caller fall back to the original step.


def _schedule_index(scheduler, timestep) -> None:
    """diffusers' _init_step_index, with a clear error for a timestep not in the schedule."""
    if scheduler.step_index is not None:
        return
    if scheduler.begin_index is None:
        value = timestep.to(scheduler.timesteps.device) if isinstance(timestep, Tensor) else timestep
        if not bool((scheduler.timesteps == value).any()):
            raise ValueError(f"timestep: {float(value)} is not in the scheduler's timesteps "
                             f"{scheduler.timesteps.tolist()}")
    scheduler._init_step_index(timestep)


def _check_index(scheduler) -> int:
    index = scheduler.step_index
    if index + 1 >= len(scheduler.sigmas):
        raise IndexError(f"step: all {len(scheduler.timesteps)} steps of the schedule were taken "
                         "(call set_timesteps again)")
    return index


def _guided(guidance) -> dict:
    """guided_step's keyword arguments for ``guidance``: None or (scale, rescale)."""
    return {} if guidance is None else {"guidance_scale": guidance[0], "guidance_rescale": guidance[1]}


def _ddim(scheduler, guidance, want_x0, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False,
          generator=None, variance_noise=None, return_dict=True):
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

    config = scheduler.config
    if scheduler.num_inference_steps is None:
        raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                         "the scheduler")
    if config.thresholding or config.prediction_type not in ("epsilon", "sample", "v_prediction"):
        return None
    t = timestep.item() if isinstance(timestep, Tensor) else timestep
    if t != int(t) or not 0 <= t < len(scheduler.alphas_cumprod):
        raise ValueError(f"timestep: expected an integer in [0, {len(scheduler.alphas_cumprod)}), got {t}")
    t = int(t)
    prev_t = t - config.num_train_timesteps // scheduler.num_inference_steps
    alpha = float(scheduler.alphas_cumprod[t])
    alpha_prev = float(scheduler.alphas_cumprod[prev_t]) if prev_t >= 0 else float(scheduler.final_alpha_cumprod)
    if alpha == 0.0 and config.prediction_type == "epsilon":
        return None  # zero terminal SNR: diffusers divides by sqrt(0) (inf / NaN), as it always has
    coef = ddim_coefficients(alpha, alpha_prev, prediction_type=config.prediction_type, eta=eta,
                             clip_sample_range=config.clip_sample_range if config.clip_sample else None,
                             use_clipped_model_output=use_clipped_model_output)
    dtype = torch.promote_types(sample.dtype, model_output.dtype)
    noise = None
    if eta > 0:
        if variance_noise is not None and generator is not None:
            raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                             "`generator` or `variance_noise` stays `None`.")
        noise = variance_noise if variance_noise is not None else _randn(
            sample.shape, generator, model_output.device, model_output.dtype)
    x0 = torch.empty_like(sample, dtype=dtype) if want_x0 else None
    prev = guided_step(sample, model_output, coef, noise=noise, x0_out=x0, out_dtype=dtype,
                       **_guided(guidance))
    return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)


def _euler(scheduler, guidance, want_x0, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0,
           s_tmax=float("inf"), s_noise=1.0, generator=None, return_dict=True):
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

    if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
        raise ValueError("timestep: pass one of `scheduler.timesteps`, not an integer index (e.g. from enumerate)")
    _schedule_index(scheduler, timestep)
    index = _check_index(scheduler)
    sigma = float(scheduler.sigmas[index])
    if s_churn > 0 and s_tmin <= sigma <= s_tmax:
        return None
    prediction = scheduler.config.prediction_type
    coef = euler_coefficients(sigma, float(scheduler.sigmas[index + 1]), prediction)
    dtype = model_output.dtype
    x0_dtype = dtype if prediction in ("sample", "original_sample") else torch.promote_types(torch.float32, dtype)
    x0 = torch.empty_like(sample, dtype=x0_dtype) if want_x0 else None
    prev = guided_step(sample, model_output, coef, x0_out=x0, out_dtype=dtype, **_guided(guidance))
    scheduler._step_index += 1
    return EulerDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)


def _dpm_solver(scheduler, guidance, want_x0, model_output, timestep, sample, generator=None, variance_noise=None,
                return_dict=True):
    from diffusers.schedulers.scheduling_utils import SchedulerOutput

    config = scheduler.config
    if scheduler.num_inference_steps is None:
        raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                         "the scheduler")
    if (config.solver_order > 2 or config.algorithm_type not in ALGORITHMS or config.thresholding
            or config.variance_type is not None or config.solver_type not in ("midpoint", "heun")):
        return None
    _schedule_index(scheduler, timestep)
    index = _check_index(scheduler)
    n = len(scheduler.timesteps)
    lower_order_final = index == n - 1 and (config.euler_at_final or (config.lower_order_final and n < 15)
                                            or config.final_sigmas_type == "zero")
    first_order = config.solver_order == 1 or scheduler.lower_order_nums < 1 or lower_order_final
    sigmas = scheduler.sigmas
    coef = dpm_solver_coefficients(
        None if first_order else float(sigmas[index - 1]), float(sigmas[index]), float(sigmas[index + 1]),
        prediction_type=config.prediction_type, algorithm_type=config.algorithm_type,
        solver_type=config.solver_type, flow_sigmas=config.use_flow_sigmas)
    noise = None
    if config.algorithm_type == "sde-dpmsolver++":
        noise = (variance_noise.to(device=sample.device, dtype=torch.float32) if variance_noise is not None
                 else _randn(sample.shape, generator, sample.device, torch.float32))
    dtype = model_output.dtype
    x0 = torch.empty_like(sample, dtype=dtype)
    prev = guided_step(sample, model_output, coef, prev_x0=None if first_order else scheduler.model_outputs[-1],
                       noise=noise, x0_out=x0, out_dtype=dtype, **_guided(guidance))
    for i in range(config.solver_order - 1):
        scheduler.model_outputs[i] = scheduler.model_outputs[i + 1]
    scheduler.model_outputs[-1] = x0
    if scheduler.lower_order_nums < config.solver_order:
        scheduler.lower_order_nums += 1
    scheduler._step_index += 1
    return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


def _flow_match(scheduler, guidance, want_x0, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0,
                s_tmax=float("inf"), s_noise=1.0, generator=None, per_token_timesteps=None, return_dict=True):
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

    if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
        raise ValueError("timestep: pass one of `scheduler.timesteps`, not an integer index (e.g. from enumerate)")
    if per_token_timesteps is not None:
        return None
    _schedule_index(scheduler, timestep)
    index = _check_index(scheduler)
    stochastic = scheduler.config.stochastic_sampling
    coef = flow_match_coefficients(float(scheduler.sigmas[index]), float(scheduler.sigmas[index + 1]), stochastic)
    noise = _randn(sample.shape, generator, sample.device, torch.float32) if stochastic else None
    prev = guided_step(sample, model_output, coef, noise=noise, out_dtype=model_output.dtype,
                       **_guided(guidance))
    scheduler._step_index += 1
    return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)


def _unipc(scheduler, guidance, want_x0, model_output, timestep, sample, return_dict=True):
    from diffusers.schedulers.scheduling_utils import SchedulerOutput

    config = scheduler.config
    if scheduler.num_inference_steps is None:
        raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                         "the scheduler")
    if (config.solver_order > 2 or not scheduler.predict_x0 or scheduler.solver_p or config.thresholding
            or config.solver_type not in SOLVER_TYPES or not isinstance(sample, Tensor)):
        return None
    _schedule_index(scheduler, timestep)
    index = _check_index(scheduler)
    history, last = scheduler.model_outputs, scheduler.last_sample
    # diffusers' orders: the corrector at the previous predictor's, this predictor capped
    # by the steps taken (lower_order_nums) and, with lower_order_final, the steps left.
    corrector_order = (scheduler.this_order if index > 0 and index - 1 not in scheduler.disable_corrector
                       and last is not None else 0)
    order = config.solver_order
    if config.lower_order_final:
        order = min(order, len(scheduler.timesteps) - index)
    order = min(order, scheduler.lower_order_nums + 1)
    if ((corrector_order or order == 2) and history[-1] is None) or (corrector_order == 2 and history[-2] is None):
        return None  # state another caller left inconsistent: diffusers' step reports it
    sigmas = scheduler.sigmas
    window = {i: float(sigmas[i]) for i in range(max(index - 2, 0), index + 2)}  # the sigmas the step reads
    try:
        coef, corrector = unipc_coefficients(
            _Window(window), index, predictor_order=order, corrector_order=corrector_order,
            prediction_type=config.prediction_type, solver_type=config.solver_type,
            flow_sigmas=config.use_flow_sigmas)
    except NotFusable:
        return None  # diffusers' result is NaN / inf here: leave it to diffusers
    model_dtype = (model_output[0] if isinstance(model_output, (tuple, list)) else model_output).dtype
    x0 = torch.empty_like(sample, dtype=unipc_x0_dtype(config.prediction_type, sample.dtype, model_dtype))
    corrected = torch.empty_like(sample, dtype=last.dtype) if corrector is not None else None
    prev = guided_step(sample, model_output, coef, prev_x0=history[-1] if corrector or order == 2 else None,
                       x0_out=x0, out_dtype=(last if corrector is not None else sample).dtype, corrector=corrector,
                       last_sample=last if corrector is not None else None,
                       older_x0=history[-2] if corrector is not None and corrector.k1 != 0.0 else None,
                       corrected_out=corrected, **_guided(guidance))
    for i in range(config.solver_order - 1):
        history[i] = history[i + 1]
        scheduler.timestep_list[i] = scheduler.timestep_list[i + 1]
    history[-1] = x0
    scheduler.timestep_list[-1] = timestep
    scheduler.this_order = order
    scheduler.last_sample = corrected if corrector is not None else sample
    if scheduler.lower_order_nums < config.solver_order:
        scheduler.lower_order_nums += 1
    scheduler._step_index += 1
    return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


class _Window:
    """The few sigmas a UniPC step reads, indexable like the whole schedule (no per-step
    conversion of all of them)."""

    def __init__(self, values: dict[int, float]):
        self._values = values
        self._length = max(values) + 1

    def __getitem__(self, i: int) -> float:
        return self._values[i]

    def __len__(self) -> int:
        return self._length


_FUSED: dict[str, Callable] = {
    "DDIMScheduler": _ddim,
    "EulerDiscreteScheduler": _euler,
    "DPMSolverMultistepScheduler": _dpm_solver,
    "FlowMatchEulerDiscreteScheduler": _flow_match,
    "UniPCMultistepScheduler": _unipc,
}


# ---- patching --------------------------------------------------------------------------


def _fused_step_method(kind: str, original: Callable, want_x0: bool) -> Callable:
    """A ``step`` with the original's signature (pipelines inspect it for eta / generator).
    ``original``: the class's ``step`` function, called on whichever instance the method is
    bound to (a deep copy of a patched scheduler falls back on itself, not on the original)."""
    fused = _FUSED[kind]

    def step(self, *args, **kwargs):
        result = fused(self, None, want_x0, *args, **kwargs)
        return original(self, *args, **kwargs) if result is None else result

    step.__signature__ = inspect.signature(original)  # with self: bound below
    step.__doc__ = f"mmfast fused step (falls back to diffusers' for unsupported options).\n\n{original.__doc__ or ''}"
    return step


def patch_scheduler(scheduler: Any, handle: PatchHandle, *, pred_original_sample: bool = True) -> bool:
    """Give this ``scheduler`` instance the fused ``step`` (reversible through ``handle``);
    returns whether it did. A scheduler of another class is left as it is (False), so a
    pipeline family can call this for whatever scheduler the pipeline holds.

    ``pred_original_sample=False`` skips writing x0 for DDIM and Euler (one write fewer;
    their outputs then carry ``pred_original_sample=None``); pipelines use ``prev_sample``
    only.
    """
    try:
        kind = _kind(scheduler)
    except TypeError:
        return False
    if "step" in vars(scheduler):
        raise ValueError("scheduler: its step is already replaced on this instance (patched twice?)")
    fused = _fused_step_method(kind, type(scheduler).step, pred_original_sample)
    handle.set_attr(scheduler, "step", types.MethodType(fused, scheduler))
    handle.replaced.append((type(scheduler).__name__, "fused scheduler step"))
    return True


def guided_scheduler_step(scheduler: Any, model_output, timestep, sample: Tensor, *, guidance_scale: float,
                          guidance_rescale: float = 0.0, **step_kwargs):
    """Guidance and ``scheduler.step`` in one fused pass; returns what ``step`` returns
    (``return_dict=False`` in ``step_kwargs`` gives the tuple). ``model_output``: [2B, ...]
    with the unconditional half first, or an (uncond, cond) pair. Any other scheduler
    class, or an option the fused step does not cover, gets guidance in PyTorch and the
    scheduler's own ``step``."""
    kind = next((c.__name__ for c in type(scheduler).__mro__ if c.__name__ in SUPPORTED), None)
    if kind is not None:
        want_x0 = kind in ("DDIMScheduler", "EulerDiscreteScheduler")
        result = _FUSED[kind](scheduler, (guidance_scale, guidance_rescale), want_x0, model_output, timestep,
                              sample, **step_kwargs)
        if result is not None:
            return result
    if isinstance(model_output, (tuple, list)):
        uncond, cond = model_output
    else:
        if model_output.shape[0] % 2:
            raise ValueError(f"model_output: guidance needs an even batch (uncond then cond halves), "
                             f"got {model_output.shape[0]}")
        uncond, cond = model_output.chunk(2)
    guided = guided_model_output(uncond, cond, guidance_scale, guidance_rescale, torch.float32).to(uncond.dtype)
    original = type(scheduler).step.__get__(scheduler)  # the class's step, even when patched
    return original(guided, timestep, sample, **step_kwargs)


def _prepare(scheduler: Any, handle: PatchHandle):
    patch_scheduler(scheduler, handle)
    return None  # no module tree to walk


FAMILY = Family(
    "diffusers-scheduler",
    model_classes=SUPPORTED,
    prepare=_prepare,
    notes="the scheduler's step, fused (mmfast.ops.guided_step)",
)

__all__ = ["FAMILY", "SUPPORTED", "fused_stepper", "guided_scheduler_step", "patch_scheduler"]
