"""mmfast's FluxModel and Flux2Model against diffusers' FluxPipeline, Flux2KleinPipeline and
Flux2Pipeline: tiny random components, saved with save_pretrained (no text encoders),
loaded with from_pretrained, final latents compared for the same prompt embeddings and
seed.

fp32 throughout, so the tolerance is fp32 accumulation-order noise over a few steps. As in
test_sd3, the comparisons run mmfast's blocks on their PyTorch backend and the fused
flow-match step on Triton (``torch_blocks``); one test per generation runs every kernel on
Triton (32-wide heads, which Triton's attention takes) and checks that it did.
"""


import pytest
import torch

import mmfast

pytest.importorskip("diffusers")

from mmfast.models import Flux2Model, FluxModel  # noqa: E402
from mmfast.models.flux import pack_2x2, unpack_2x2  # noqa: E402
from mmfast.models.flux2 import compute_empirical_mu  # noqa: E402

TOKENS = 6  # text tokens of the prompt embeddings
HEIGHT, WIDTH = 16, 24  # pixels: 8 x 12 latent cells (2x VAE), 4 x 6 packed tokens


def _vae(flux2: bool):
    from diffusers import AutoencoderKL, AutoencoderKLFlux2

    common = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=2, sample_size=32)
    if flux2:
        vae = AutoencoderKLFlux2(**common)
        with torch.no_grad():  # statistics that are not the identity, so the de-normalisation counts
            vae.bn.running_mean.uniform_(-0.5, 0.5)
            vae.bn.running_var.uniform_(0.5, 2.0)
        return vae
    return AutoencoderKL(**common, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                         shift_factor=0.1159)


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=4,
                                           max_image_seq_len=64, base_shift=0.5, max_shift=1.15)


def _flux1_pipeline(guidance_embeds=True, heads=2, head_dim=16, axes=(4, 6, 6)):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=head_dim, num_attention_heads=heads,
                                         joint_attention_dim=32, pooled_projection_dim=24,
                                         guidance_embeds=guidance_embeds, axes_dims_rope=axes)
    pipe = FluxPipeline(transformer=transformer, vae=_vae(False), scheduler=_scheduler(), text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flux2_transformer(guidance_embeds=False, heads=2, head_dim=16, axes=(4, 4, 4, 4)):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=40,
                                   timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=axes,
                                   guidance_embeds=guidance_embeds)


def _klein_pipeline(is_distilled: bool, **transformer):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline(transformer=_flux2_transformer(**transformer), vae=_vae(True), scheduler=_scheduler(),
                              text_encoder=None, tokenizer=None, is_distilled=is_distilled)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _saved(pipe, path):
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def torch_blocks():
    """mmfast's blocks on their PyTorch backend, the fused guided step on Triton."""
    with mmfast.set_backend("torch"), mmfast.set_backend("triton", op="scheduler_step"):
        yield


def _embeds(dim, batch=2, pooled=None, negative=False, seed=3, tokens=TOKENS):
    gen = torch.Generator().manual_seed(seed)
    out = {"prompt_embeds": torch.randn(batch, tokens, dim, generator=gen)}
    if pooled:
        out["pooled_prompt_embeds"] = torch.randn(batch, pooled, generator=gen)
    if negative:
        out.update({f"negative_{k}": torch.randn(v.shape, generator=gen) for k, v in list(out.items())})
    return out


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def flux1(tmp_path_factory):
    pipe = _flux1_pipeline()
    return pipe, FluxModel.from_pretrained(_saved(pipe, tmp_path_factory.mktemp("flux1")))


# ---- FLUX.1 -------------------------------------------------------------------------------


