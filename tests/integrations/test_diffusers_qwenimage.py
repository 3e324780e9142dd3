"""mmfast.patch on tiny random diffusers Qwen-Image transformers (QwenImageTransformer2DModel)
and QwenImagePipeline. Patched against unpatched on the same instance: outputs (mmfast's
torch backends in fp32; the Triton interpreter in fp32 and fp16), gradients,
load_state_dict(assign=True), meta-device builds, deep copies and dtype moves (the
helpers of test_diffusers_differential.py), save_pretrained / from_pretrained, undo, text
key-padding masks, the rotary-table errors, and the paths left to diffusers (float masks,
``attention_mask``, zero_cond_t's per-token modulation, custom processors, diffusers'
context parallelism). Sequence parallelism: tests/distributed/test_ulysses_qwenimage.py."""

import importlib

import pytest
import torch

import mmfast
from mmfast.nn import qwenimage_transformer
from tests.integrations import test_diffusers_differential as differential
from tests.integrations.qwenimage_models import qwenimage_inputs, tiny_qwenimage, tiny_qwenimage_pipeline

pytest.importorskip("diffusers")

attention_op = importlib.import_module("mmfast.ops.attention")  # the module (mmfast.ops.attention is the function)
TOL = dict(rtol=1e-4, atol=1e-5)  # fp32: summation order only
FAMILY = "diffusers-qwenimage-transformer"


def _processors(model):
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "set_processor")}


def _error(got, want):
    return (got.double() - want).abs().max().item()


@pytest.fixture
def attention_calls(monkeypatch):
    """(rotary given, backend chosen) of every mmfast attention call of the Qwen processor."""
    calls, select, current = [], attention_op.ATTENTION.select, {}

    def spy_select(call, backend=None):
        chosen = select(call, backend)
        current["backend"] = chosen.name
        return chosen

    def spy_attention(*args, **kwargs):
        out = attention_op.attention(*args, **kwargs)
        calls.append((kwargs.get("rotary") is not None, current.pop("backend")))
        return out

    monkeypatch.setattr(attention_op.ATTENTION, "select", spy_select)
    monkeypatch.setattr(qwenimage_transformer, "attention", spy_attention)
    return calls


