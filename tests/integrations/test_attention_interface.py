"""The "mmfast" transformers attention implementation on tiny random-weight decoders:
logits, greedy generation and gradients equal transformers' own sdpa implementation on
padded (left and right), packed and sliding-window batches; the switch is per instance
and undo restores the previous implementation exactly."""

import subprocess
import sys

import pytest
import torch

import mmfast
from mmfast.integrations.transformers import use_mmfast_attention
from mmfast.integrations.transformers import attention_interface
from mmfast.integrations.transformers.attention_interface import mmfast_attention_forward, register

transformers = pytest.importorskip("transformers")

SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "vocab_size": 128,
         "num_attention_heads": 2, "num_key_value_heads": 1}  # head dim 32, GQA 2:1


@pytest.fixture
def mmfast_calls(monkeypatch):
    """The (layout, Tq, Tk) of each mmfast.ops.attention / cross_attention (decode steps)
    call the implementation makes; a fall back to transformers' sdpa fails the test."""
    calls = []

    def spying(op):
        def spy(q, k, v, **options):
            calls.append(("packed" if q.dim() == 3 else "padded", q.shape[-3], k.shape[-3]))
            return op(q, k, v, **options)
        return spy

    def no_fallback(*args, **kwargs):
        raise AssertionError("fell back to sdpa")

    for name in ("attention", "cross_attention"):
        monkeypatch.setattr(attention_interface, name, spying(getattr(attention_interface, name)))
    monkeypatch.setattr(attention_interface, "_sdpa_fallback", no_fallback)
    return calls


def _build(arch, **extra):
    config_class, model_class = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    config = config_class(**{**SMALL, **extra}, pad_token_id=0, attn_implementation="sdpa")
    return model_class(config).eval()


def _batch(padding, lengths=(9, 6), vocab=128):
    total = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), total))
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        if padding == "left":
            mask[row, total - n:] = 1
        else:
            mask[row, :n] = 1
    return ids * mask, mask


def _logits(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_logits_equal_sdpa_on_padded_batches(arch, padding, mmfast_calls):
    model = _build(arch)
    ids, mask = _batch(padding)
    want = _logits(model, ids, mask)
    config = model.config
    with use_mmfast_attention(model), mmfast.set_backend("torch"):
        assert config._attn_implementation == "sdpa"  # the user's config object is left alone
        got = _logits(model, ids, mask)
        unpadded = _logits(model, ids[:1], None)  # no mask: the padded-layout path
    valid = mask.bool()  # padded query rows are 0 in mmfast (as in flash-attn), not compared
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    assert mmfast_calls == [("packed", 15, 15)] * 2 + [("padded", 9, 9)] * 2
    torch.testing.assert_close(unpadded, _logits(model, ids[:1], None), rtol=1e-5, atol=1e-5)


def test_triton_backend_under_the_interpreter(mmfast_calls):
    model = _build("qwen2", num_hidden_layers=1)
    ids, mask = _batch("left", lengths=(7, 4))
    want = _logits(model, ids, mask)
    with use_mmfast_attention(model), mmfast.set_backend("triton"):
        got = _logits(model, ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=2e-5, atol=2e-5)
    assert mmfast_calls == [("packed", 11, 11)]


@pytest.mark.parametrize("arch,extra,padded,cache", [
    ("qwen2", {}, True, "dynamic"), ("qwen2", {}, False, "dynamic"),
    ("qwen2", {}, True, "static"),  # keys longer than the mask: the unwritten tail is dropped
    ("mistral", {"sliding_window": 3}, True, "dynamic"),  # with a sliding-window cache
])
def test_greedy_generate_with_the_kv_cache_equals_sdpa(arch, extra, padded, cache, mmfast_calls):
    """Prefill, then decode steps with Tq = 1 < Tk: unpadded through the padded layout
    (bottom-right causal), padded through varlen segments."""
    model = _build(arch, **extra)
    ids, mask = _batch("left") if padded else (torch.randint(1, 128, (1, 6)), None)
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "cache_implementation": cache}
    want = model.generate(input_ids=ids, attention_mask=mask, **options)
    with use_mmfast_attention(model), mmfast.set_backend("torch"):
        got = model.generate(input_ids=ids, attention_mask=mask, **options)
    assert torch.equal(got, want)
    layouts = {layout for layout, *_ in mmfast_calls}
    # Padded: varlen; but a sliding layer's window may hold no padding any more, and then
    # transformers hands over no mask.
    assert "packed" in layouts if padded else layouts == {"padded"}
    assert any(tokens_q < tokens_k for _, tokens_q, tokens_k in mmfast_calls)  # decode steps ran on mmfast


