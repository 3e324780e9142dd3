"""Attention-probability dropout in the modules: active in training mode only, reproducible
under torch.manual_seed, and the Triton kernels' result equal to the torch reference
backend's under the same seed (both apply the one Philox mask a call draws), forward and
gradients; the patched Hugging Face Q-Former trains through mmfast's path."""

import contextlib

import pytest
import torch

import mmfast
from mmfast.models.opt_decoder import OPTDecoder

transformers = pytest.importorskip("transformers")


def _qformer_config():
    from transformers import Blip2QFormerConfig

    # Hidden dropout off: only the attention probabilities are dropped. Head dim 16: the
    # triton backend's smallest (a smaller one would go to sdpa, which drops with its own
    # generator, not the mask the torch backend rebuilds).
    config = Blip2QFormerConfig(hidden_size=64, num_attention_heads=4, intermediate_size=37, num_hidden_layers=1,
                                cross_attention_frequency=1, encoder_hidden_size=24, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.3)
    config._attn_implementation = "eager"
    return config


def _forced(backend, op):
    return mmfast.set_backend(backend, op=op) if backend else contextlib.nullcontext()


def _step(model, inputs, seed, backend=None, grads=True):
    """Output (and input gradients) of one seeded call (cross_attention forced to ``backend``)."""
    leaves = [t.clone().requires_grad_(grads) for t in inputs]
    torch.manual_seed(seed)
    with _forced(backend, "cross_attention"), torch.set_grad_enabled(grads):
        out = model(*leaves)
    out = out if isinstance(out, torch.Tensor) else out.last_hidden_state
    return [out.detach(), *(torch.autograd.grad(out, leaves, torch.ones_like(out)) if grads else ())]


def test_qformer_training_dropout(device):
    from mmfast.nn import QFormer

    model = QFormer(_qformer_config()).to(device)
    inputs = (torch.randn(2, 6, 64, device=device), torch.randn(2, 11, 24, device=device))
    evaluated = _step(model.eval(), inputs, 0, grads=False)[0]
    trained = _step(model.train(), inputs, 0)
    assert model.encoder.layer[0].crossattention.attention.attention_dropout == 0.3
    assert not torch.allclose(trained[0], evaluated, atol=1e-3)  # dropout is active
    assert torch.equal(_step(model, inputs, 0, grads=False)[0], trained[0])  # reproducible under a seed
    assert not torch.allclose(_step(model, inputs, 1, grads=False)[0], trained[0], atol=1e-3)
    # The Triton kernels and the torch reference apply the same masks, forward and backward.
    for a, b in zip(trained, _step(model, inputs, 0, backend="torch")):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # Eval mode drops nothing: back to the eval result, bit for bit.
    assert torch.equal(_step(model.eval(), inputs, 5, grads=False)[0], evaluated)


def test_patched_hugging_face_qformer_trains_through_mmfast(device):
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel

    from mmfast.nn import QFormer

    config = _qformer_config()
    theirs = Blip2QFormerModel(config).to(device).train()
    ours = QFormer(config).to(device).train()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    embeds, image = torch.randn(2, 6, 64, device=device), torch.randn(2, 11, 24, device=device)
    handle = mmfast.patch(theirs)
    try:
        torch.manual_seed(0)
        got = theirs(query_embeds=embeds, encoder_hidden_states=image).last_hidden_state
    finally:
        handle.undo()
    torch.manual_seed(0)
    expected = ours(embeds, image)
    # mmfast's path and masks (a different mask would differ by O(1), not by rounding).
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, ours.eval()(embeds, image), atol=1e-3)


def test_perceiver_training_dropout(device):
    from mmfast.nn import PerceiverResampler

    model = PerceiverResampler(32, n_latents=5, depth=2, heads=4, head_dim=16, kv_heads=2,
                               attention_dropout=0.25).to(device)
    inputs = (torch.randn(2, 9, 32, device=device),)
    evaluated = _step(model.eval(), inputs, 0, grads=False)[0]
    trained = _step(model.train(), inputs, 0)
    assert not torch.allclose(trained[0], evaluated, atol=1e-3)
    for a, b in zip(trained, _step(model, inputs, 0, backend="torch")):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_opt_decoder_attention_dropout(device):
    model = OPTDecoder(vocab_size=32, hidden_size=64, ffn_dim=40, num_hidden_layers=1, num_attention_heads=2,
                       max_position_embeddings=16, attention_dropout=0.3).to(device)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=device)
    positions = torch.cat([torch.arange(5), torch.arange(7)]).to(device)
    embeds = torch.randn(12, 64, device=device)

    def run(seed, backend=None):
        torch.manual_seed(seed)
        with _forced(backend, "attention"):
            return model(embeds, positions, cu, 7)

    model.eval()
    evaluated = run(0)
    model.train()
    trained = run(0)
    assert torch.equal(run(0), trained) and not torch.allclose(trained, evaluated, atol=1e-3)
    torch.testing.assert_close(run(0, backend="torch"), trained, atol=1e-4, rtol=1e-4)