def test_patched_matches_and_undo_is_exact(attention_calls):
    model, inputs = tiny_qwenimage(), qwenimage_inputs()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    processors = _processors(model)
    with torch.no_grad(), mmfast.set_backend("torch"):
        before = model(**inputs).sample
        handle = mmfast.patch(model)
        assert handle.family == FAMILY
        replaced = dict(handle.replaced)
        for block in ("transformer_blocks.0", "transformer_blocks.1"):
            assert replaced[block].startswith("double-stream block")
            assert replaced[f"{block}.attn"].endswith("mmfast QwenDoubleStreamAttnProcessor")
            assert replaced[f"{block}.img_mlp.net.0"] == replaced[f"{block}.txt_mlp.net.0"] == "GELU in one pass"
            assert all(replaced[f"{block}.attn.{n}"] == "rms_norm" for n in ("norm_q", "norm_k", "norm_added_q",
                                                                            "norm_added_k"))
        assert replaced["norm_out"] == "adaln_modulate" and replaced["txt_norm"] == "rms_norm"
        patched = model(**inputs).sample
        handle.undo()
        after = model(**inputs).sample
    assert len(attention_calls) == 2 and all(rotary for rotary, _ in attention_calls), attention_calls
    torch.testing.assert_close(patched, before, **TOL)
    assert torch.equal(after, before)
    assert all(_processors(model)[n] is p for n, p in processors.items())
    assert not any("forward" in vars(m) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_interpreter_fused_rotary(dtype, attention_calls):
    # The kernels on the Triton interpreter (head dim 32, 3 + 6 tokens: triton_short), the
    # rotary inside the attention kernel. fp32: summation order only; fp16: the
    # flash-attention rule against the unpatched model in float64.
    model, inputs = tiny_qwenimage(num_layers=1), qwenimage_inputs(batch=1, text_tokens=3, height=2, width=3)
    with torch.no_grad():
        exact = model.double()(**{k: v.double() if torch.is_tensor(v) else v for k, v in inputs.items()}).sample
        cast = {k: v.to(dtype) if torch.is_tensor(v) else v for k, v in inputs.items()}
        eager = model.to(dtype)(**cast).sample
        with mmfast.patch(model):
            got = model(**cast).sample
    assert attention_calls == [(True, attention_calls[0][1])] and attention_calls[0][1] in attention_op.FUSES_ROTARY
    assert got.dtype == dtype and torch.isfinite(got).all()
    if dtype == torch.float32:
        torch.testing.assert_close(got, eager, **TOL)
        # A text mask: apply_rotary (interleaved) and the variable-length kernel.
        mask = torch.tensor([[True, False, True]])
        with torch.no_grad():
            eager_masked = model(**cast, encoder_hidden_states_mask=mask).sample
            with mmfast.patch(model):
                got_masked = model(**cast, encoder_hidden_states_mask=mask).sample
        torch.testing.assert_close(got_masked, eager_masked, **TOL)
        assert not torch.allclose(got_masked, got, **TOL)
    else:
        assert _error(got, exact) <= 2 * _error(eager, exact) + 1e-3 * exact.abs().max().item()


def test_text_padding_mask_on_mmfast_matches_diffusers():
    # A boolean encoder_hidden_states_mask (prompts of several lengths, not only trailing
    # padding): the text keys it drops are dropped; rotated by apply_rotary, attended by
    # the variable-length kernel.
    model, inputs = tiny_qwenimage(num_layers=1), qwenimage_inputs()
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    mask[0, 2] = False
    with torch.no_grad(), mmfast.set_backend("torch"):
        want = model(**inputs, encoder_hidden_states_mask=mask).sample
        unmasked = model(**inputs).sample
        with mmfast.patch(model):
            got = model(**inputs, encoder_hidden_states_mask=mask).sample
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(want, unmasked, **TOL)  # the mask matters


def test_calls_left_to_diffusers_processor():
    # A float text mask (diffusers concatenates it with a boolean one and adds it to the
    # scores), an attention_mask (diffusers refuses it), no text stream (refused too).
    model = tiny_qwenimage(num_layers=1)
    attn = model.transformer_blocks[0].attn
    gen = torch.Generator().manual_seed(3)
    image, text = torch.randn(2, 12, 64, generator=gen), torch.randn(2, 7, 64, generator=gen)
    tables = model.pos_embed([(1, 3, 4)] * 2, max_txt_seq_len=7, device=image.device)
    float_mask = torch.ones(2, 7)
    float_mask[1, 5:] = 0
    with torch.no_grad():
        want = attn(image, text, encoder_hidden_states_mask=float_mask, image_rotary_emb=tables)
        with mmfast.patch(model):
            got = attn(image, text, encoder_hidden_states_mask=float_mask, image_rotary_emb=tables)
            with pytest.raises(ValueError, match="does not accept an external attention_mask"):
                attn(image, text, attention_mask=torch.ones(2, 1, 1, 19, dtype=torch.bool))
            with pytest.raises(ValueError, match="requires encoder_hidden_states"):
                attn(image)
    for g, w in zip(got, want):  # the q/k norms still run mmfast's rms_norm
        torch.testing.assert_close(g, w, **TOL)


def test_zero_cond_t_blocks_run_diffusers_forward():
    # Qwen-Image-Edit-2511: per-token modulation (modulate_index); those blocks run
    # diffusers' forward, their attention mmfast's. Two images of 3 x 4 tokens.
    model = tiny_qwenimage(zero_cond_t=True)
    inputs = qwenimage_inputs(height=6, width=4)
    inputs["img_shapes"] = [[(1, 3, 4), (1, 3, 4)]] * 2
    with torch.no_grad(), mmfast.set_backend("torch"):
        want = model(**inputs).sample
        with mmfast.patch(model) as handle:
            assert type(model.transformer_blocks[0].attn.processor).__module__.startswith("mmfast")
            assert "transformer_blocks.0" in dict(handle.replaced)
            got = model(**inputs).sample
    torch.testing.assert_close(got, want, **TOL)


def test_layered_rotary_tables():
    # Qwen-Image-Layered: QwenEmbedLayer3DRope (a frame index per layer, the condition
    # image's frame at -1), the same complex-table format. Two layers of 3 x 4 tokens.
    model = tiny_qwenimage(num_layers=1, use_layer3d_rope=True)
    inputs = qwenimage_inputs(height=6, width=4)
    inputs["img_shapes"] = [[(1, 3, 4), (1, 3, 4)]] * 2
    with torch.no_grad(), mmfast.set_backend("torch"):
        want = model(**inputs).sample
        with mmfast.patch(model):
            got = model(**inputs).sample
    torch.testing.assert_close(got, want, **TOL)


def test_text_batch_broadcast_runs_diffusers_blocks():
    # One text sample for two latents: diffusers' block broadcasts the text stream against
    # the timestep embedding (QwenImagePipeline given one negative prompt for two prompts).
    model, inputs = tiny_qwenimage(num_layers=1), qwenimage_inputs()
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:1]
    with torch.no_grad(), mmfast.set_backend("torch"):
        want = model(**inputs).sample
        with mmfast.patch(model):
            got = model(**inputs).sample
    torch.testing.assert_close(got, want, **TOL)