def test_chunked_prefill_into_a_cache_equals_sdpa(mmfast_calls):
    """A padded prompt fed in two chunks: the second has 1 < Tq < Tk queries, the newest."""
    model = _build("qwen2")
    ids, mask = _batch("left")

    def second_chunk():
        cache = transformers.DynamicCache()
        with torch.no_grad():
            model(input_ids=ids[:, :5], attention_mask=mask[:, :5], past_key_values=cache)
            return model(input_ids=ids[:, 5:], attention_mask=mask, past_key_values=cache).logits

    want = second_chunk()
    with use_mmfast_attention(model), mmfast.set_backend("torch"):
        got = second_chunk()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the second chunk has no padding
    assert mmfast_calls[2:] == [("packed", 8, 15)] * 2


def test_gradients_equal_sdpa(mmfast_calls):
    model = _build("llama").train()
    ids, mask = _batch("left")
    weights = torch.randn(*ids.shape, 128) * mask[..., None]

    def grads():
        model.zero_grad()
        (model(input_ids=ids, attention_mask=mask).logits * weights).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    want = grads()
    with use_mmfast_attention(model), mmfast.set_backend("torch"):
        got = grads()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    assert mmfast_calls == [("packed", 15, 15)] * 2


def test_attention_dropout_in_training_is_mmfasts_philox_mask(mmfast_calls):
    """transformers passes attention_dropout in training: the triton kernels (interpreted)
    and the torch reference drop with the same Philox mask, so one seed gives the same
    logits and gradients on both; and the dropout is really applied."""
    model = _build("qwen2", num_hidden_layers=1, attention_dropout=0.25).train()
    ids, mask = _batch("left", lengths=(7, 4))
    weights = torch.randn(*ids.shape, 128) * mask[..., None]

    def run(backend):
        model.zero_grad()
        torch.manual_seed(7)
        with mmfast.set_backend(backend):
            logits = model(input_ids=ids, attention_mask=mask).logits
        (logits * weights).sum().backward()
        return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    with use_mmfast_attention(model):
        (logits, grads), (want_logits, want_grads) = run("triton"), run("torch")
        model.eval()
        undropped = _logits(model, ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], want_logits[valid], rtol=2e-5, atol=2e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.allclose(logits[valid], undropped[valid], atol=1e-3)


@pytest.mark.parametrize("arch,extra", [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}),  # layer 1 slides
    ("mistral", {"sliding_window": 3}),
])
def test_sliding_window_equals_sdpa(arch, extra, mmfast_calls):
    model = _build(arch, **extra)
    ids, mask = _batch("left", lengths=(11, 8))
    want = _logits(model, ids, mask)
    with use_mmfast_attention(model), mmfast.set_backend("torch"):
        got = _logits(model, ids, mask)
        full = _build(arch, **{k: v for k, v in extra.items() if k != "sliding_window"})
        full.load_state_dict(model.state_dict())
        with use_mmfast_attention(full):
            no_window = _logits(full, ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(no_window[valid], want[valid], atol=1e-3)  # the window matters here
    assert mmfast_calls == [("packed", 19, 19)] * 4


def test_packed_sequences_in_one_row_equal_sdpa(mmfast_calls):
    """Two sequences in one row, told apart by position_ids (as transformers' mask code
    does) or by flash-style cu_seq_lens kwargs."""
    model = _build("qwen2")
    ids = torch.randint(1, 128, (1, 9))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    # Without a cache: transformers looks for packing only then.
    want = _logits(model, ids, None, position_ids=position_ids, use_cache=False)
    separate = torch.cat([_logits(model, ids[:, :5], None), _logits(model, ids[:, 5:], None)], dim=1)
    torch.testing.assert_close(want, separate, rtol=1e-5, atol=1e-5)  # sdpa did see two sequences
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    with use_mmfast_attention(model), mmfast.set_backend("torch"):
        by_positions = _logits(model, ids, None, position_ids=position_ids, use_cache=False)
        by_cu = _logits(model, ids, None, position_ids=position_ids, use_cache=False,  # cu_seq_lens win
                        cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5, max_length_k=5)
    torch.testing.assert_close(by_positions, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_cu, want, rtol=1e-5, atol=1e-5)
    assert mmfast_calls == [("packed", 9, 9)] * 4


def _qwen2_5_vl():
    text = {**SMALL, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}}
    return transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
        text_config=text, image_token_id=120, video_token_id=121, vision_start_token_id=122,
        vision_config={"depth": 1, "hidden_size": 32, "num_heads": 1, "intermediate_size": 48,
                       "out_hidden_size": 64, "patch_size": 4, "window_size": 16, "fullatt_block_indexes": [0]},
        attn_implementation="sdpa"))


def _llava():
    return transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 37,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
        text_config={"model_type": "llama", **SMALL}, image_token_id=127, attn_implementation="sdpa"))


