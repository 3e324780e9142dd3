"""mmfast.patch on tiny random diffusers FLUX transformers: FluxTransformer2DModel as
FLUX.1-dev (guidance embedding) and as schnell (none), Flux2Transformer2DModel with and
without guidance; and FluxPipeline, FluxKontextPipeline, Flux2Pipeline. Patched against
unpatched on the same instance: outputs (Triton interpreter, fp32 and fp16), block
gradients (also with gradient checkpointing), undo, the rotary-axes errors, and the paths
left to diffusers (masks, hooked projections, IP-adapter processors, diffusers' context
parallelism, FLUX.2's per-token KV-cache modulations). state_dict loads, meta builds,
deep copies and dtype moves are in test_diffusers_differential.py."""

import contextlib
import importlib

import pytest
import torch

import mmfast
from mmfast.nn import flux_attention
from tests.integrations.diffusers_models import flux2_inputs, flux_inputs, tiny_flux, tiny_flux2

pytest.importorskip("diffusers")

attention_op = importlib.import_module("mmfast.ops.attention")  # the module (mmfast.ops.attention is the function)

MODELS = {
    "flux.1-dev": (lambda **kw: tiny_flux(guidance_embeds=True, **kw), lambda **kw: flux_inputs(guidance=True, **kw),
                   "diffusers-flux-transformer"),
    "flux.1-schnell": (lambda **kw: tiny_flux(guidance_embeds=False, **kw),
                       lambda **kw: flux_inputs(guidance=False, **kw), "diffusers-flux-transformer"),
    "flux.2": (lambda **kw: tiny_flux2(guidance_embeds=True, **kw), lambda **kw: flux2_inputs(guidance=True, **kw),
               "diffusers-flux2-transformer"),
    "flux.2-no-guidance": (lambda **kw: tiny_flux2(guidance_embeds=False, **kw),
                           lambda **kw: flux2_inputs(guidance=False, **kw), "diffusers-flux2-transformer"),
}
ATTENTIONS = ("FluxAttention", "Flux2Attention", "Flux2ParallelSelfAttention")


def _processors(model):
    return {name: m.processor for name, m in model.named_modules() if type(m).__name__ in ATTENTIONS}


@pytest.fixture
def attention_calls(monkeypatch):
    """(rotary given, backend chosen) of every mmfast attention call from the FLUX processors."""
    calls, select = [], attention_op.ATTENTION.select
    current = {}

    def spy_select(call, backend=None):
        chosen = select(call, backend)
        current["backend"] = chosen.name
        return chosen

    def spy_attention(*args, **kwargs):
        out = attention_op.attention(*args, **kwargs)
        calls.append((kwargs.get("rotary") is not None, current.pop("backend")))
        return out

    monkeypatch.setattr(attention_op.ATTENTION, "select", spy_select)
    monkeypatch.setattr(flux_attention, "attention", spy_attention)
    return calls