def test_custom_and_context_parallel_processors_are_kept():
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    class Custom(QwenDoubleStreamAttnProcessor2_0):
        pass

    model = tiny_qwenimage()
    custom = Custom()
    model.transformer_blocks[0].attn.set_processor(custom)
    model.transformer_blocks[1].attn.processor._parallel_config = object()  # as enable_parallelism sets it
    with mmfast.patch(model) as handle:
        assert model.transformer_blocks[0].attn.processor is custom
        assert type(model.transformer_blocks[1].attn.processor).__module__.startswith("diffusers")
        assert not any(n.endswith(".attn") for n, _ in handle.replaced)
    # Set after patching: refused, not silently run over the whole sequence.
    model = tiny_qwenimage()
    with mmfast.patch(model):
        model.transformer_blocks[1].attn.processor._parallel_config = object()
        with torch.no_grad(), pytest.raises(ValueError, match="_parallel_config"):
            model(**qwenimage_inputs())


# ---- bad input ---------------------------------------------------------------------------


def test_rotary_axes_not_summing_to_the_head_dim():
    model = tiny_qwenimage(axes_dims_rope=(8, 8, 8))
    with pytest.raises(ValueError, match=r"axes_dims_rope: .* sums to 24, expected the attention head dim 32"):
        mmfast.patch(model)
    assert not any("forward" in vars(m) for m in model.modules()) and not hasattr(model, "_mmfast_patch_handle")


def test_bad_tables_and_masks_name_the_argument():
    model = tiny_qwenimage(num_layers=1)
    attn = model.transformer_blocks[0].attn
    gen = torch.Generator().manual_seed(3)
    image, text = torch.randn(1, 12, 64, generator=gen), torch.randn(1, 7, 64, generator=gen)
    image_table, text_table = model.pos_embed([(1, 3, 4)], max_txt_seq_len=7, device=image.device)
    narrow = torch.polar(torch.ones(12, 12), torch.rand(12, 12, generator=gen))  # axes summing to 24
    cases = [
        ((narrow, text_table), r"the image table has 12 columns .*axes_dims_rope"),
        ((image_table[:10], text_table), r"the image table: expected 12 rows \(one per image token\)"),
        ((image_table, text_table[:5]), r"the text table: expected 7 rows \(one per text token\)"),
        ((image_table.real, text_table), r"the image table: expected a complex Tensor"),
        ((image_table,), r"expected a pair \(image table, text table\)"),
    ]
    with mmfast.patch(model), torch.no_grad():
        for tables, message in cases:
            with pytest.raises(ValueError, match=rf"image_rotary_emb: {message}"):
                attn(image, text, image_rotary_emb=tables)
        with pytest.raises(ValueError, match=r"encoder_hidden_states_mask: expected \[B, Tt\] = \(1, 7\)"):
            attn(image, text, encoder_hidden_states_mask=torch.ones(1, 6, dtype=torch.bool))
        with pytest.raises(ValueError, match=r"encoder_hidden_states: expected the batch of hidden_states \(1\)"):
            attn(image, text.expand(2, -1, -1))


# ---- drop-in: the differential helpers, on this family ----------------------------------------


def _build_as_diffusers_loads():
    """tiny_qwenimage; built under torch.device("meta"), with its rotary tables on the CPU
    as diffusers' own loader leaves them (QwenEmbedRope keeps them as plain attributes,
    not buffers, which a meta build would leave without data after to_empty)."""
    model = tiny_qwenimage()
    if model.pos_embed.pos_freqs.is_meta:
        with torch.device("cpu"):
            model.pos_embed = type(model.pos_embed)(theta=10000, axes_dim=list(model.config.axes_dims_rope),
                                                    scale_rope=True)
    return model


def _tensor_inputs():
    inputs = qwenimage_inputs()
    del inputs["img_shapes"]  # the helpers cast every input: _run adds it back
    return inputs


