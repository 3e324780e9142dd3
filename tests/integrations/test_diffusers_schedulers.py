"""Fused steppers and patched diffusers schedulers against the diffusers schedulers of the
same name and configuration, step by step over whole trajectories with random model
outputs (typical SD1.5 and SD3 configurations).

fp32: every step's latents within 1e-5 of diffusers' (relative to their largest value).
fp16: diffusers is run in fp64 (the reference) and in fp16 (eager); at every step the
fused stepper's error against the reference is at most twice eager's plus one fp16 unit.
On a CPU the 20-step trajectories run the Triton kernel under the interpreter and the
50-step ones the torch backend (the stepper logic is the same; the kernel is checked
against that backend in tests/ops/test_scheduler_step.py); on a GPU all run Triton.
"""

import copy
import inspect

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import mmfast  # noqa: E402
from mmfast import integrations  # noqa: E402
from mmfast.integrations.diffusers.schedulers import (fused_stepper, guided_scheduler_step,  # noqa: E402
                                                      patch_scheduler)
from mmfast.integrations.patching import PatchHandle  # noqa: E402

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
WAN_UNIPC = dict(prediction_type="flow_prediction", use_flow_sigmas=True, solver_order=2, solver_type="bh2",
                 predict_x0=True, lower_order_final=True, final_sigmas_type="zero")
CONFIGS = {
    "ddim": lambda: diffusers.DDIMScheduler(**SD15, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    "ddim-v-clip-trailing": lambda: diffusers.DDIMScheduler(**SD15, clip_sample=True, prediction_type="v_prediction",
                                                            timestep_spacing="trailing"),
    "euler": lambda: diffusers.EulerDiscreteScheduler(**SD15, steps_offset=1),
    "euler-v-leading": lambda: diffusers.EulerDiscreteScheduler(**SD15, steps_offset=1, prediction_type="v_prediction",
                                                                timestep_spacing="leading"),
    "dpm++2m": lambda: diffusers.DPMSolverMultistepScheduler(**SD15),
    "dpm++2m-heun-karras": lambda: diffusers.DPMSolverMultistepScheduler(**SD15, solver_type="heun",
                                                                         use_karras_sigmas=True),
    # A non-zero final sigma: the last step is second order from 15 steps on, first below.
    "dpm++2m-v-sigma-min": lambda: diffusers.DPMSolverMultistepScheduler(**SD15, prediction_type="v_prediction",
                                                                         final_sigmas_type="sigma_min"),
    "flow-sd3": lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
    # Wan 2.1 / 2.2 (their scheduler_config.json): flow_shift 3.0 at 480p, 5.0 at 720p.
    "unipc-wan-480p": lambda: diffusers.UniPCMultistepScheduler(**WAN_UNIPC, flow_shift=3.0),
    "unipc-wan-720p": lambda: diffusers.UniPCMultistepScheduler(**WAN_UNIPC, flow_shift=5.0),
}
ETA = {"ddim": 0.3}  # DDIM eta > 0, with the same noise given to both
SHAPE = (2, 4, 8, 8)


def _rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale):
    """diffusers' rescale_noise_cfg (pipelines/stable_diffusion), kept here so the test does
    not import the pipelines (and transformers)."""
    dims = list(range(1, noise_pred_text.ndim))
    std_text = noise_pred_text.std(dim=dims, keepdim=True)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def _diffusers_trajectory(scheduler, x, outputs, noises, scale, rescale, eta, input_scales=None):
    latents = []
    for t, mo, noise in zip(scheduler.timesteps, outputs, noises):
        # The pipeline's contract (Euler checks it was called); what it does to ones.
        ones = torch.ones_like(x)
        scaled = scheduler.scale_model_input(ones, t) if hasattr(scheduler, "scale_model_input") else ones
        if input_scales is not None:
            input_scales.append(scaled)
        uncond, cond = mo.chunk(2)
        guided = uncond + scale * (cond - uncond)
        if rescale:
            guided = _rescale_noise_cfg(guided, cond, rescale)
        kwargs = {"eta": eta, "variance_noise": noise} if eta else {}
        x = scheduler.step(guided, t, x, return_dict=False, **kwargs)[0]
        latents.append(x)
    return latents


