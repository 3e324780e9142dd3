"""mmfast.patch on the text towers of tiny random CLIPTextModelWithProjection and
SiglipTextModel (CLIPTextModel is the first one's ``text_model``): outputs, hidden states
(all, or selected by index) and tuples match the unpatched model, with and without
padding; the state_dict is kept; undo restores bit-identical outputs; gradients match;
calls the mmfast tower does not cover run the original forward."""

import pytest
import torch

import mmfast

transformers = pytest.importorskip("transformers")

# Head dim 32: the Triton attention backends take it.
TEXT = dict(vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=12, bos_token_id=97, eos_token_id=98, pad_token_id=0)


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "siglip":
        return transformers.SiglipTextModel(transformers.SiglipTextConfig(**TEXT)).eval()
    config = transformers.CLIPTextConfig(**TEXT, projection_dim=16)
    return transformers.CLIPTextModelWithProjection(config).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 90, (3, 9), generator=g)
    ids[0, 5], ids[1:, -1] = 98, 98
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 6:] = 0  # right padding
    mask[2, :2] = 0  # left padding
    return ids, mask


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_patched_text_tower_matches_and_undo_restores(kind):
    model = _model(kind)
    ids, mask = _batch()
    # CLIP's causal padding rows are not compared (see mmfast.nn.text); SigLIP's are.
    rows = mask.bool() if kind == "clip" else torch.ones(ids.shape, dtype=torch.bool)
    with torch.no_grad():
        before = model(ids, attention_mask=mask, output_hidden_states=True)
        plain = model(ids)
        selected = model(ids, output_hidden_states=[-2], return_dict=False)
        state = {k: v.clone() for k, v in model.state_dict().items()}

        handle = mmfast.patch(model)
        tower_name = "text_model" if kind == "clip" else ""  # "": the model itself (get_submodule(""))
        assert handle.replaced == [(tower_name, f"mmfast {kind} text tower")]
        got = model(ids, attention_mask=mask, output_hidden_states=True)
        assert type(got) is type(before) and got.keys() == before.keys()
        _close(got.last_hidden_state[rows], before.last_hidden_state[rows])
        _close(got[0], before[0]) if kind == "clip" else _close(got.pooler_output, before.pooler_output)
        for ours, theirs in zip(got.hidden_states, before.hidden_states, strict=True):
            _close(ours[rows], theirs[rows])
        _close(model(ids)[0], plain[0])  # no mask: the padded causal / bidirectional layout
        picked = model(ids, output_hidden_states=[-2], return_dict=False)
        assert isinstance(picked, tuple) and len(picked) == len(selected)
        assert [s is None for s in picked[-1]] == [s is None for s in selected[-1]]
        _close(picked[-1][-2], selected[-1][-2])
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

        handle.undo()
        assert not any("forward" in m.__dict__ for m in model.modules())
        assert torch.equal(model(ids, attention_mask=mask, output_hidden_states=True)[0], before[0])


def test_patched_text_tower_trains_and_falls_back():
    model = _model("clip").train()  # attention dropout 0: the mmfast tower runs in training too
    ids, mask = _batch()
    weight = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    grads = []
    for patched in (True, False):
        model.zero_grad()
        with mmfast.patch(model) if patched else torch.enable_grad():
            (model(ids, attention_mask=mask).text_embeds * weight).sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for name, grad in grads[1].items():
        atol = 1e-5 * max(1.0, grad.abs().max().item())  # fp32 sums in another order
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")

    # Returned attention weights: the original forward runs, exactly as unpatched.
    model.eval()
    with torch.no_grad():
        want = model(ids, output_attentions=True)
        with mmfast.patch(model):
            got = model(ids, output_attentions=True)
    assert torch.equal(got.text_embeds, want.text_embeds) and len(got.attentions) == len(want.attentions)


def test_attention_dropout_runs_in_the_mmfast_tower():
    """Training with attention dropout stays on mmfast (its masks, not Hugging Face's): a
    seed reproduces the output, the dropout changes it, and eval mode is unaffected."""
    model = _model("clip")
    model.config.attention_dropout = model.text_model.config.attention_dropout = 0.5
    ids, mask = _batch()
    with torch.no_grad():
        want_eval = model(ids, attention_mask=mask).text_embeds
        with mmfast.patch(model):
            _close(model(ids, attention_mask=mask).text_embeds, want_eval)
            model.train()
            runs = []
            for seed in (3, 3, 4):
                torch.manual_seed(seed)
                runs.append(model(ids, attention_mask=mask).text_embeds)
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])
    assert not torch.allclose(runs[0], want_eval)
    # The same masks as the mmfast module draws itself: the patched forward ran mmfast's kernels.
    ours = mmfast.nn.TextTransformerWithProjection.from_config(model.config)
    ours.load_state_dict(model.state_dict())
    torch.manual_seed(3)
    with torch.no_grad():
        _close(ours.train()(ids, mask).text_embeds, runs[0])