@pytest.fixture
def qwenimage_in_differential(monkeypatch):
    run = differential._run

    def run_with_image_shapes(model, inputs):
        if type(model).__name__ != "QwenImageTransformer2DModel":
            return run(model, inputs)
        return model(**inputs, img_shapes=[(1, 3, 4)] * inputs["hidden_states"].shape[0]).sample

    monkeypatch.setattr(differential, "_run", run_with_image_shapes)
    monkeypatch.setitem(differential.FAMILIES, "qwenimage-transformer", (_build_as_diffusers_loads, _tensor_inputs))
    with mmfast.set_backend("torch"):
        yield "qwenimage-transformer"


@pytest.mark.parametrize("check", [
    differential.test_gradients_match, differential.test_load_state_dict_assign_after_patching,
    differential.test_meta_device_build_then_to_empty, differential.test_deepcopy_of_a_patched_model,
    differential.test_dtype_move_after_patching], ids=lambda f: f.__name__[5:])
def test_differential(check, qwenimage_in_differential):
    check(qwenimage_in_differential)


def test_save_pretrained_and_from_pretrained(tmp_path):
    from diffusers import QwenImageTransformer2DModel

    model, inputs = tiny_qwenimage(num_layers=1), qwenimage_inputs()
    with torch.no_grad(), mmfast.set_backend("torch"):
        want = model(**inputs).sample
        with mmfast.patch(model):
            model.save_pretrained(tmp_path)  # the patched instance saves diffusers' checkpoint
        loaded = QwenImageTransformer2DModel.from_pretrained(tmp_path).eval()
        assert not any("forward" in vars(m) for m in loaded.modules())
        with mmfast.patch(loaded):
            got = loaded(**inputs).sample
    assert loaded.state_dict().keys() == model.state_dict().keys()
    torch.testing.assert_close(got, want, **TOL)


def test_gradient_checkpointing_runs_the_patched_blocks():
    model, inputs = tiny_qwenimage(num_layers=1), qwenimage_inputs(batch=1)
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
    assert got.keys() == want.keys() and any("transformer_blocks.0.attn.norm_added_k" in n for n in got)
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, **TOL, msg=n)


# ---- the pipeline: prompt -> Qwen2.5-VL text encoder -> a few flow-matching steps ----------------


def test_pipeline_patched_gives_the_same_final_latents(monkeypatch):
    # Two prompts of different lengths (a padded text batch: the text mask on mmfast) and
    # true CFG with negative prompts.
    masked_calls = []
    masked_attention = qwenimage_transformer.masked_attention
    monkeypatch.setattr(qwenimage_transformer, "masked_attention",
                        lambda *args: masked_calls.append(1) or masked_attention(*args))
    pipe = tiny_qwenimage_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe(prompt=["a cat", "a red dog on the grass"], negative_prompt=["blurry", "dark"], true_cfg_scale=4.0,
                    height=32, width=32, num_inference_steps=2, output_type="latent",
                    generator=torch.Generator().manual_seed(5)).images

    want = generate()
    with mmfast.set_backend("torch"), mmfast.patch(pipe) as handle:
        names = [name for name, _ in handle.replaced]
        assert "FlowMatchEulerDiscreteScheduler" in names and "transformer_blocks.1" in names
        got = generate()
    assert got.shape == want.shape and torch.isfinite(got).all() and masked_calls
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.slow
def test_block_gradients_under_triton():
    # Gradients of the block's parameters and of the input through the Triton kernels
    # (attention with the rotary inside, its backward rotating dq/dk back; the fused
    # modulation, gated residual, rms_norm and GELU backwards): error against float64 at
    # most about twice the unpatched fp32 model's.
    model, inputs = tiny_qwenimage(num_layers=1), qwenimage_inputs(batch=1, text_tokens=3, height=2, width=3)

    def grads(dtype):
        model.to(dtype).zero_grad(set_to_none=True)
        cast = {k: v.to(dtype) if torch.is_tensor(v) else v for k, v in inputs.items()}
        leaf = cast["hidden_states"].clone().requires_grad_()
        out = model(**{**cast, "hidden_states": leaf}).sample
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
        (out * weights).sum().backward()
        return {"input": leaf.grad, **{n: p.grad for n, p in model.named_parameters()
                                       if "transformer_blocks" in n and p.grad is not None}}

    exact, eager = grads(torch.float64), grads(torch.float32)
    with mmfast.patch(model):
        got = grads(torch.float32)
    assert got.keys() == exact.keys() and "transformer_blocks.0.attn.norm_added_q.weight" in got
    for n, g in exact.items():
        err, err_eager = _error(got[n], g), _error(eager[n], g)
        assert err <= 2 * err_eager + 1e-6 * g.abs().max().item(), f"{n}: {err:.3e} vs eager {err_eager:.3e}"