@pytest.mark.parametrize("name", list(MODELS))
def test_patched_matches_and_undo_is_exact(name, attention_calls):
    # The kernels on the Triton interpreter; the variants without guidance embedding (which
    # mmfast leaves to diffusers) on mmfast's torch backends, to keep the suite quick.
    build, make_inputs, family = MODELS[name]
    on_triton = name in ("flux.1-dev", "flux.2")
    backends = contextlib.nullcontext() if on_triton else mmfast.set_backend("torch")
    model, inputs = build(), make_inputs()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    processors = _processors(model)
    with torch.no_grad(), backends:
        before = model(**inputs).sample
        handle = mmfast.patch(model)
        assert handle.family == family
        replaced = dict(handle.replaced)
        for prefix in ("transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"):
            assert prefix in replaced and replaced[f"{prefix}.attn"].split(" -> ")[1].startswith("mmfast Flux")
        assert replaced["norm_out"] == "adaln_modulate"
        assert all(type(p).__module__.startswith("mmfast") for p in _processors(model).values())
        patched = model(**inputs).sample
        handle.undo()
        after = model(**inputs).sample
    # Every attention got the FLUX table, and on Triton ran on a backend that rotates q/k
    # inside the kernel (head dim 32 and 19 tokens: triton_short).
    expected = attention_op.FUSES_ROTARY if on_triton else ("torch",)
    assert len(attention_calls) == 3 and all(rotary and backend in expected
                                             for rotary, backend in attention_calls), attention_calls
    torch.testing.assert_close(patched, before, rtol=1e-4, atol=1e-5)  # fp32: summation order only
    assert torch.equal(after, before)
    assert all(_processors(model)[n] is p for n, p in processors.items())
    assert not any("forward" in vars(m) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _error(got, want):
    return (got.double() - want).abs().max().item()


@pytest.mark.parametrize("name", ["flux.1-dev", "flux.2"])
def test_fp16_under_triton_within_twice_eager_error(name):
    # The flash-attention rule at model level: against the unpatched model in float64, the
    # patched fp16 output's error is at most about twice the unpatched fp16 one's.
    build, make_inputs, _ = MODELS[name]
    model, inputs = build(), make_inputs()
    with torch.no_grad():
        exact = model.double()(**{k: v.double() for k, v in inputs.items()}).sample
        half = {k: v.half() for k, v in inputs.items()}
        eager = model.half()(**half).sample
        with mmfast.patch(model):
            got = model(**half).sample
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert _error(got, exact) <= 2 * _error(eager, exact) + 1e-3 * exact.abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux.1-dev", "flux.2"])
def test_block_gradients_under_triton(name):
    # Gradients of the transformer blocks' parameters and of the input, through the Triton
    # kernels (attention with the rotary inside, its backward rotating dq/dk back): error
    # against float64 at most about twice the unpatched fp32 model's.
    build, make_inputs, _ = MODELS[name]
    model, inputs = build(), make_inputs(text_tokens=3, height=2, width=3)  # 9 tokens: the interpreter is slow

    def grads(dtype):
        model.to(dtype).zero_grad(set_to_none=True)
        cast = {k: v.to(dtype) for k, v in inputs.items()}
        leaf = cast["hidden_states"].clone().requires_grad_()
        out = model(**{**cast, "hidden_states": leaf}).sample
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
        (out * weights).sum().backward()
        return {"input": leaf.grad, **{n: p.grad for n, p in model.named_parameters()
                                       if "transformer_blocks" in n and p.grad is not None}}

    exact, eager = grads(torch.float64), grads(torch.float32)
    with mmfast.patch(model):
        got = grads(torch.float32)
    assert got.keys() == exact.keys() and any("single_transformer_blocks.1.attn" in n for n in got)
    for n, g in exact.items():
        err, err_eager = _error(got[n], g), _error(eager[n], g)
        assert err <= 2 * err_eager + 1e-6 * g.abs().max().item(), f"{n}: {err:.3e} vs eager {err_eager:.3e}"


@pytest.mark.parametrize("name", ["flux.1-dev", "flux.2"])
def test_rotary_axes_not_summing_to_the_head_dim(name):
    build, make_inputs, _ = MODELS[name]
    axes = (8, 8, 8) if name.startswith("flux.1") else (8, 8, 4, 4)
    with pytest.raises(ValueError, match=r"axes_dims_rope: .* sums to 24, expected the attention head dim 32"):
        mmfast.patch(build(axes_dims_rope=axes))
    # A table of the wrong width reaching a patched processor: named, not a broadcast error.
    model = build()
    mmfast.patch(model)
    model.pos_embed.axes_dim = list(axes)
    with torch.no_grad(), pytest.raises(ValueError, match=r"image_rotary_emb: .*axes_dims_rope"):
        model(**make_inputs())


def test_attention_mask_runs_diffusers_processor():
    model = tiny_flux()
    attn = model.transformer_blocks[0].attn
    gen = torch.Generator().manual_seed(3)
    image, text = torch.randn(2, 12, 64, generator=gen), torch.randn(2, 7, 64, generator=gen)
    mask = torch.ones(2, 1, 1, 19, dtype=torch.bool)
    mask[1, ..., 3:7] = False
    with torch.no_grad():
        want = attn(image, text, attention_mask=mask)
        with mmfast.patch(model):
            got = attn(image, text, attention_mask=mask)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_ip_adapter_processor_is_kept_and_its_output_added():
    # An IP-adapter processor (no mmfast counterpart) stays; the patched double-stream block
    # adds its third output, the image-prompt attention, as diffusers' block does.
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    model, inputs = tiny_flux(), flux_inputs()
    torch.manual_seed(4)
    ip = FluxIPAdapterAttnProcessor(hidden_size=64, cross_attention_dim=24, num_tokens=(4,), scale=0.7)
    model.transformer_blocks[0].attn.set_processor(ip)
    inputs["joint_attention_kwargs"] = {"ip_hidden_states": [torch.randn(2, 4, 24)]}
    with torch.no_grad(), mmfast.set_backend("torch"):
        want = model(**inputs).sample
        with mmfast.patch(model) as handle:
            assert model.transformer_blocks[0].attn.processor is ip
            assert "transformer_blocks.0" in dict(handle.replaced)
            got = model(**inputs).sample
            ip.scale = [0.0]
            without = model(**inputs).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(without, want, rtol=1e-4, atol=1e-5)  # the image prompt matters


def test_hooked_output_projection_keeps_its_hook():
    # A hooked (or LoRA-wrapped) single-stream proj_out gets the concatenation and its own
    # forward: the split GEMMs read the weight directly and would bypass the hook.
    model, inputs = tiny_flux(), flux_inputs()
    model.single_transformer_blocks[1].proj_out.register_forward_hook(lambda m, args, out: out * 0.5)
    with torch.no_grad():
        want = model(**inputs).sample
        with mmfast.patch(model), mmfast.set_backend("torch"):
            got = model(**inputs).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_diffusers_context_parallel_processors_are_not_replaced():
    model = tiny_flux()
    model.transformer_blocks[0].attn.processor._parallel_config = object()  # as enable_parallelism sets it
    with mmfast.patch(model) as handle:
        assert "transformer_blocks.0.attn" not in dict(handle.replaced)
        assert type(model.transformer_blocks[0].attn.processor).__module__.startswith("diffusers")
        assert type(model.single_transformer_blocks[0].attn.processor).__module__.startswith("mmfast")
    # Set after patching: refused, not silently run over the whole sequence.
    model = tiny_flux()
    with mmfast.patch(model):
        model.single_transformer_blocks[0].attn.processor._parallel_config = object()
        with torch.no_grad(), pytest.raises(ValueError, match="_parallel_config"):
            model(**flux_inputs())


def test_flux2_per_token_modulation_runs_diffusers_blocks():
    # KV-cache "extract" mode: reference tokens get their own modulation rows, so the
    # modulations are per token; those blocks run diffusers' forward (same result).
    model, inputs = tiny_flux2(), flux2_inputs()
    with torch.no_grad(), mmfast.set_backend("torch"):
        want = model(**inputs, kv_cache_mode="extract", num_ref_tokens=4).sample
        with mmfast.patch(model):
            got = model(**inputs, kv_cache_mode="extract", num_ref_tokens=4).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---- pipelines: a few flow-matching steps, patched against unpatched, same seed -------------


def _flux_pipeline(kontext=False):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        shift_factor=0.1, scaling_factor=1.5).eval()
    return (FluxKontextPipeline if kontext else FluxPipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, transformer=tiny_flux())


