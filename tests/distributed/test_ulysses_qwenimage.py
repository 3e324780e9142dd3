"""Ulysses sequence parallelism for diffusers QwenImageTransformer2DModel on CPU with gloo,
against the single-process result.

One start of 2 processes (tests/distributed/launcher.py) runs:
a tiny Qwen-Image transformer patched with ``sequence_parallel=group`` against the
unpatched model (output, the gradients of parameters and of the input summed over the
group), with token counts the world size does not divide (both streams padded) and a
ControlNet residual, and with zero_cond_t's per-token modulation; a QwenImagePipeline
with true CFG generating the unpatched pipeline's latents; and the refusals (a text mask,
a head count the world size does not divide). fp32, mmfast's torch backends, tiny shapes."""

import warnings

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launcher import run_ranks

CLOSE = dict(rtol=1e-5, atol=1e-5)  # fp32, the same math summed in another order
WORLD = 2


def _tiny_qwenimage(heads=2, **config):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                       attention_head_dim=8, num_attention_heads=heads, joint_attention_dim=12,
                                       axes_dims_rope=(2, 2, 4), **config).eval()


def _inputs(controlnet=True):
    gen = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(2, 9, 16, generator=gen),  # 3 x 3 image tokens: padded on 2 ranks
              "encoder_hidden_states": torch.randn(2, 5, 12, generator=gen),  # 5 text tokens: padded too
              "timestep": torch.tensor([0.3, 0.9]), "img_shapes": [(1, 3, 3)] * 2}
    if controlnet:
        inputs["controlnet_block_samples"] = [torch.randn(2, 9, 16, generator=gen)]  # split like the image
    return inputs


def _run(model, inputs, names):
    """Output, and the gradients of the named parameters and of the latent input, of a loss
    other than a plain sum."""
    model.zero_grad()
    latent = inputs["hidden_states"].clone().requires_grad_()
    out = model(**{**inputs, "hidden_states": latent}).sample
    weights = torch.linspace(-1, 2, out.numel()).view_as(out)
    (out * weights).sum().backward()
    params = dict(model.named_parameters())
    return out.detach(), [params[n].grad.clone() for n in names] + [latent.grad]


def _check_model(group):
    import mmfast

    names = ["img_in.weight", "txt_in.weight", "txt_norm.weight", "transformer_blocks.0.attn.to_q.weight",
             "transformer_blocks.0.attn.norm_added_k.weight", "transformer_blocks.1.attn.add_v_proj.weight",
             "transformer_blocks.1.img_mod.1.weight", "transformer_blocks.0.txt_mlp.net.2.weight",
             "time_text_embed.timestep_embedder.linear_1.weight", "norm_out.linear.weight", "proj_out.weight"]
    model, inputs = _tiny_qwenimage(), _inputs()
    out_ref, grads_ref = _run(model, inputs, names)
    handle = mmfast.patch(model, sequence_parallel=group)
    assert handle.family == "diffusers-qwenimage-transformer"
    assert sum("Ulysses" in w for _, w in handle.replaced) == 3, handle.replaced  # 2 attentions + the model
    out, grads = _run(model, inputs, names)
    torch.testing.assert_close(out, out_ref, **CLOSE, msg="output")
    for name, grad, grad_ref in zip(names + ["input"], grads, grads_ref):
        dist.all_reduce(grad, group=group)  # each rank holds its tokens' share
        torch.testing.assert_close(grad, grad_ref, **CLOSE, msg=f"grad of {name}")

    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    with torch.no_grad(), pytest.raises(ValueError, match="encoder_hidden_states_mask: not taken under sequence_par"):
        model(**inputs, encoder_hidden_states_mask=mask)
    handle.undo()
    torch.testing.assert_close(_run(model, inputs, names)[0], out_ref, rtol=0, atol=0, msg="undone")


def _check_zero_cond_t(group):
    """Qwen-Image-Edit-2511's per-token modulation (``modulate_index``: the target image's
    tokens, then the reference image's), split like the image tokens."""
    import mmfast

    names = ["transformer_blocks.0.img_mod.1.weight", "transformer_blocks.1.txt_mod.1.weight",
             "transformer_blocks.1.attn.to_k.weight"]
    model, inputs = _tiny_qwenimage(zero_cond_t=True), _inputs(controlnet=False)
    inputs["hidden_states"] = torch.randn(2, 15, 16, generator=torch.Generator().manual_seed(2))
    inputs["img_shapes"] = [[(1, 3, 3), (1, 2, 3)]] * 2  # 9 + 6 image tokens
    out_ref, grads_ref = _run(model, inputs, names)
    with mmfast.patch(model, sequence_parallel=group):
        out, grads = _run(model, inputs, names)
    torch.testing.assert_close(out, out_ref, **CLOSE, msg="zero_cond_t output")
    for name, grad, grad_ref in zip(names + ["input"], grads, grads_ref):
        dist.all_reduce(grad, group=group)
        torch.testing.assert_close(grad, grad_ref, **CLOSE, msg=f"zero_cond_t grad of {name}")


def _check_pipeline(group):
    import mmfast
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=4 * 6, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4).eval()
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                             transformer=_tiny_qwenimage())
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    embeds = dict(prompt_embeds=torch.randn(1, 5, 12, generator=gen),
                  negative_prompt_embeds=torch.randn(1, 3, 12, generator=gen))

    def generate():
        return pipe(**embeds, true_cfg_scale=4.0, height=24, width=32, num_inference_steps=2, output_type="latent",
                    generator=torch.Generator().manual_seed(5)).images  # 3 x 4 image tokens

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # prompt_embeds without a mask: diffusers says all tokens are valid
        expected = generate()
        with mmfast.patch(pipe, sequence_parallel=group) as handle:
            assert any("Ulysses" in w for _, w in handle.replaced), handle.replaced
            got = generate()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg="QwenImagePipeline")


def _check_refusals(group):
    import mmfast

    model = _tiny_qwenimage(heads=3)
    with pytest.raises(ValueError, match=rf"sequence_parallel: a world size of {WORLD} does not divide the 3 heads"):
        mmfast.patch(model, sequence_parallel=group)
    assert not any("forward" in vars(m) for m in model.modules()) and not hasattr(model, "_mmfast_patch_handle")
    assert all(type(m.processor).__module__.startswith("diffusers") for m in model.modules()
               if hasattr(m, "set_processor"))


def _check_ranks(rank, world):
    import mmfast

    mmfast.set_backend("torch")  # the Triton interpreter would make the workers slow
    _check_model(dist.group.WORLD)
    _check_zero_cond_t(dist.group.WORLD)
    _check_pipeline(dist.group.WORLD)
    _check_refusals(dist.group.WORLD)


def test_qwenimage_ulysses_two_ranks_equal_single_process(tmp_path):
    pytest.importorskip("diffusers")
    import diffusers  # noqa: F401  (imported once here: forked workers inherit it)
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel  # noqa: F401

    import mmfast.integrations.diffusers.qwenimage_transformer  # noqa: F401

    run_ranks(_check_ranks, WORLD, tmp_path)
