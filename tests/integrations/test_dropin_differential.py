"""Differential tests of the transformers drop-in: for every family mmfast.patch supports,
the patched instance against the same instance unpatched (or an unpatched twin built
from the same seed), the way transformers' own model tests use models: forward, hidden
states, attentions when asked, config output flags, gradients, generate with left
padding and a KV cache, save/from_pretrained, load_state_dict(assign=True), a meta-device
build + to_empty, deepcopy, dtype moves after patching. Inputs are multi-image (several
images per sample; 4 tiles for Mllama) and left padded, as real checkpoints get them.

mmfast's ops run their torch reference backend here (the kernels have their own tests
against it): what is tested is the drop-in's plumbing, which is the same on every backend.
"""

from __future__ import annotations

import copy

import pytest
import torch

import mmfast
from tests.integrations.hf_tiny import CASES, build, torch_backend_on_one_thread  # noqa: F401 (autouse)

FAMILIES = list(CASES)


def _tensors(out, mask=None, path="out"):
    """Every tensor of a model output, by path (nested outputs and tuples flattened; None
    kept, so a missing output fails); rows of padding tokens (``mask`` [B, T] == 0) are
    zeroed, as mmfast's attention leaves them 0 where sdpa leaves what it computes."""
    if isinstance(out, torch.Tensor):
        if mask is not None and out.dim() >= 2 and out.shape[:2] == mask.shape and out.is_floating_point():
            out = out * mask.view(*mask.shape, *([1] * (out.dim() - 2))).to(out.dtype)
        return {path: out}
    if out is None:
        return {path: None}
    if isinstance(out, dict):  # ModelOutput
        items = out.items()
    elif isinstance(out, (tuple, list)):
        items = enumerate(out)
    else:
        return {}  # caches and other objects: compared through generate
    found = {}
    for key, value in items:
        found.update(_tensors(value, mask, f"{path}.{key}"))
    return found


def _assert_same_outputs(got, want, tol, mask=None):
    got, want = _tensors(got, mask), _tensors(want, mask)
    assert got.keys() == want.keys()
    for key in want:
        assert (got[key] is None) == (want[key] is None), key
        if want[key] is not None:
            torch.testing.assert_close(got[key], want[key], rtol=tol, atol=tol, msg=lambda m: f"{key}: {m}")


def _run(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs)


def _mask(inputs):
    return inputs.get("attention_mask")


def _set_on_every_config(model, **flags):
    """Set output flags on every config object the model's modules hold (the top one and
    each tower's / sub-model's), as transformers' tests do for composite models."""
    for config in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
        for key, value in flags.items():
            setattr(config, key, value)


