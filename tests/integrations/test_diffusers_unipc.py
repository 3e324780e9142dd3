"""UniPC, what Wan 2.1 / 2.2 pipelines sample with (their scheduler_config.json:
flow_prediction, use_flow_sigmas, flow_shift 3.0 at 480p / 5.0 at 720p, solver_order 2,
bh2, predict_x0, lower_order_final, final sigma zero), fused with guidance, against
diffusers' UniPCMultistepScheduler: the stand-alone stepper over short schedules (the
lower-order edge cases) with and without guidance on the Triton kernel (the interpreter
on a CPU), img2img starts, disabled correctors and in-place steps; the patched
scheduler's state when patched and unpatched steps mix, after set_timesteps again and
with ``step`` called by hand; a patched tiny WanPipeline; bad input.

The 20 / 50-step trajectories (fp32 and fp16) are in test_diffusers_schedulers.py
(configurations "unipc-wan-*"), the configuration grid in test_diffusers_scheduler_grid.py.
"""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import mmfast  # noqa: E402
from mmfast.integrations.diffusers.schedulers import (fused_stepper, guided_scheduler_step,  # noqa: E402
                                                      patch_scheduler)
from mmfast.integrations.patching import PatchHandle  # noqa: E402
from mmfast.schedulers import UniPCStepper  # noqa: E402
from tests.integrations.wan_models import TEXT_DIM, tiny_wan  # noqa: E402

WAN = dict(prediction_type="flow_prediction", use_flow_sigmas=True, solver_order=2, solver_type="bh2",
           predict_x0=True, lower_order_final=True, final_sigmas_type="zero", disable_corrector=[])
SHAPE = (2, 4, 3, 5)


def _wan(flow_shift=3.0, steps=None, **overrides):
    scheduler = diffusers.UniPCMultistepScheduler(**{**WAN, "flow_shift": flow_shift, **overrides})
    if steps is not None:
        scheduler.set_timesteps(steps)
    return scheduler


def _outputs(steps, seed, batch=SHAPE[0]):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((batch, *SHAPE[1:]), generator=gen) for _ in range(steps)]


def _guide(mo, scale):
    uncond, cond = mo.chunk(2)
    return uncond + scale * (cond - uncond)


def _close(got, want, what):
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("flow_shift", [3.0, 5.0])
@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
def test_short_schedules_step_for_step(flow_shift, guided):
    # 1 step: one first-order predictor to sigma 0. 2: the corrector at order 1, both
    # predictors first order (lower_order_final). 3: a second-order predictor between,
    # the last corrector at order 2. 6: second order throughout the middle.
    for steps in (1, 2, 3, 6):
        reference = _wan(flow_shift, steps)
        stepper = fused_stepper(_wan(flow_shift, steps))
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
        y = x.clone()
        for i, (t, mo) in enumerate(zip(reference.timesteps, _outputs(steps, steps, 2 * SHAPE[0] if guided else 1))):
            if not guided:
                mo = mo.expand(SHAPE).contiguous()
            x = reference.step(_guide(mo, 4.5) if guided else mo, t, x).prev_sample
            y = stepper.step(mo, y, guidance_scale=4.5 if guided else None, timestep=t, backend="triton")
            _close(y, x, f"step {i} of {steps}")
            # diffusers' orders: its predictor's this_order, our plan's
            assert stepper.orders(i, 0)[0] == reference.this_order
        assert [stepper.orders(i, 0) for i in range(steps)] == \
            {1: [(1, 0)], 2: [(1, 0), (1, 1)], 3: [(1, 0), (2, 1), (1, 2)],
             6: [(1, 0), (2, 1), (2, 2), (2, 2), (2, 2), (1, 2)]}[steps]


def test_stepper_img2img_start_disabled_corrector_and_in_place():
    # begin_index 2 of 8 (img2img), the corrector skipped after steps 2 and 4, every
    # step in place (out=sample: the next corrector's input is kept aside).
    reference = _wan(5.0, 8, disable_corrector=[2, 4])
    reference.set_begin_index(2)
    stepper = fused_stepper(_wan(5.0, 8, disable_corrector=[2, 4]))
    stepper.reset(2)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    for i, (t, mo) in enumerate(zip(reference.timesteps[2:], _outputs(6, 1, 2 * SHAPE[0])), start=2):
        x = reference.step(_guide(mo, 3.0), t, x).prev_sample
        out = stepper.step(mo, y, guidance_scale=3.0, out=y, backend="triton")
        assert out is y
        _close(y, x, f"step {i}")
        _close(stepper.last_sample, reference.last_sample, f"last_sample after step {i}")
        _close(stepper.x0_history[-1], reference.model_outputs[-1], f"x0 of step {i}")
    # corrector orders: none on the first step taken, none after steps 2 and 4
    assert [stepper.orders(i, 2)[1] for i in range(2, 8)] == [0, 0, 2, 0, 2, 2]