def _trajectories(name, steps, dtype, rescale, backend, device):
    scale, eta = 7.5, ETA.get(name, 0.0)
    gen = torch.Generator().manual_seed(steps)
    schedulers = {}
    for which in ("ours", "eager", "reference"):
        schedulers[which] = CONFIGS[name]()
        schedulers[which].set_timesteps(steps)
    stepper = fused_stepper(schedulers["ours"], eta=eta)
    init_sigma = float(getattr(schedulers["ours"], "init_noise_sigma", 1.0))
    x = (torch.randn(SHAPE, generator=gen) * init_sigma).to(dtype)
    outputs = [torch.randn((2 * SHAPE[0], *SHAPE[1:]), generator=gen).to(dtype) for _ in range(steps)]
    noises = [torch.randn(SHAPE, generator=gen).to(dtype) if eta else None for _ in range(steps)]

    input_scales = []
    eager = _diffusers_trajectory(schedulers["eager"], x, outputs, noises, scale, rescale, eta, input_scales)
    ours, latents = [], x.to(device)
    for t, mo, noise, expected in zip(schedulers["ours"].timesteps, outputs, noises, input_scales):
        ones = torch.ones_like(latents)
        torch.testing.assert_close(stepper.scale_model_input(ones).cpu(), expected, rtol=2e-7, atol=0)
        latents = stepper.step(mo.to(device), latents, guidance_scale=scale, guidance_rescale=rescale,
                               noise=noise.to(device) if noise is not None else None, timestep=t, backend=backend)
        ours.append(latents.cpu())
    reference = _diffusers_trajectory(schedulers["reference"], x.double(), [o.double() for o in outputs],
                                      [n.double() if n is not None else None for n in noises], scale, rescale, eta)
    return ours, eager, reference


def _backend(steps, device):
    return "triton" if device.type == "cuda" or steps == 20 else "torch"


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("steps", [20, 50])
def test_trajectory_matches_diffusers(name, steps, device):
    backend = _backend(steps, device)
    # Both guidance-rescale settings in both dtypes, alternating with the step count.
    rescale_fp32, rescale_fp16 = (0.0, 0.7) if steps == 20 else (0.7, 0.0)

    ours, eager, _ = _trajectories(name, steps, torch.float32, rescale_fp32, backend, device)
    for i, (got, want) in enumerate(zip(ours, eager)):
        err = (got - want).abs().max().item()
        assert err <= 1e-5 * want.abs().max().item(), f"fp32 step {i}: {err:.3e} from diffusers"

    ours, eager, reference = _trajectories(name, steps, torch.float16, rescale_fp16, backend, device)
    for i, (got, fp16, exact) in enumerate(zip(ours, eager, reference)):
        assert got.dtype == fp16.dtype == torch.float16
        err = (got.double() - exact).abs().max().item()
        err_eager = (fp16.double() - exact).abs().max().item()
        unit = torch.finfo(torch.float16).eps * exact.abs().max().item()
        assert err <= 2 * err_eager + unit, f"fp16 step {i}: {err:.3e} vs diffusers fp16's {err_eager:.3e}"


def _loop(scheduler, steps, x, seed, guided=False, **step_kwargs):
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    outputs = []
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        mo = torch.randn((2 * x.shape[0], *x.shape[1:]), generator=gen) + 0.01 * model_input.repeat(2, 1, 1, 1)
        if guided:
            out = guided_scheduler_step(scheduler, mo, t, x, guidance_scale=5.0, guidance_rescale=0.5,
                                        **step_kwargs)
        else:
            uncond, cond = mo.chunk(2)
            noise_pred = _rescale_noise_cfg(uncond + 5.0 * (cond - uncond), cond, 0.5)
            out = scheduler.step(noise_pred, t, x, **step_kwargs)
        x = out.prev_sample
        outputs.append(out)
    return outputs


PATCH_CASES = {
    "ddim-eta": ("ddim", {"eta": 0.5}),   # noise drawn from the generator, as diffusers draws it
    "euler": ("euler", {}),
    "dpm++2m": ("dpm++2m-v-sigma-min", {}),  # 6 steps: lower_order_final makes the last first order
    "sde-dpm++2m": (None, {}),
    "flow-sd3": ("flow-sd3", {}),
    "unipc-wan": ("unipc-wan-720p", {}),  # the corrector from step 2 on, the last step first order
}


