"""What every fused stepper shares: a schedule of per-step coefficients, the step counter,
guidance, and the device-side mode for CUDA-graph capture.

A stepper owns no diffusers object: it is built from the schedule's numbers (timesteps,
sigmas or alphas_cumprod, as float lists) and computes each step's coefficients on the
host in float64. ``mmfast.integrations.diffusers.schedulers.fused_stepper(scheduler)``
builds the stepper matching a diffusers scheduler after its ``set_timesteps``.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Sequence

import torch
from torch import Tensor

from mmfast.ops.scheduler_step import StepCoefficients, StepTable, guided_step


class FusedStepper:
    """Base class: ``step`` runs guidance and the update of step ``step_index`` in one pass.

    Host mode (default): coefficients are kernel arguments, ``step_index`` advances on the
    host. Device mode (:meth:`use_device_schedule`): coefficients come from a table on the
    device indexed by a device counter that the kernel advances, so
    ``scale_model_input -> denoiser -> step`` can be captured in a CUDA graph and replayed
    once per step; :meth:`device_timestep` gives the current timestep on the device.
    """

    #: whether the step carries the previous x0 (DPM-Solver multistep)
    keeps_x0 = False
    #: what the initial noise is multiplied by (Euler overrides it)
    init_noise_sigma = 1.0

    def __init__(self, timesteps: Sequence[float]):
        self.timesteps = [float(t) for t in timesteps]
        if not self.timesteps:
            raise ValueError("timesteps: the schedule is empty (call set_timesteps first?)")
        self.step_index = 0
        self._start = 0
        self._table: StepTable | None = None
        self._device_timesteps: Tensor | None = None
        self._device_input_divisors: Tensor | None = None
        self._x0_state: Tensor | None = None

    # -- per-scheduler parts -----------------------------------------------------------

    def coefficients(self, index: int) -> StepCoefficients:
        """The update of step ``index`` of the schedule (float64 math, on the host)."""
        raise NotImplementedError

    @property
    def adds_noise(self) -> bool:
        """Whether each step needs a ``noise`` tensor (DDIM eta > 0, stochastic samplers)."""
        return False

    def input_divisor(self, index: int) -> float:
        """What the denoiser input is divided by at step ``index`` (1 unless Euler)."""
        return 1.0

    # -- schedule and state --------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def timestep(self) -> float:
        """The timestep of the next step (host mode)."""
        self._check_not_finished()
        return self.timesteps[self.step_index]

    def reset(self, start: int = 0) -> None:
        """Start the schedule again at step ``start`` (img2img starts part-way). In device
        mode the table, counter and state are rewritten in place, so a captured graph
        replays the new run."""
        if not 0 <= start < len(self):
            raise ValueError(f"start: expected 0 <= start < {len(self)}, got {start}")
        self.step_index = self._start = start
        if self._x0_state is not None:
            self._x0_state.zero_()
        if self._table is not None:
            # In place: a captured CUDA graph keeps pointing at these tensors.
            fresh = self._build_table(self._table.table.device)
            self._table.table.copy_(fresh.table)
            self._table.counter.copy_(fresh.counter)

    def use_device_schedule(self, device) -> None:
        """Switch to device mode (from the current step on); see the class docstring."""
        device = torch.device(device)
        self._table = self._build_table(device)
        self._device_timesteps = torch.tensor(self.timesteps + [math.nan], dtype=torch.float32, device=device)
        divisors = [self.input_divisor(i) for i in range(len(self))]
        self._device_input_divisors = (None if all(d == 1.0 for d in divisors) else
                                       torch.tensor(divisors + [math.nan], dtype=torch.float32, device=device))

    def _build_table(self, device) -> StepTable:
        table = StepTable.build([self.coefficients(i) for i in range(len(self))], device)
        table.reset(self.step_index)
        return table

    def _device_index(self) -> Tensor:
        return self._table.counter[:1].long().clamp(max=len(self))

    def device_timestep(self) -> Tensor:
        """The timestep of the next step as a float32 [1] tensor on the device (no sync)."""
        if self._table is None:
            raise RuntimeError("device_timestep: call use_device_schedule(device) first")
        return self._device_timesteps.index_select(0, self._device_index())

    def scale_model_input(self, sample: Tensor) -> Tensor:
        """The denoiser's input for the next step (diffusers' ``scale_model_input``)."""
        if self._table is not None:
            if self._device_input_divisors is None:  # every divisor is 1
                return sample
            divisor = self._device_input_divisors.index_select(0, self._device_index())
            # A 0-d float32 divisor: the result keeps sample's dtype, computed as diffusers does.
            return sample / divisor[0]
        self._check_not_finished()
        divisor = self.input_divisor(self.step_index)
        return sample if divisor == 1.0 else sample / divisor

    def _check_not_finished(self) -> None:
        if self.step_index >= len(self):
            raise IndexError(f"step: all {len(self)} steps of the schedule were taken; call reset()")

    def _check_timestep(self, timestep) -> None:
        """A given timestep must be the schedule's at ``step_index`` (a tensor syncs)."""
        if timestep is None:
            return
        value = timestep.item() if isinstance(timestep, Tensor) else timestep
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"timestep: expected a number or a 1-element tensor, got {type(timestep).__name__}")
        expected = self.timesteps[self.step_index]
        if value != expected:
            where = (f"step {self.timesteps.index(value)}" if value in self.timesteps
                     else "not in the schedule")
            raise ValueError(f"timestep: {value} is {where}, but the next step is {self.step_index} "
                             f"(timestep {expected}); the schedule is {self.timesteps}")

    # -- the step --------------------------------------------------------------------------

    def step(self, model_output, sample: Tensor, *, guidance_scale: float | None = None,
             guidance_rescale: float = 0.0, noise: Tensor | None = None, timestep=None,
             out: Tensor | None = None, x0_out: Tensor | None = None, backend: str | None = None) -> Tensor:
        """Guidance (when ``guidance_scale`` is given; ``model_output`` is then [2B, ...],
        uncond first, or an (uncond, cond) pair) and the update; returns the new sample.

        ``timestep``, when given, is checked against the schedule in host mode (a tensor is
        read back: one sync); device mode does not check it (that would sync). ``out`` may
        be ``sample`` (in place); ``x0_out`` receives the predicted clean sample.
        """
        if noise is None and self.adds_noise:
            raise ValueError(f"noise: {type(self).__name__} with this configuration adds noise each step; "
                             "pass noise=torch.randn_like(sample)")
        if noise is not None and not self.adds_noise:
            raise ValueError(f"noise: {type(self).__name__} with this configuration adds no noise")
        if self._table is not None:
            coefficients = self._table
        else:
            self._check_not_finished()
            self._check_timestep(timestep)
            coefficients = self.coefficients(self.step_index)
        state = self._state_for(model_output, sample) if self.keeps_x0 else None
        prev = guided_step(sample, model_output, coefficients, guidance_scale=guidance_scale,
                           guidance_rescale=guidance_rescale, prev_x0=state, noise=noise,
                           x0_out=state if state is not None else x0_out, out=out, backend=backend)
        if state is not None and x0_out is not None:
            x0_out.copy_(state)
        self.step_index += 1
        return prev

    def _state_for(self, model_output, sample: Tensor) -> Tensor:
        """The previous-x0 buffer (zeros before the first step; kept in the model's dtype)."""
        dtype = (model_output[0] if isinstance(model_output, (tuple, list)) else model_output).dtype
        state = self._x0_state
        if state is None or state.shape != sample.shape or state.dtype != dtype or state.device != sample.device:
            if state is not None and self.step_index != self._start:
                raise ValueError(f"sample: shape {tuple(sample.shape)} / dtype {dtype} changed mid-schedule "
                                 f"(the solver state is {tuple(state.shape)} {state.dtype}); call reset()")
            state = self._x0_state = torch.zeros(sample.shape, dtype=dtype, device=sample.device)
        return state