def _flux2_pipeline():
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                             down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2).eval()
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                         transformer=tiny_flux2())


@pytest.mark.parametrize("which", ["flux", "flux-kontext", "flux2"])
def test_pipeline_patched_gives_the_same_final_latents(which):
    # Kontext: the encoded reference image's tokens join the image tokens (ids on axis 0 = 1).
    pipe = _flux2_pipeline() if which == "flux2" else _flux_pipeline(kontext=which == "flux-kontext")
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    embeds = {"prompt_embeds": torch.randn(1, 7, 24, generator=gen)}
    if which != "flux2":
        embeds["pooled_prompt_embeds"] = torch.randn(1, 16, generator=gen)
    if which == "flux-kontext":
        embeds.update(image=torch.rand(1, 3, 16, 16, generator=gen), max_area=256, _auto_resize=False)

    def generate():
        return pipe(**embeds, height=16, width=16, num_inference_steps=3, guidance_scale=3.5, output_type="latent",
                    generator=torch.Generator().manual_seed(5)).images

    want = generate()
    # mmfast's torch backends (the kernels are checked above); the fused scheduler step runs.
    with mmfast.set_backend("torch"), mmfast.patch(pipe) as handle:
        names = [name for name, _ in handle.replaced]
        assert "FlowMatchEulerDiscreteScheduler" in names and "single_transformer_blocks.1" in names
        got = generate()
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["flux.1-dev", "flux.2"])
def test_gradient_checkpointing_runs_the_patched_blocks(name):
    # diffusers' checkpointing calls each block again in the backward pass: the patched
    # forward must recompute the same graph (torch backends; kernels are checked above).
    build, make_inputs, _ = MODELS[name]
    model, inputs = build(), make_inputs()
    model.enable_gradient_checkpointing()

    def grads():
        model.zero_grad(set_to_none=True)
        out = model(**inputs).sample
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    with mmfast.set_backend("torch"):
        want = grads()
        with mmfast.patch(model):
            got = grads()
    assert got.keys() == want.keys() and any("single_transformer_blocks.1" in n for n in got)
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, rtol=1e-4, atol=1e-5, msg=n)