def _make(case):
    name, _ = PATCH_CASES[case]
    if name is None:
        return diffusers.DPMSolverMultistepScheduler(**SD15, algorithm_type="sde-dpmsolver++")
    return CONFIGS[name]()


@pytest.mark.parametrize("case", list(PATCH_CASES))
def test_patched_scheduler_loop_equals_unpatched_and_undo_restores(case):
    _, kwargs = PATCH_CASES[case]
    plain, patched = _make(case), _make(case)
    handle = PatchHandle(patched, "test")
    assert patch_scheduler(patched, handle) is True
    assert "step" in vars(patched) and "step" not in vars(plain)
    # Pipelines inspect the signature for eta and generator.
    assert inspect.signature(patched.step) == inspect.signature(plain.step)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    extra = dict(kwargs)
    if "generator" in inspect.signature(plain.step).parameters:
        want = _loop(plain, 6, x, 0, generator=torch.Generator().manual_seed(9), **extra)
        got = _loop(patched, 6, x, 0, generator=torch.Generator().manual_seed(9), **extra)
    else:
        want, got = _loop(plain, 6, x, 0, **extra), _loop(patched, 6, x, 0, **extra)
    for a, b in zip(want, got):
        assert type(a) is type(b)
        for key in a.keys():
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5)
    for attr in ("step_index", "lower_order_nums"):
        if hasattr(plain, attr):
            assert getattr(patched, attr) == getattr(plain, attr)
    if hasattr(plain, "model_outputs"):
        for a, b in zip(plain.model_outputs, patched.model_outputs):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    if hasattr(plain, "last_sample"):  # UniPC: the sample the next corrector starts from
        torch.testing.assert_close(patched.last_sample, plain.last_sample, rtol=1e-5, atol=1e-5)
        assert patched.this_order == plain.this_order and patched.timestep_list == plain.timestep_list

    # The guided helper (one fused pass) updates the same state as guidance + step.
    helper = _loop(_make(case), 6, x, 0, guided=True, generator=torch.Generator().manual_seed(9), **extra) \
        if "generator" in inspect.signature(plain.step).parameters else _loop(_make(case), 6, x, 0, guided=True)
    torch.testing.assert_close(helper[-1].prev_sample, want[-1].prev_sample, rtol=1e-5, atol=1e-5)

    handle.undo()
    assert "step" not in vars(patched)
    assert patched.step.__func__ is type(patched).step


def test_mmfast_patch_recognises_a_bare_scheduler(monkeypatch):
    monkeypatch.setattr(integrations, "FAMILY_MODULES",
                        {"diffusers-scheduler": "mmfast.integrations.diffusers.schedulers"})
    scheduler = CONFIGS["euler"]()
    with mmfast.patch(scheduler) as handle:
        assert handle.replaced == [("EulerDiscreteScheduler", "fused scheduler step")]
        assert "step" in vars(scheduler)
    assert "step" not in vars(scheduler) and not hasattr(scheduler, "_mmfast_patch_handle")


def test_pred_original_sample_can_be_skipped():
    plain, patched = CONFIGS["ddim"](), CONFIGS["ddim"]()
    patch_scheduler(patched, PatchHandle(patched, "test"), pred_original_sample=False)
    x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
    for s in (plain, patched):
        s.set_timesteps(4)
    got = patched.step(mo, patched.timesteps[1], x)
    want = plain.step(mo, plain.timesteps[1], x)
    assert got.pred_original_sample is None
    torch.testing.assert_close(got.prev_sample, want.prev_sample, rtol=1e-5, atol=1e-5)


def test_unsupported_options_fall_back_to_diffusers():
    plain, patched = CONFIGS["euler"](), CONFIGS["euler"]()
    patch_scheduler(patched, PatchHandle(patched, "test"))
    x = torch.randn(SHAPE)
    outs = []
    for s in (plain, patched):
        s.set_timesteps(4)
        outs.append(s.step(torch.ones(SHAPE), s.timesteps[0], x, s_churn=1.0,
                           generator=torch.Generator().manual_seed(0)).prev_sample)
    torch.testing.assert_close(outs[1], outs[0])