def test_patched_and_unpatched_steps_mix_and_set_timesteps_starts_over():
    plain, patched = _wan(3.0), _wan(3.0)
    handle = PatchHandle(patched, "test")
    assert patch_scheduler(patched, handle)
    unpatched_step = type(patched).step
    for steps in (7, 4):  # set_timesteps again: the state starts over, on both
        plain.set_timesteps(steps)
        patched.set_timesteps(steps)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
        y = x.clone()
        for i, (t, mo) in enumerate(zip(plain.timesteps, _outputs(steps, steps))):
            x = plain.step(mo, t, x, return_dict=False)[0]
            if i % 3 == 1:  # diffusers' own step on the patched instance, in the middle of a run
                y = unpatched_step(patched, mo, t, y, return_dict=False)[0]
            else:
                y = patched.step(mo, t, y, return_dict=False)[0]
            _close(y, x, f"step {i} of {steps}")
            assert (patched.step_index, patched.lower_order_nums, patched.this_order, patched.timestep_list) == \
                (plain.step_index, plain.lower_order_nums, plain.this_order, plain.timestep_list)
            _close(patched.last_sample, plain.last_sample, f"last_sample after step {i}")
            for a, b in zip(patched.model_outputs, plain.model_outputs):
                assert (a is None) == (b is None)
                if b is not None:
                    _close(a, b, f"model_outputs after step {i}")
    # Past the end of the schedule.
    with pytest.raises(IndexError, match="all 4 steps of the schedule were taken"):
        patched.step(mo, plain.timesteps[-1], y)
    handle.undo()
    assert "step" not in vars(patched)


def test_guided_scheduler_step_is_guidance_then_step():
    plain, fused = _wan(5.0, 5), _wan(5.0, 5)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    y = x.clone()
    for i, (t, mo) in enumerate(zip(plain.timesteps, _outputs(5, 3, 2 * SHAPE[0]))):
        x = plain.step(_guide(mo, 5.0), t, x).prev_sample
        y = guided_scheduler_step(fused, mo.chunk(2), t, y, guidance_scale=5.0).prev_sample
        _close(y, x, f"step {i}")


def _wan_pipeline(flow_shift):
    """The tiny WanPipeline of tiny_wan_pipeline with Wan's UniPC scheduler and no VAE (the
    test reads latents; a pipeline without one assumes Wan's 4x temporal, 8x spatial)."""
    from diffusers import WanPipeline

    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tiny_wan(),
                       scheduler=_wan(flow_shift))


