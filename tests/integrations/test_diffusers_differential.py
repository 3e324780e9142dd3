"""Patched against unpatched, on the same instance, the way diffusers' own model tests use
models: gradients, load_state_dict(assign=True), a meta-device build then to_empty,
copy.deepcopy, and dtype moves after patching, for every diffusers model family
mmfast.patch supports (UNet2DConditionModel, AutoencoderKL, SD3Transformer2DModel,
DiTTransformer2DModel, FluxTransformer2DModel, Flux2Transformer2DModel,
WanTransformer3DModel, AutoencoderKLWan); forward alone is in test_diffusers_families.py,
test_diffusers_flux.py and test_diffusers_wan*.py. Tiny random models, mmfast's torch
backends (see _torch_backends)."""

import copy

import pytest
import torch

import mmfast
from tests.integrations.diffusers_models import (dit_inputs, flux2_inputs, flux_inputs, sd3_inputs, tiny_dit,
                                                 tiny_flux, tiny_flux2, tiny_sd3, tiny_unet, unet_inputs)
from tests.integrations.wan_models import tiny_wan, tiny_wan_i2v, tiny_wan_vae, wan_inputs

pytest.importorskip("diffusers")


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2).eval()


def vae_inputs():
    return {"sample": torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1}


FAMILIES = {
    "unet2d-condition": (tiny_unet, lambda: unet_inputs(batch=2)),
    "autoencoder-kl": (tiny_vae, vae_inputs),
    "sd3-transformer": (tiny_sd3, sd3_inputs),
    "dit-transformer": (tiny_dit, dit_inputs),
    "flux-transformer": (tiny_flux, flux_inputs),
    "flux2-transformer": (tiny_flux2, flux2_inputs),
    "wan-transformer": (tiny_wan, lambda: wan_inputs(batch=2, frames=2, height=4, width=6)),
    "wan-i2v-transformer": (tiny_wan_i2v, lambda: wan_inputs(batch=1, frames=2, height=4, width=4,
                                                             text_tokens=512, image_tokens=3)),
    "wan-vae": (tiny_wan_vae, lambda: {"sample": torch.rand(1, 3, 5, 4, 4,
                                                             generator=torch.Generator().manual_seed(1))}),
}
# fp32 everywhere: patched and unpatched differ by summation order only.
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(autouse=True)
def _torch_backends():
    """mmfast's torch backends: what is checked here is how the patched modules follow the
    instance (its parameters, buffers, dtype, copies); the kernels behind them are checked
    against these backends in tests/ops and, patched, in test_diffusers_families.py."""
    with mmfast.set_backend("torch"):
        yield


def _run(model, inputs):
    return model(**inputs).sample


def _patched(model):
    handle = mmfast.patch(model)
    assert handle.replaced, "nothing was patched"
    return handle


def _perturbed_state(model, seed):
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradients_match(family):
    # The flash-attention rule: against the unpatched model in float64, the patched fp32
    # gradients' error is at most about twice the unpatched fp32 ones'. (eval(): no
    # dropout, DiT's class-label dropout included; gradients flow all the same.)
    build, make_inputs = FAMILIES[family]
    model = build()
    inputs = make_inputs()
    first = next(iter(inputs))  # the latent / image input also gets a gradient

    def grads(dtype):
        model.to(dtype).zero_grad(set_to_none=True)
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        leaf = cast[first].clone().requires_grad_()
        out = _run(model, {**cast, first: leaf})
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
        (out * weights).sum().backward()
        return {"input": leaf.grad, **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}

    exact, eager = grads(torch.float64), grads(torch.float32)
    with _patched(model):
        got = grads(torch.float32)
    assert got.keys() == exact.keys()
    for name, g in exact.items():
        err = (got[name].double() - g).abs().max().item()
        err_eager = (eager[name].double() - g).abs().max().item()
        assert err <= 2 * err_eager + 1e-6 * g.abs().max().item(), f"{name}: {err:.3e} vs eager {err_eager:.3e}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_state_dict_assign_after_patching(family):
    build, make_inputs = FAMILIES[family]
    model, inputs = build(), make_inputs()
    state = _perturbed_state(model, 3)
    handle = _patched(model)
    model.load_state_dict(state, assign=True)  # new Parameter objects replace the old ones
    with torch.no_grad():
        got = _run(model, inputs)
        handle.undo()
        want = _run(model, inputs)
        stale = _run(build(), inputs)
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(want, stale, **TOL)  # the new weights matter