@pytest.mark.parametrize("true_cfg", [1.0, 2.5])
def test_flux1_latents_match_diffusers(flux1, true_cfg, torch_blocks):
    """Embedded guidance, dynamic-shift mu, a non-square image, batch 2; with true CFG the
    negative prompt runs in the same batch."""
    pipe, ours = flux1
    e = _embeds(32, pooled=24, negative=true_cfg > 1)
    kwargs = dict(num_inference_steps=3, height=HEIGHT, width=WIDTH, guidance_scale=4.0, true_cfg_scale=true_cfg)
    expected = pipe(output_type="latent", generator=torch.Generator().manual_seed(5), **e, **kwargs).images
    actual = ours.generate(generator=torch.Generator().manual_seed(5), progress=False, **e, **kwargs)
    _close(actual, unpack_2x2(expected, HEIGHT // 2, WIDTH // 2))
    assert actual.shape == (2, 4, HEIGHT // 2, WIDTH // 2)
    assert all(type(b).forward is not b.forward for b in ours.transformer.transformer_blocks)  # patched per instance


def test_flux1_without_guidance_embedding_decoded_matches_diffusers(tmp_path, torch_blocks):
    """A schnell-like transformer (no guidance embedding), decoded to images."""
    pipe = _flux1_pipeline(guidance_embeds=False)
    ours = FluxModel.from_pretrained(_saved(pipe, tmp_path))
    e = _embeds(32, pooled=24, batch=1)
    kwargs = dict(num_inference_steps=2, height=HEIGHT, width=HEIGHT)
    expected = pipe(output_type="pt", generator=torch.Generator().manual_seed(1), **e, **kwargs).images
    actual = ours.generate(output_type="pt", generator=torch.Generator().manual_seed(1), progress=False, **e, **kwargs)
    _close(actual, expected)


def test_pack_round_trip():
    x = torch.randn(2, 3, 4, 6)
    packed = pack_2x2(x)
    assert packed.shape == (2, 6, 12)
    assert torch.equal(packed[0, 1], x[0, :, 0:2, 2:4].reshape(-1))  # channels first, then the 2x2 offsets
    assert torch.equal(unpack_2x2(packed, 4, 6), x)


def test_device_schedule_loop_matches_host_loop(flux1, torch_blocks, monkeypatch):
    """The CUDA graph's body (timestep and coefficients from the device table, static
    tensors updated in place), run eagerly on the CPU, against the host loop; twice, so
    the kept graph starts over."""
    _, ours = flux1
    monkeypatch.setattr(ours, "_capture_graphs", False)
    common = dict(num_inference_steps=3, height=HEIGHT, width=WIDTH, true_cfg_scale=2.0, progress=False,
                  **_embeds(32, pooled=24, negative=True))
    for seed in (7, 8):
        expected = ours.generate(generator=torch.Generator().manual_seed(seed), **common)
        actual = ours.generate(generator=torch.Generator().manual_seed(seed), cuda_graph=True, **common)
        _close(actual, expected)


def test_cuda_graph_needs_cuda(flux1):
    with pytest.raises(ValueError, match="cuda_graph: needs the model on a CUDA device"):
        flux1[1].generate(**_embeds(32, pooled=24), cuda_graph=True, progress=False)


@pytest.mark.parametrize("change, match", [
    (dict(height=18), "height: 18 is not a positive multiple of 4 "),
    (dict(width=14), "width: 14 is not a positive multiple of 4 "),
    (dict(prompt_embeds=torch.randn(2, TOKENS, 31)), "prompt_embeds: last dimension 31 is not the transformer's "
     "joint_attention_dim 32"),
    (dict(pooled_prompt_embeds=torch.randn(2, 25)), "pooled_prompt_embeds: last dimension 25 is not the "
     "transformer's pooled_projection_dim 24"),
    (dict(pooled_prompt_embeds=torch.randn(3, 24)),
     r"pooled_prompt_embeds: batch 3 differs from the batch of prompt_embeds \(2\)"),
    (dict(prompt_embeds=torch.randn(2, 32)), "prompt_embeds: expected a floating point tensor"),
    (dict(true_cfg_scale=2.0, negative_prompt_embeds=torch.randn(2, TOKENS, 32)), "negative_pooled_prompt_embeds: "),
    (dict(true_cfg_scale=2.0, negative_prompt_embeds=torch.randn(2, TOKENS + 1, 32),
          negative_pooled_prompt_embeds=torch.randn(2, 24)), "negative_prompt_embeds: shape"),
    (dict(sigmas=[1.0, 0.5]), "sigmas: 2 values for num_inference_steps=3"),
    (dict(num_inference_steps=0), "num_inference_steps: expected a positive integer"),
    (dict(output_type="pil"), "output_type: expected one of"),
])
def test_bad_flux1_arguments(flux1, change, match):
    kwargs = {**_embeds(32, pooled=24), "height": HEIGHT, "width": WIDTH, "num_inference_steps": 3, **change}
    with pytest.raises(ValueError, match=match):
        flux1[1].generate(progress=False, **kwargs)


def test_triton_kernels_end_to_end_flux1(tmp_path):
    """Every mmfast kernel on Triton (interpreted on a CPU) for one true-CFG step."""
    from mmfast.profile.measure import record_backends

    pipe = _flux1_pipeline(heads=1, head_dim=32, axes=(8, 12, 12))
    ours = FluxModel.from_pretrained(_saved(pipe, tmp_path))
    e = _embeds(32, pooled=24, batch=1, negative=True, tokens=3)
    kwargs = dict(num_inference_steps=1, height=8, width=8, true_cfg_scale=3.0)
    expected = pipe(output_type="latent", generator=torch.Generator().manual_seed(7), **e, **kwargs).images
    ran = set()
    with record_backends(ran):
        actual = ours.generate(generator=torch.Generator().manual_seed(7), progress=False, **e, **kwargs)
    _close(actual, unpack_2x2(expected, 4, 4))
    assert {op for op, _ in ran} >= {"attention", "adaln", "scheduler_step"}, ran
    assert all(backend.startswith("triton") for _, backend in ran), ran


def test_triton_kernels_fp16_within_twice_eager_error(tmp_path):
    """fp16 on Triton (interpreted) for one true-CFG step: mmfast's error against the fp32
    pipeline is at most about twice diffusers' own fp16 error (the flash-attention rule)."""
    pipe = _flux1_pipeline(heads=1, head_dim=32, axes=(8, 12, 12))
    ours = FluxModel.from_pretrained(_saved(pipe, tmp_path))
    e = _embeds(32, pooled=24, batch=1, negative=True, tokens=3)
    kwargs = dict(num_inference_steps=1, height=8, width=8, true_cfg_scale=3.0)
    reference = unpack_2x2(pipe(output_type="latent", generator=torch.Generator().manual_seed(7), **e,
                                **kwargs).images, 4, 4)
    half = {k: v.half() for k, v in e.items()}
    torch.nn.Module.to(pipe.transformer, torch.float16)
    torch.nn.Module.to(pipe.vae, torch.float16)
    eager = unpack_2x2(pipe(output_type="latent", generator=torch.Generator().manual_seed(7), **half,
                            **kwargs).images, 4, 4)
    torch.nn.Module.to(ours, torch.float16)
    actual = ours.generate(generator=torch.Generator().manual_seed(7), progress=False, **half, **kwargs)
    assert actual.dtype == torch.float16
    ours_error = (actual.float() - reference).abs().max().item()
    eager_error = (eager.float() - reference).abs().max().item()
    assert ours_error <= 2 * eager_error + 1e-4, (ours_error, eager_error)


@pytest.mark.gpu
@pytest.mark.parametrize("generation", [1, 2])
def test_cuda_graph_matches_host_loop(generation, tmp_path):
    if generation == 1:
        ours = FluxModel.from_pretrained(_saved(_flux1_pipeline(), tmp_path), device="cuda")
        e = _embeds(32, pooled=24, negative=True)
        extra = dict(true_cfg_scale=2.0)
    else:
        ours = Flux2Model.from_pretrained(_saved(_klein_pipeline(False), tmp_path), device="cuda")
        e = _embeds(40, negative=True)
        extra = dict(guidance_scale=3.0)
    common = dict(num_inference_steps=4, height=HEIGHT, width=WIDTH, progress=False,
                  **{k: v.cuda() for k, v in e.items()}, **extra)
    for seed in (7, 8):  # the second call replays the kept graph
        expected = ours.generate(generator=torch.Generator().manual_seed(seed), **common)
        actual = ours.generate(generator=torch.Generator().manual_seed(seed), cuda_graph=True, **common)
        _close(actual, expected)
    assert ours._graph_cache is not None and ours._graph_cache[1] is not None


# ---- FLUX.2 -------------------------------------------------------------------------------


@pytest.mark.parametrize("is_distilled", [True, False])
def test_klein_latents_match_diffusers(tmp_path, is_distilled, torch_blocks):
    """Step-distilled klein (no guidance) and the base model (classifier-free guidance on
    [negative; prompt]); the empirical mu, the VAE's batch-norm statistics undone."""
    pipe = _klein_pipeline(is_distilled)
    ours = Flux2Model.from_pretrained(_saved(pipe, tmp_path))
    assert ours.is_distilled is is_distilled
    e = _embeds(40, negative=not is_distilled)
    kwargs = dict(num_inference_steps=3, height=HEIGHT, width=WIDTH, guidance_scale=1.0 if is_distilled else 3.0)
    expected = pipe(output_type="latent", generator=torch.Generator().manual_seed(5), **e, **kwargs).images
    actual = ours.generate(generator=torch.Generator().manual_seed(5), progress=False, **e, **kwargs)
    _close(actual, expected)
    assert actual.shape == (2, 4, HEIGHT // 2, WIDTH // 2)
    images = ours.generate(output_type="pt", generator=torch.Generator().manual_seed(5), progress=False, **e, **kwargs)
    _close(images, pipe(output_type="pt", generator=torch.Generator().manual_seed(5), **e, **kwargs).images)


def test_flux2_dev_guidance_embedding_matches_diffusers(tmp_path, torch_blocks):
    """FLUX.2-dev's way: Flux2Pipeline, guidance as an embedding, no CFG."""
    from diffusers import Flux2Pipeline

    pipe = Flux2Pipeline(transformer=_flux2_transformer(guidance_embeds=True), vae=_vae(True), scheduler=_scheduler(),
                         text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    ours = Flux2Model.from_pretrained(_saved(pipe, tmp_path))
    e = _embeds(40, batch=1)
    kwargs = dict(num_inference_steps=2, height=HEIGHT, width=WIDTH, guidance_scale=2.5)
    tokens = pipe(output_type="latent", generator=torch.Generator().manual_seed(2), **e, **kwargs).images
    # Flux2Pipeline's "latent" output is the packed tokens: the pipeline's own steps to the cells
    ids = Flux2Pipeline._prepare_latent_ids(torch.zeros(1, 16, HEIGHT // 4, WIDTH // 4))
    grid = Flux2Pipeline._unpack_latents_with_ids(tokens, ids)
    bn = pipe.vae.bn
    grid = grid * torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps) + \
        bn.running_mean.view(1, -1, 1, 1)
    actual = ours.generate(generator=torch.Generator().manual_seed(2), progress=False, **e, **kwargs)
    _close(actual, Flux2Pipeline._unpatchify_latents(grid))
    images = ours.generate(output_type="pt", generator=torch.Generator().manual_seed(2), progress=False, **e, **kwargs)
    _close(images, pipe(output_type="pt", generator=torch.Generator().manual_seed(2), **e, **kwargs).images)


def test_empirical_mu_is_diffusers():
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu as reference

    for tokens, steps in ((24, 3), (4096, 28), (4301, 4), (16384, 50)):
        assert compute_empirical_mu(tokens, steps) == reference(tokens, steps)


def test_triton_kernels_end_to_end_flux2(tmp_path):
    from mmfast.profile.measure import record_backends

    pipe = _klein_pipeline(False, heads=1, head_dim=32, axes=(8, 8, 8, 8))
    ours = Flux2Model.from_pretrained(_saved(pipe, tmp_path))
    e = _embeds(40, batch=1, negative=True, tokens=3)
    kwargs = dict(num_inference_steps=1, height=8, width=8, guidance_scale=3.0)
    expected = pipe(output_type="latent", generator=torch.Generator().manual_seed(7), **e, **kwargs).images
    ran = set()
    with record_backends(ran):
        actual = ours.generate(generator=torch.Generator().manual_seed(7), progress=False, **e, **kwargs)
    _close(actual, expected)
    assert {op for op, _ in ran} >= {"attention", "adaln", "scheduler_step"}, ran
    assert all(backend.startswith("triton") for _, backend in ran), ran


def test_bad_flux2_arguments(tmp_path):
    base = Flux2Model(_flux2_transformer(), _vae(True), _scheduler(), is_distilled=False)
    distilled = Flux2Model(_flux2_transformer(), _vae(True), _scheduler(), is_distilled=True)
    kwargs = dict(height=HEIGHT, width=WIDTH, num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="prompt_embeds: last dimension 41 is not the transformer's "
                                         "joint_attention_dim 40"):
        distilled.generate(prompt_embeds=torch.randn(1, TOKENS, 41), **kwargs)
    with pytest.raises(ValueError, match="negative_prompt_embeds: guidance_scale > 1 on a model that is not"):
        base.generate(**_embeds(40), guidance_scale=3.0, **kwargs)
    with pytest.raises(ValueError, match="negative_prompt_embeds: not used here"):
        distilled.generate(**_embeds(40, negative=True), guidance_scale=3.0, **kwargs)
    with pytest.raises(ValueError, match="height: 10 is not a positive multiple of 4 "):
        distilled.generate(**_embeds(40), **{**kwargs, "height": 10})


# ---- loading and presets ----------------------------------------------------------------------


def test_from_pretrained_routes_by_pipeline_class(flux1, tmp_path):
    pipe = _klein_pipeline(True)
    path = _saved(pipe, tmp_path / "klein")
    assert type(mmfast.models.from_pretrained(path)) is Flux2Model
    with pytest.raises(ValueError, match="model_index.json: pipeline class 'Flux2KleinPipeline' is not one FluxModel"):
        FluxModel.from_pretrained(path)
    shard = path / "transformer" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(shard)
    state.pop("proj_out.weight")
    save_file(state, shard)
    with pytest.raises(ValueError, match="transformer: .*missing keys: proj_out.weight"):
        Flux2Model.from_pretrained(path)


def test_from_pretrained_keeps_the_weights(flux1):
    pipe, ours = flux1
    reference = pipe.transformer.state_dict()
    loaded = ours.transformer.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


@pytest.mark.parametrize("name, model, blocks, params", [
    ("flux-tiny", FluxModel, (1, 1), None),
    ("flux2-tiny", Flux2Model, (1, 1), None),
    ("flux.1-dev", FluxModel, (19, 38), 11_901_408_320),
    ("flux.2-klein", Flux2Model, (5, 20), 3_875_544_576),
])
def test_presets_on_meta_match_diffusers(name, model, blocks, params):
    """The preset built on the meta device (no memory): every tensor's shape is what
    diffusers' model of the same config has, and the released sizes' parameter counts."""
    import diffusers

    from mmfast.models.flux_presets import flux_preset

    with torch.device("meta"):
        ours = model.from_preset(name)
        spec = flux_preset(name)
        reference = getattr(diffusers, type(ours.transformer).__name__)(**spec["transformer"])
    shapes = {k: v.shape for k, v in ours.transformer.state_dict().items()}
    assert shapes == {k: v.shape for k, v in reference.state_dict().items()}
    assert (len(ours.transformer.transformer_blocks), len(ours.transformer.single_transformer_blocks)) == blocks
    if params is not None:
        assert sum(p.numel() for p in ours.transformer.parameters()) == params
    assert getattr(ours, "_mmfast_patch_handle", None) is None and ours.transformer._mmfast_patch_handle.active


def test_tiny_presets_generate():
    with mmfast.set_backend("torch"):
        latents = FluxModel.from_preset("flux-tiny").generate(**_embeds(32, pooled=32, batch=1), height=16, width=16,
                                                              num_inference_steps=1, progress=False)
        assert latents.shape == (1, 4, 8, 8) and bool(latents.isfinite().all())
        latents = Flux2Model.from_preset("flux2-tiny").generate(**_embeds(48, batch=1), height=16, width=16,
                                                                num_inference_steps=1, progress=False)
    assert latents.shape == (1, 4, 8, 8) and bool(latents.isfinite().all())
    with pytest.raises(ValueError, match="name: 'flux.2-klein' is a FLUX.2 preset"):
        FluxModel.from_preset("flux.2-klein")
    with pytest.raises(ValueError, match="name: unknown FLUX preset 'flux.1-pro'"):
        Flux2Model.from_preset("flux.1-pro")