def test_patched_tiny_wan_pipeline_gives_the_same_latents(monkeypatch):
    # 3 steps: the corrector at orders 1 and 2, a second-order predictor between.
    from mmfast.integrations.diffusers import schedulers

    pipe = _wan_pipeline(5.0)
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 7, TEXT_DIM, generator=gen)
    negative = torch.randn(1, 7, TEXT_DIM, generator=gen)

    def generate():
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, height=32, width=32, num_frames=5,
                    num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator().manual_seed(3),
                    output_type="latent").frames

    fused_results = []
    fused = schedulers._FUSED["UniPCMultistepScheduler"]
    monkeypatch.setitem(schedulers._FUSED, "UniPCMultistepScheduler",
                        lambda *a, **k: fused_results.append(fused(*a, **k)) or fused_results[-1])
    with mmfast.set_backend("torch"):
        want = generate()
        with mmfast.patch(pipe) as handle:
            assert ("UniPCMultistepScheduler", "fused scheduler step") in handle.replaced
            got = generate()
    assert len(fused_results) == 3 and None not in fused_results  # every step fused, none left to diffusers
    assert want.shape == (1, 4, 2, 4, 4)
    # The transformer is patched too (attention: another summation order).
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bad_input_names_the_argument():
    sigmas, timesteps = [0.999, 0.8, 0.5, 0.0], [999.0, 800.0, 500.0]
    with pytest.raises(ValueError, match="solver_order: the fused UniPC step has orders 1 and 2"):
        UniPCStepper(sigmas, timesteps, solver_order=3)
    with pytest.raises(ValueError, match="solver_type: expected one of"):
        UniPCStepper(sigmas, timesteps, solver_type="midpoint")
    with pytest.raises(ValueError, match="predict_x0: the fused UniPC step is the data-prediction"):
        UniPCStepper(sigmas, timesteps, predict_x0=False)
    with pytest.raises(ValueError, match="prediction_type: expected one of"):
        UniPCStepper(sigmas, timesteps, prediction_type="x0")
    with pytest.raises(ValueError, match="sigmas: expected 4 values"):
        UniPCStepper(sigmas[:-1], timesteps)
    with pytest.raises(ValueError, match=r"sigmas: expected finite values >= 0 and < 1 \(flow sigmas\)"):
        UniPCStepper([1.0, 0.8, 0.5, 0.0], timesteps)  # log(1 - sigma) would be log(0)
    with pytest.raises(ValueError, match="thresholding: dynamic thresholding"):
        UniPCStepper(sigmas, timesteps, thresholding=True)
    # Schedules diffusers makes non-finite: refused when built, not half-way.
    with pytest.raises(ValueError, match=r"sigmas: step 2 of this schedule is not finite in diffusers .*'bh1'"):
        UniPCStepper(sigmas, timesteps, solver_type="bh1")
    with pytest.raises(ValueError, match="sigmas: step 2 .*lower_order_final=False"):
        UniPCStepper(sigmas, timesteps, lower_order_final=False)
    stepper = UniPCStepper(sigmas, timesteps)
    x = torch.randn(1, 8)
    with pytest.raises(ValueError, match="noise: UniPCStepper adds no noise"):
        stepper.step(x, x, noise=x)
    with pytest.raises(ValueError, match=r"timestep: 500.0 is step 2, but the next step is 0"):
        stepper.step(x, x, timestep=500.0)
    with pytest.raises(NotImplementedError, match="use_device_schedule: the fused UniPC step runs in host mode"):
        stepper.use_device_schedule("cpu")
    stepper.step(x, x)
    with pytest.raises(ValueError, match=r"sample: shape \(2, 8\) changed mid-schedule"):
        stepper.step(torch.randn(2, 8), torch.randn(2, 8))
    with pytest.raises(ValueError, match="start: expected 0 <= start < 3"):
        stepper.reset(3)
    scheduler = _wan(3.0, 4)
    patch_scheduler(scheduler, PatchHandle(scheduler, "test"))
    with pytest.raises(ValueError, match=r"timestep: 5\.0 is not in the scheduler's timesteps"):
        scheduler.step(x, torch.tensor(5), x)
    with pytest.raises(ValueError, match="model_output: guidance needs an even batch"):
        guided_scheduler_step(_wan(3.0, 4), torch.randn(3, 8), 999, x, guidance_scale=5.0)
    with pytest.raises(ValueError, match="Number of inference steps is 'None'"):
        guided_scheduler_step(_wan(3.0), torch.randn(2, 8), 999, x, guidance_scale=5.0)


def test_flow_schedule_without_diffusers_is_diffusers_schedule():
    from mmfast.schedulers import flow_unipc_schedule

    for flow_shift in (3.0, 5.0, 1.0):
        for steps in (1, 2, 3, 10, 30, 50, 64):
            scheduler = _wan(flow_shift, steps)
            sigmas, timesteps = flow_unipc_schedule(steps, flow_shift)
            assert sigmas == scheduler.sigmas.tolist() and timesteps == scheduler.timesteps.double().tolist()
    stepper = UniPCStepper.for_flow(4, 3.0)
    reference = fused_stepper(_wan(3.0, 4))
    assert stepper.timesteps == reference.timesteps and stepper.sigmas == reference.sigmas
    with pytest.raises(ValueError, match="num_inference_steps: expected a positive int"):
        flow_unipc_schedule(0, 3.0)
    with pytest.raises(ValueError, match="flow_shift: expected a finite number > 0"):
        flow_unipc_schedule(4, -1.0)