@pytest.mark.parametrize("family", list(FAMILIES))
def test_meta_device_build_then_to_empty(family):
    build, make_inputs = FAMILIES[family]
    reference, inputs = build(), make_inputs()
    with torch.device("meta"):
        model = build()
    handle = _patched(model)
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    for name, buffer in reference.named_buffers():  # non-persistent ones (DiT's pos_embed) are not in it
        model.get_buffer(name).copy_(buffer)
    with torch.no_grad():
        got = _run(model, inputs)
        handle.undo()
        want = _run(model, inputs)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_deepcopy_of_a_patched_model(family):
    build, make_inputs = FAMILIES[family]
    model, inputs = build(), make_inputs()
    with torch.no_grad():
        want = _run(model, inputs)
        handle = _patched(model)
        duplicate = copy.deepcopy(model)
        torch.testing.assert_close(_run(duplicate, inputs), want, **TOL)
        # The copy reads its own weights, not the original's.
        duplicate.load_state_dict(_perturbed_state(duplicate, 4))
        changed = _run(duplicate, inputs)
        torch.testing.assert_close(_run(model, inputs), want, **TOL)
        assert not torch.allclose(changed, want, **TOL)
        # The copy's handle undoes the copy; the original stays patched.
        duplicate._mmfast_patch_handle.undo()
        assert not any("forward" in vars(m) for m in duplicate.modules())
        assert any("forward" in vars(m) for m in model.modules())
        torch.testing.assert_close(_run(duplicate, inputs), changed, **TOL)
        handle.undo()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dtype_move_after_patching(family):
    # float64 after patching: the patched modules follow the move (float64 takes the torch
    # backends), and match the unpatched float64 model closely.
    build, make_inputs = FAMILIES[family]
    model = build()
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in make_inputs().items()}
    handle = _patched(model)
    model.double()
    with torch.no_grad():
        got = _run(model, inputs)
        handle.undo()
        want = _run(model, inputs)
    assert got.dtype == torch.float64
    # Not 1e-9 as for the models alone: diffusers keeps the scheduler's sigmas in float32
    # and takes their difference in float32; the fused step takes it in float64.
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


# ---- pipelines: a few denoising steps, patched against unpatched, same seed ----------------


def _sd_pipeline(scheduler):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(unet=tiny_unet(), vae=tiny_vae(), text_encoder=None, tokenizer=None,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _sd3_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        shift_factor=0.1, scaling_factor=1.5).eval()
    return StableDiffusion3Pipeline(transformer=tiny_sd3(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)


def _sd_scheduler(name):
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    sd15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return {"euler": lambda: EulerDiscreteScheduler(**sd15),
            # "DPM++ 2M Karras" with a sigma_min final sigma: the repeated final sigma of item 6
            "dpm++2m-karras": lambda: DPMSolverMultistepScheduler(**sd15, use_karras_sigmas=True,
                                                                 final_sigmas_type="sigma_min",
                                                                 lower_order_final=False)}[name]()


@pytest.mark.parametrize("scheduler", ["euler", "dpm++2m-karras"])  # DDIM: test_diffusers_families
def test_stable_diffusion_pipeline_patched_generates_the_same_image(scheduler):
    pipe = _sd_pipeline(_sd_scheduler(scheduler))
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    embeds, negative = torch.randn(1, 7, 24, generator=gen), torch.randn(1, 7, 24, generator=gen)

    def generate():
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, height=16, width=16,
                    num_inference_steps=3, guidance_scale=5.0, guidance_rescale=0.5, output_type="pt",
                    generator=torch.Generator().manual_seed(5)).images

    want = generate()
    with mmfast.patch(pipe) as handle:
        names = [name for name, _ in handle.replaced]
        assert type(pipe.scheduler).__name__ in names and "decoder.mid_block.attentions.0" in names
        got = generate()
    torch.testing.assert_close(got, want, **TOL)


def test_stable_diffusion_3_pipeline_patched_generates_the_same_image():
    pipe = _sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    embeds = dict(prompt_embeds=torch.randn(1, 7, 24, generator=gen),
                  negative_prompt_embeds=torch.randn(1, 7, 24, generator=gen),
                  pooled_prompt_embeds=torch.randn(1, 16, generator=gen),
                  negative_pooled_prompt_embeds=torch.randn(1, 16, generator=gen))

    def generate():
        return pipe(**embeds, height=16, width=16, num_inference_steps=3, guidance_scale=4.0, output_type="pt",
                    generator=torch.Generator().manual_seed(5)).images

    want = generate()
    with mmfast.patch(pipe) as handle:
        names = [name for name, _ in handle.replaced]
        assert "FlowMatchEulerDiscreteScheduler" in names and "transformer_blocks.0" in names
        got = generate()
    torch.testing.assert_close(got, want, **TOL)


def test_stable_diffusion_3_pipeline_moved_to_float64_after_patching():
    pipe = _sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    embeds = dict(prompt_embeds=torch.randn(1, 7, 24, generator=gen, dtype=torch.float64),
                  pooled_prompt_embeds=torch.randn(1, 16, generator=gen, dtype=torch.float64))

    def generate():
        return pipe(**embeds, height=16, width=16, num_inference_steps=2, guidance_scale=1.0, output_type="pt",
                    generator=torch.Generator().manual_seed(5)).images

    handle = mmfast.patch(pipe)
    pipe.to(torch.float64)
    got = generate()
    handle.undo()
    want = generate()
    assert got.dtype == torch.float64
    # Not 1e-9 as for the models alone: diffusers keeps the scheduler's sigmas in float32
    # and takes their difference in float32; the fused step takes it in float64.
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
