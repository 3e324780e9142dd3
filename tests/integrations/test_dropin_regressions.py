"""Regression tests of issue 17's transformers items: what broke when patched models were
used the way transformers' own tests use them."""

from __future__ import annotations

import warnings

import pytest
import torch

import mmfast
from tests.integrations.hf_tiny import CASES, _mllama, _mllama_inputs, build, torch_backend_on_one_thread  # noqa: F401

transformers = pytest.importorskip("transformers")


@pytest.fixture
def cross_attention_calls(monkeypatch):
    """The KV length of each cross_attention call the patched Mllama layers make."""
    from mmfast.nn import gated_cross_attention

    seen = []
    real = gated_cross_attention.cross_attention
    monkeypatch.setattr(gated_cross_attention, "cross_attention",
                        lambda q, k, v, **kw: seen.append(k.shape[1]) or real(q, k, v, **kw))
    return seen


# ---- 1. Mllama: images x tiles folded into the batch axis ---------------------------------


@pytest.mark.parametrize("tiles", [4, 1])
def test_mllama_tiles_run_on_mmfast(tiles, cross_attention_calls):
    """Real checkpoints send 4 tiles per image and several images per sample: the states
    arrive as [B * images * tiles, patches, C]. The patched layer runs mmfast (counted) and
    matches, with 4 tiles and with 1, with and without the KV cache."""
    torch.manual_seed(0)
    model, inputs = _mllama("sdpa", tiles), _mllama_inputs(tiles)
    patches = model.model.vision_model.num_patches
    with torch.no_grad():
        want = model(**inputs, use_cache=False).logits
        with mmfast.patch(model):
            got_no_cache = model(**inputs, use_cache=False).logits
            got_cache = model(**inputs).logits  # use_cache defaults to True: a DynamicCache
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(got_no_cache[mask], want[mask], rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(got_cache[mask], want[mask], rtol=2e-4, atol=2e-4)
    assert cross_attention_calls == [2 * tiles * patches] * 2  # every image's every tile, per text row


def test_mllama_generate_decodes_on_mmfast(cross_attention_calls):
    model, inputs = build("mllama"), _mllama_inputs()
    options = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    want = model.generate(**inputs, **options)
    with mmfast.patch(model):
        got = model.generate(**inputs, **options)
    assert torch.equal(got, want)
    assert len(cross_attention_calls) == 3  # the prefill and both decode steps (keys from the cache)


# ---- 2. CLIP / SigLIP text towers follow replaced parameters --------------------------------


def _text_model(name, seed):
    torch.manual_seed(seed)
    text = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
            "vocab_size": 99, "eos_token_id": 98}
    if name == "clip":
        return transformers.CLIPTextModel(transformers.CLIPTextConfig(**text)).eval()
    return transformers.SiglipTextModel(transformers.SiglipTextConfig(**text)).eval()


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_text_tower_after_load_state_dict_assign(name):
    model, other = _text_model(name, 0), _text_model(name, 1)
    ids = torch.randint(3, 98, (2, 6))
    ids[:, -1] = 98
    with torch.no_grad():
        want = other(input_ids=ids).pooler_output
        mmfast.patch(model)
        model.load_state_dict(other.state_dict(), assign=True)
        got = model(input_ids=ids).pooler_output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_text_tower_built_on_meta_then_to_empty(name):
    reference = _text_model(name, 0)
    with torch.device("meta"):
        model = _text_model(name, 0)
    mmfast.patch(model)
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    ids = torch.randint(3, 98, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state,
                                   reference(input_ids=ids).last_hidden_state, rtol=1e-5, atol=1e-5)


# ---- 3. BLIP-2 Q-Former honours output flags set on its config ---------------------------------


@pytest.mark.parametrize("flag", ["output_hidden_states", "output_attentions"])
def test_blip2_qformer_flags_on_the_config(flag):
    model = build("blip2", attn="eager")
    qformer = model.model.qformer if hasattr(model, "model") else model.qformer
    setattr(qformer.config, flag, True)
    queries = torch.randn(2, 4, 32)
    image = torch.randn(2, 5, 32)
    field = flag.removeprefix("output_")
    with torch.no_grad():
        want = getattr(qformer(query_embeds=queries, encoder_hidden_states=image), field)
        with mmfast.patch(qformer):
            got = getattr(qformer(query_embeds=queries, encoder_hidden_states=image), field)
    assert want and got is not None and len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---- 4. attention weights and the user's config -------------------------------------------