@pytest.mark.parametrize("build", [_qwen2_5_vl, _llava])
def test_vlm_language_model_through_mmfast_patch(build, mmfast_calls):
    model = build().eval()
    text_config = model.model.language_model.config
    ids, mask = _batch("left", vocab=100)
    want = _logits(model, ids, mask)
    with mmfast.set_backend("torch"):
        handle = mmfast.patch(model)
        assert text_config._attn_implementation == "sdpa"  # the user's config object is left alone
        assert model.model.language_model.config.__dict__ is text_config.__dict__  # a view of it
        assert sum(what == "mmfast attention implementation" for _, what in handle.replaced) == 2
        got = _logits(model, ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=2e-5, atol=2e-5)
    assert mmfast_calls == [("packed", 15, 15)] * 2
    handle.undo()
    assert text_config._attn_implementation == "sdpa"


def test_undo_restores_exactly_and_register_is_idempotent():
    register()
    register()
    assert transformers.AttentionInterface._global_mapping["mmfast"] is mmfast_attention_forward
    model = _build("llama")
    model.config._attn_implementation = "eager"
    config = model.config
    handle = mmfast.patch(model)  # the causal_lm family
    assert handle.family == "causal_lm" and config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="already patched"):
        mmfast.patch(model)
    handle.undo()
    assert model.config is config and config._attn_implementation == "eager"
    assert all(m.__dict__.get("config", config) is config and "forward" not in m.__dict__ for m in model.modules())
    assert "_attn_implementation_internal" in model.config.__dict__
    with pytest.raises(TypeError, match="no transformers decoder self-attention"):
        use_mmfast_attention(torch.nn.Linear(2, 2))


def test_other_mask_patterns_run_dense_on_sdpa(monkeypatch):
    """A mask pattern the flash-style masks cannot say (here config.is_causal=False: a
    decoder made bidirectional) is built dense, and that call runs on transformers' sdpa."""
    fallbacks = []
    fallback = attention_interface._sdpa_fallback
    monkeypatch.setattr(attention_interface, "_sdpa_fallback",
                        lambda *a, **kw: fallbacks.append(1) or fallback(*a, **kw))
    model = _build("qwen2")
    model.config.is_causal = False
    ids, mask = _batch("right")
    want = _logits(model, ids, mask)
    with use_mmfast_attention(model):
        got = _logits(model, ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    assert len(fallbacks) == 2


def test_importing_the_integration_imports_no_transformers():
    code = ("import sys, mmfast, mmfast.integrations.transformers.attention_interface; "
            "assert 'transformers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


class _Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


def test_unsupported_and_bad_arguments_raise_clearly():
    q, kv = torch.randn(1, 2, 5, 32), torch.randn(1, 1, 5, 32)
    call = lambda **kw: mmfast_attention_forward(_Module(), kw.pop("query", q), kv, kv, kw.pop("mask", None), **kw)
    for kwargs, what in [({"softcap": 30.0}, "softcap"), ({"s_aux": torch.zeros(2)}, "s_aux"),
                         ({"sliding_window": 3, "is_causal": False}, "non-causal")]:
        with pytest.raises(NotImplementedError, match=what):
            call(**kwargs)
    with pytest.raises(ValueError, match="query"):
        call(query=q[0])
    with pytest.raises(ValueError, match="sliding_window"):
        call(sliding_window=0)
    with pytest.raises(TypeError, match="scaling"):
        call(scaling="0.1")
    with pytest.raises(ValueError, match="dropout_p"):
        call(dropout=1.5)
    with pytest.raises(ValueError, match="attention_mask"):
        call(mask=torch.ones(1, 1, 5, dtype=torch.bool))
    # A dense 4D mask (a pattern mmfast's masks do not express) runs on transformers' sdpa.
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dense = torch.rand(1, 1, 5, 5) > 0.3
    dense[..., 0] = True
    out, weights = call(mask=dense)
    assert weights is None
    torch.testing.assert_close(out, sdpa_attention_forward(_Module(), q, kv, kv, dense)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("padded", [True, False])
def test_bf16_on_the_gpu_is_as_close_to_float64_as_sdpa(padded, device):
    """At a Qwen2-7B-like head layout (28 query heads, 4 K/V heads, head dim 128) on the
    default backend: the flash-attention rule, against transformers' sdpa in float64."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = _Module()
    module.num_key_value_groups = 7
    q = torch.randn(2, 28, 300, 128, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 4, 300, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(2, 300, dtype=torch.bool, device=device)
    if padded:
        mask[0, :77] = False  # left padding

    def sdpa(dtype):
        dense = None
        if padded:
            dense = torch.ones(300, 300, dtype=torch.bool, device=device).tril() & mask[:, None, None, :]
        return sdpa_attention_forward(module, q.to(dtype), k.to(dtype), v.to(dtype), dense, scaling=128 ** -0.5)[0]

    got, _ = mmfast_attention_forward(module, q, k, v, mask if padded else None, scaling=128 ** -0.5)
    valid = mask[:, :, None, None].expand_as(got)
    want, eager = sdpa(torch.float64), sdpa(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 300, 28, 128) and got.is_contiguous()
    ours = (got.double() - want)[valid].abs().max()
    theirs = (eager.double() - want)[valid].abs().max()
    assert ours <= 2 * theirs + 1e-3
