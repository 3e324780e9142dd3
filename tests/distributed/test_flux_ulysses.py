"""FLUX.1 and FLUX.2 transformers patched with ``sequence_parallel=group`` on CPU with gloo,
against the unpatched single-process model.

One start of 4 forked processes runs every check over pairs of ranks (two groups of 2, side
by side) and over the whole world (4 ranks): the output, and the gradients of parameters
all over the model (embedders, both streams' attention, single-stream blocks, modulation,
output) summed over the group, of a tiny FluxTransformer2DModel (with ControlNet residuals,
and Kontext-like reference-image tokens) and Flux2Transformer2DModel (with and without
single-stream blocks, and with gradient checkpointing); 9 image and 5 text tokens, so both
streams are padded at 2 and at 4 ranks. Then, at 2 ranks, a FluxPipeline's final latents (15 image tokens, 7 text tokens);
and the refusals. fp32, mmfast's torch backends."""

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launcher import run_ranks
from tests.distributed.test_ulysses import CLOSE, _check_model

HEADS, HEAD_DIM = 4, 8


def _tiny_flux(heads=HEADS):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=HEAD_DIM,
        num_attention_heads=heads, joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4)).eval()


def _tiny_flux2(single_layers=2):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=single_layers, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=24, timestep_guidance_channels=32, mlp_ratio=3.0,
        axes_dims_rope=(2, 2, 2, 2), guidance_embeds=True).eval()


def _image_ids(height, width, axes, first=0.0):
    """[h * w, axes] ids as the FLUX pipelines make them: (first, row, col[, 0])."""
    ids = torch.zeros(height, width, axes)
    ids[..., 0] = first
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, axes)


def _flux_inputs(kontext=False):
    gen = torch.Generator().manual_seed(1)
    img_ids = _image_ids(3, 3, 3)  # 9 image tokens
    if kontext:  # a 2 x 2 reference image's tokens appended, marked 1 on axis 0 as Kontext does
        img_ids = torch.cat([img_ids, _image_ids(2, 2, 3, first=1.0)])
    image = img_ids.shape[0]
    inputs = {"hidden_states": torch.randn(2, image, 16, generator=gen),
              "encoder_hidden_states": torch.randn(2, 5, 24, generator=gen),  # 5 text tokens
              "pooled_projections": torch.randn(2, 16, generator=gen),
              "timestep": torch.tensor([0.3, 0.9]), "guidance": torch.tensor([3.5, 2.0]),
              "img_ids": img_ids, "txt_ids": torch.zeros(5, 3)}
    if not kontext:  # residuals added to the image tokens: split like them
        inputs["controlnet_block_samples"] = [torch.randn(2, image, HEADS * HEAD_DIM, generator=gen)]
        inputs["controlnet_single_block_samples"] = [torch.randn(2, image, HEADS * HEAD_DIM, generator=gen)]
    return inputs


def _flux2_inputs():
    gen = torch.Generator().manual_seed(1)
    text_ids = torch.zeros(5, 4)
    text_ids[:, 3] = torch.arange(5)  # FLUX.2 numbers text tokens on its 4th axis
    return {"hidden_states": torch.randn(2, 9, 16, generator=gen),
            "encoder_hidden_states": torch.randn(2, 5, 24, generator=gen),
            "timestep": torch.tensor([0.3, 0.9]), "guidance": torch.tensor([3.5, 2.0]),
            "img_ids": _image_ids(3, 3, 4), "txt_ids": text_ids}


FLUX_PARAMS = [
    "x_embedder.weight", "context_embedder.weight", "transformer_blocks.0.attn.to_q.weight",
    "transformer_blocks.0.attn.add_k_proj.weight", "transformer_blocks.0.attn.norm_k.weight",
    "transformer_blocks.0.ff_context.net.2.weight", "single_transformer_blocks.0.attn.to_v.weight",
    "single_transformer_blocks.1.proj_mlp.weight", "single_transformer_blocks.1.proj_out.weight",
    "time_text_embed.timestep_embedder.linear_1.weight", "norm_out.linear.weight", "proj_out.weight"]
FLUX2_PARAMS = [
    "x_embedder.weight", "context_embedder.weight", "transformer_blocks.0.attn.to_k.weight",
    "transformer_blocks.0.attn.add_q_proj.weight", "transformer_blocks.0.attn.norm_added_q.weight",
    "transformer_blocks.0.ff.linear_in.weight", "double_stream_modulation_txt.linear.weight",
    "time_guidance_embed.timestep_embedder.linear_1.weight", "norm_out.linear.weight", "proj_out.weight"]