def test_eager_config_kept_and_attention_weights_returned(monkeypatch):
    from mmfast.integrations.transformers import attention_interface

    calls = []
    real = attention_interface.attention
    monkeypatch.setattr(attention_interface, "attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model = build("llama", attn="eager")
    config = model.config
    twin = transformers.LlamaForCausalLM(config).eval()  # built from the same config object
    inputs = CASES["llama"].inputs()
    with torch.no_grad():
        want = model(**inputs, output_attentions=True).attentions
        want_twin = twin(**inputs).logits
        handle = mmfast.patch(model)
        got = model(**inputs, output_attentions=True).attentions
        assert not calls  # asked for weights: the original (eager) path
        model(**inputs)
        assert calls  # not asked: mmfast
        calls.clear()
        assert config._attn_implementation == "eager" and twin.config is config
        assert torch.equal(twin(**inputs).logits, want_twin) and not calls  # the twin is untouched
        handle.undo()
    assert len(got) == len(want) == 2
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---- 5. patching a part of a model; patches that replace nothing ------------------------


def test_patch_a_perceiver_resampler_alone():
    model = build("idefics2")
    resampler = model.model.connector.perceiver_resampler
    context, mask = torch.randn(2, 9, 64), torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        want = resampler(context, mask)
        with mmfast.patch(resampler) as handle:
            assert handle.replaced == [("", "perceiver cross_attention")]
            assert resampler.get_submodule(handle.replaced[0][0]) is resampler
            got = resampler(context, mask)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_patch_a_model_holding_a_qformer():
    model = build("blip2")
    holder = torch.nn.ModuleDict({"bridge": model.model.qformer if hasattr(model, "model") else model.qformer})
    with mmfast.patch(holder) as handle:
        assert [name for name, _ in handle.replaced] == ["bridge"]


def test_patch_of_nothing_supported_raises_or_warns():
    model = build("blip2")
    qformer = model.model.qformer if hasattr(model, "model") else model.qformer
    with pytest.raises(TypeError, match="no family recognises"):
        mmfast.patch(qformer.encoder.layer[0])  # a Q-Former layer: nothing mmfast replaces alone
    config = transformers.MllamaTextConfig(vocab_size=99, hidden_size=32, num_attention_heads=2,
                                           num_key_value_heads=1, intermediate_size=48, num_hidden_layers=1,
                                           cross_attention_layers=[], pad_token_id=0)
    text_only = transformers.MllamaForCausalLM(config)
    with pytest.warns(UserWarning, match="holds nothing the mllama family replaces"):
        handle = mmfast.patch(text_only)
    assert handle.replaced == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mmfast.patch(build("clip")).undo()  # a patch that replaces something says nothing


@pytest.mark.parametrize("name", ["clip", "siglip", "llava", "qwen2_vl", "mllama", "blip2"])
def test_replaced_names_resolve(name):
    model = build(name)
    handle = mmfast.patch(model)
    for qualified, _ in handle.replaced:
        model.get_submodule(qualified)
    assert any(q.count(".") >= 2 for q, _ in handle.replaced) or name in ("blip2",)


# ---- deepcopy: the copy's handle undoes the copy ---------------------------------------------


@pytest.mark.parametrize("name", ["clip", "llava"])
def test_deepcopy_of_a_patched_model_has_its_own_handle(name):
    import copy

    model, inputs = build(name), CASES[name].inputs()
    with torch.no_grad():
        want = CASES[name].pick(model(**inputs))
        mmfast.patch(model)
        twin = copy.deepcopy(model)
        twin._mmfast_patch_handle.undo()  # undoes the copy, not the original
        assert not any("forward" in m.__dict__ for m in twin.modules())
        assert any("forward" in m.__dict__ for m in model.modules()) and model._mmfast_patch_handle.active
        for got, ref in zip(CASES[name].pick(twin(**inputs)), want):
            assert torch.equal(got, ref)
        mmfast.patch(twin).undo()  # patchable again


# ---- gradient checkpointing: recomputed layers run as their forward did -------------------


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("name", ["llama", "llava"])
def test_gradient_checkpointing_recomputes_on_mmfast(name, reentrant, monkeypatch):
    """The backward pass recomputes the layers outside the forward's context; they must
    take the same attention path (a flash-style mask handed to sdpa would not even run)."""
    from mmfast.integrations.transformers import attention_interface

    calls = []
    real = attention_interface.attention
    monkeypatch.setattr(attention_interface, "attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model, inputs = build(name).train(), CASES[name].inputs()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    valid = inputs["attention_mask"][..., None]

    def grads():
        model.zero_grad()
        (model(**inputs, use_cache=False).logits * valid).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want = grads()
    with mmfast.patch(model):
        got = grads()
    assert len(calls) == 2 * 2  # two layers, forward and recomputation
    assert got.keys() == want.keys()
    for key in want:
        scale = want[key].abs().max()
        torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-4 * scale + 1e-6)