def test_bad_timesteps_and_batches_raise_clear_errors():
    scheduler = CONFIGS["dpm++2m"]()
    scheduler.set_timesteps(10)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match=r"timestep: 5\.0 is not in the scheduler's timesteps"):
        guided_scheduler_step(scheduler, torch.randn(4, 4, 8, 8), torch.tensor(5), x, guidance_scale=7.5)
    with pytest.raises(ValueError, match="model_output: guidance needs an even batch"):
        guided_scheduler_step(scheduler, torch.randn(3, 4, 8, 8), scheduler.timesteps[0], x, guidance_scale=7.5)
    ddim = CONFIGS["ddim"]()
    ddim.set_timesteps(10)
    with pytest.raises(ValueError, match=r"timestep: expected an integer in \[0, 1000\)"):
        guided_scheduler_step(ddim, torch.randn(4, 4, 8, 8), 1000, x, guidance_scale=7.5)
    stepper = fused_stepper(_set(CONFIGS["euler"](), 10))
    with pytest.raises(ValueError, match="timestep: 3.0 is not in the schedule"):
        stepper.step(torch.randn(4, 4, 8, 8), x, guidance_scale=7.5, timestep=3.0)
    with pytest.raises(TypeError, match="scheduler: PNDMScheduler has no fused step"):
        fused_stepper(_set(diffusers.PNDMScheduler(), 10))


def test_other_schedulers_are_left_alone_and_still_guided():
    pndm = diffusers.PNDMScheduler(**SD15, skip_prk_steps=True)
    handle = PatchHandle(pndm, "test")
    assert patch_scheduler(pndm, handle) is False and "step" not in vars(pndm) and not handle.replaced
    reference = diffusers.PNDMScheduler(**SD15, skip_prk_steps=True)
    x, mo = torch.randn(SHAPE), torch.randn(2 * SHAPE[0], *SHAPE[1:])
    for s in (pndm, reference):
        s.set_timesteps(5)
    got = guided_scheduler_step(pndm, mo, pndm.timesteps[0], x, guidance_scale=5.0).prev_sample
    uncond, cond = mo.chunk(2)
    want = reference.step(uncond + 5.0 * (cond - uncond), reference.timesteps[0], x).prev_sample
    torch.testing.assert_close(got, want)


def _set(scheduler, steps):
    scheduler.set_timesteps(steps)
    return scheduler


FALLBACKS = {  # options the fused step leaves to diffusers' own step (on schedulers with state)
    "euler-churn": (lambda: diffusers.EulerDiscreteScheduler(**SD15), {"s_churn": 1.0}),
    "dpm-order3": (lambda: diffusers.DPMSolverMultistepScheduler(**SD15, solver_order=3), {}),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_deep_copy_of_a_patched_scheduler_steps_itself(case):
    # Regression: the fused step closed over the original instance's bound step, so a deep
    # copy's fallback calls advanced the original's state.
    make, kwargs = FALLBACKS[case]
    original, reference = make(), make()
    handle = mmfast.patch(original)
    original.set_timesteps(6)
    reference.set_timesteps(6)
    duplicate = copy.deepcopy(original)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    y = x
    for i, t in enumerate(duplicate.timesteps[:4]):
        mo = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
        x = duplicate.step(mo, t, x, generator=torch.Generator().manual_seed(i), **kwargs).prev_sample
        y = reference.step(mo, t, y, generator=torch.Generator().manual_seed(i), **kwargs).prev_sample
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert duplicate.step_index == reference.step_index == 4
    assert original.step_index is None  # the original was not advanced
    # The copy's handle undoes the copy; the original stays patched until its own undo.
    assert duplicate._mmfast_patch_handle is not handle
    duplicate._mmfast_patch_handle.undo()
    assert "step" not in vars(duplicate) and "_mmfast_patch_handle" not in vars(duplicate)
    assert "step" in vars(original)
    handle.undo()
    assert "step" not in vars(original)