FLUX2_SINGLE_PARAMS = ["single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight",
                       "single_transformer_blocks.1.attn.to_out.weight", "single_stream_modulation.linear.weight"]


def _checkpointed(build):
    def build_checkpointed():
        model = build()
        model.enable_gradient_checkpointing()
        return model
    return build_checkpointed


def _check_models(group, what):
    _check_model(_tiny_flux, _flux_inputs(), FLUX_PARAMS, group, f"{what} FLUX.1")
    _check_model(_tiny_flux, _flux_inputs(kontext=True), FLUX_PARAMS[:3], group, f"{what} FLUX.1 Kontext tokens")
    _check_model(_tiny_flux2, _flux2_inputs(), FLUX2_PARAMS + FLUX2_SINGLE_PARAMS, group, f"{what} FLUX.2")
    # diffusers' gradient checkpointing runs each block again in the backward pass, and
    # with it the block's exchanges
    _check_model(_checkpointed(_tiny_flux2), _flux2_inputs(), FLUX2_PARAMS[:4] + FLUX2_SINGLE_PARAMS[:1], group,
                 f"{what} FLUX.2 gradient checkpointing")
    _check_model(lambda: _tiny_flux2(single_layers=0), _flux2_inputs(), FLUX2_PARAMS, group,
                 f"{what} FLUX.2 without single-stream blocks")


def _check_refusals(group, world):
    import mmfast

    model = _tiny_flux(heads=3)
    with pytest.raises(ValueError, match=rf"sequence_parallel: a world size of {world} does not divide the 3 heads"):
        mmfast.patch(model, sequence_parallel=group)
    assert not any("forward" in vars(m) for m in model.modules()) and not hasattr(model, "_mmfast_patch_handle")
    assert all(type(m.processor).__module__.startswith("diffusers") for m in model.modules() if hasattr(m, "processor"))

    model = _tiny_flux2()
    with mmfast.patch(model, sequence_parallel=group), torch.no_grad():
        with pytest.raises(ValueError, match="kv_cache_mode: FLUX.2's reference KV cache is not sequence-parallel"):
            model(**_flux2_inputs(), kv_cache_mode="extract", num_ref_tokens=4)
        # A processor set after patching would attend to this rank's chunk only: refused.
        from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor

        model.transformer_blocks[0].attn.processor = Flux2AttnProcessor()
        with pytest.raises(ValueError, match="sequence_parallel: attention transformer_blocks.0.attn now runs"):
            model(**_flux2_inputs())


def _check_pipeline(group, what):
    """A FluxPipeline patched with sequence_parallel: the unpatched pipeline's final latents."""
    import mmfast
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        shift_factor=0.1, scaling_factor=1.5).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=_tiny_flux())
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    embeds = {"prompt_embeds": torch.randn(1, 7, 24, generator=gen),
              "pooled_prompt_embeds": torch.randn(1, 16, generator=gen)}

    def generate():  # 20 x 12 pixels: a 10 x 6 latent, packed 2 x 2 into 5 x 3 = 15 tokens
        return pipe(**embeds, height=20, width=12, num_inference_steps=3, guidance_scale=3.5, output_type="latent",
                    generator=torch.Generator().manual_seed(5)).images

    want = generate()
    with mmfast.patch(pipe, sequence_parallel=group) as handle:
        assert "FluxTransformer2DModel" in handle.sequence_parallel_models, handle.replaced
        got = generate()
    assert got.shape == want.shape == (1, 15, 16)
    torch.testing.assert_close(got, want, **CLOSE, msg=f"{what} FluxPipeline")


def _check_ranks(rank, world):
    import mmfast

    mmfast.set_backend("torch")  # the Triton interpreter would make the workers slow
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    for group, size in ((pairs[rank // 2], 2), (dist.group.WORLD, world)):
        what = f"rank {rank}, {size} ranks"
        _check_models(group, what)
        _check_refusals(group, size)
    _check_pipeline(pairs[rank // 2], f"rank {rank}, 2 ranks")


def test_flux_ulysses_two_and_four_ranks_equal_single_process(tmp_path):
    pytest.importorskip("diffusers")
    import diffusers  # noqa: F401  (imported once here: forked workers inherit it)
    import diffusers.models  # noqa: F401

    import mmfast.integrations.diffusers.flux_sequence_parallel  # noqa: F401

    run_ranks(_check_ranks, 4, tmp_path)