@pytest.fixture
def lm_attention_calls(monkeypatch):
    """Counts the calls of the "mmfast" attention implementation into mmfast's ops."""
    from mmfast.integrations.transformers import attention_interface

    calls = []
    for op in ("attention", "cross_attention"):
        real = getattr(attention_interface, op)
        monkeypatch.setattr(attention_interface, op, lambda *a, real=real, **kw: calls.append(1) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_hidden_states_and_config_flags(name, lm_attention_calls):
    case = CASES[name]
    model, inputs = build(name), case.inputs()
    want = _run(model, inputs)
    want_states = _run(model, inputs, output_hidden_states=True)
    _set_on_every_config(model, output_hidden_states=True, return_dict=True)
    want_flagged = _run(model, inputs)
    _set_on_every_config(model, output_hidden_states=False)
    handle = mmfast.patch(model)
    assert handle.replaced
    for qualified, _ in handle.replaced:
        model.get_submodule(qualified)  # every name resolves
    _assert_same_outputs(_run(model, inputs), want, case.tol, _mask(inputs))
    assert bool(lm_attention_calls) == case.has_lm_attention  # the language model's attention ran on mmfast
    _assert_same_outputs(_run(model, inputs, output_hidden_states=True), want_states, case.tol, _mask(inputs))
    # The same asked through the configs, as transformers' tests do.
    _set_on_every_config(model, output_hidden_states=True)
    _assert_same_outputs(_run(model, inputs), want_flagged, case.tol, _mask(inputs))
    _set_on_every_config(model, output_hidden_states=False)
    handle.undo()
    assert not any("forward" in m.__dict__ for m in model.modules())
    _assert_same_outputs(_run(model, inputs), want, 0.0)


@pytest.mark.parametrize("how", ["argument", "config"])
@pytest.mark.parametrize("name", FAMILIES)
def test_attention_weights_when_asked(name, how):
    """An eager model asked for attention weights returns them patched as unpatched (the
    calls asking for them run the original path); the config object stays eager."""
    case = CASES[name]
    model, inputs = build(name, attn="eager"), case.inputs()
    config = model.config
    kwargs = {"output_attentions": True} if how == "argument" else {}
    if how == "config":
        _set_on_every_config(model, output_attentions=True)
    want = _run(model, inputs, **kwargs)
    with mmfast.patch(model):
        got = _run(model, inputs, **kwargs)
        assert config._attn_implementation == "eager"
    assert any(k for k, v in _tensors(want).items() if "attentions" in k and v is not None)
    _assert_same_outputs(got, want, case.tol, _mask(inputs))


@pytest.mark.parametrize("name", FAMILIES)
def test_gradients(name):
    """Every parameter's gradient, held to the project's rule: the patched model's error
    against the float64 unpatched model at most about twice that of the unpatched model
    in float32 (random tiny models amplify rounding in places; a wrong gradient is off by
    far more)."""
    case = CASES[name]
    model, inputs = build(name), case.inputs()
    weights = [None]

    def grads(model, dtype=torch.float32):
        model.zero_grad()
        given = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        out = model(**given)
        picked = _tensors(case.pick(out), _mask(inputs)).values()
        if weights[0] is None:
            gen = torch.Generator().manual_seed(2)
            weights[0] = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in picked]
        loss = sum((t * w.to(t.dtype)).sum() for t, w in zip(picked, weights[0]))
        loss.backward()
        return {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}

    want = grads(model)
    with mmfast.patch(model):
        got = grads(model)
    exact = grads(copy.deepcopy(model).double(), torch.float64)
    assert got.keys() == want.keys() == exact.keys() and want
    for key in want:
        err, err_hf = (got[key] - exact[key]).abs().max(), (want[key] - exact[key]).abs().max()
        scale = exact[key].abs().max()
        assert err <= 2 * err_hf + 1e-5 * scale + 1e-6, (key, err.item(), err_hf.item())


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.generative])
def test_generate_left_padded_with_kv_cache(name):
    case = CASES[name]
    model, inputs = build(name), case.inputs()
    options = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "use_cache": True}
    want = model.generate(**inputs, **options)
    with mmfast.patch(model):
        got = model.generate(**inputs, **options)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", FAMILIES)
def test_weights_lifecycle(name, tmp_path):
    """save/from_pretrained, load_state_dict(assign=True), meta build + to_empty, deepcopy
    and dtype moves (with torch's overwrite-on-conversion too): the patched model always
    computes with the weights it holds now."""
    case = CASES[name]
    inputs, tol = case.inputs(), case.tol
    reference = build(name)
    other = build(name, seed=1)  # other weights, unpatched

    def same(model, like):
        _assert_same_outputs(_run(model, inputs), _run(like, inputs), tol, _mask(inputs))

    model = build(name)
    mmfast.patch(model)
    same(model, reference)

    # save_pretrained from the patched model, loaded unpatched: the same checkpoint.
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    same(loaded, reference)
    mmfast.patch(loaded)
    same(loaded, reference)

    # load_state_dict(assign=True) replaces the Parameter objects.
    model.load_state_dict(other.state_dict(), assign=True)
    same(model, other)

    # deepcopy: the copy runs its own weights; the original is unaffected by changes to it.
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.9)
    moved = copy.deepcopy(other)
    with torch.no_grad():
        for p in moved.parameters():
            p.mul_(0.9)
    same(twin, moved)
    same(model, other)

    # dtype moves after patching, also when they swap the Parameter objects.
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    try:
        for flag in (False, True):
            torch.__future__.set_overwrite_module_params_on_conversion(flag)
            model.half().float()
            other.half().float()
            same(model, other)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)

    # meta-device build, patch, to_empty, then the weights (and non-persistent buffers).
    with torch.device("meta"):
        empty = case.build("sdpa")
    mmfast.patch(empty)
    empty.to_empty(device="cpu")
    empty.load_state_dict(reference.state_dict())
    buffers = dict(reference.named_buffers())
    with torch.no_grad():
        for key, buffer in empty.named_buffers():
            buffer.copy_(buffers[key])
    same(empty, reference)
