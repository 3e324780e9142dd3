"""``generate(cuda_graph=True)``: the captured decode step's body, run eagerly on the CPU
(as the CUDA graph would replay it), gives exactly the ids of the host-driven loop for the
three VLMs on padded batches (left padding: the KV cache holds sequences of different
lengths), with end-of-sequence stops checked every few replays; sampling draws the same
ids; a CPU model refuses cuda_graph; a GPU test captures the real graph."""

import pytest
import torch

from mmfast.dispatch import set_backend
from mmfast.models import decode_graph
from mmfast.models.kv_cache import KVCache
from mmfast.models.blip2 import Blip2ForConditionalGeneration
from mmfast.models.generation import draw
from mmfast.models.llava import LlavaForConditionalGeneration
from mmfast.models.qwen25_vl import Qwen25VLForConditionalGeneration
from mmfast.profile.vlm_models import MODELS

CLASSES = {"qwen2.5-vl": Qwen25VLForConditionalGeneration, "llava": LlavaForConditionalGeneration,
           "blip2": Blip2ForConditionalGeneration}
NEW_TOKENS = 6


def _model(name, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    return CLASSES[name].from_preset("tiny").to(device, dtype).eval()


def _padded_batch(name, model, device="cpu", dtype=torch.float32) -> dict:
    """Two prompts of different lengths: two extra text tokens lead the first, two pad
    tokens (masked out) the second."""
    kwargs = dict(MODELS[name].batch(model, 2, 28, 6, device, dtype).ours)
    ids = kwargs["input_ids"]
    lead = torch.tensor([[5, 7], [0, 0]], device=device, dtype=ids.dtype)
    kwargs["input_ids"] = torch.cat([lead, ids], dim=1)
    kwargs["attention_mask"] = torch.cat([torch.tensor([[1, 1], [0, 0]], device=device), torch.ones_like(ids)], dim=1)
    return kwargs


@pytest.fixture(params=list(CLASSES))
def eager_body(request, monkeypatch):
    """(name, model, batch) with cuda_graph=True running the graph's body eagerly, and
    the end-of-sequence test every 2 replays (so that it falls mid-generation)."""
    model = _model(request.param)
    monkeypatch.setattr(model._decode_graphs, "capture", False)
    monkeypatch.setattr(decode_graph, "EOS_CHECK_EVERY", 2)
    return request.param, model, _padded_batch(request.param, model)


def test_body_gives_the_host_loops_ids(eager_body):
    name, model, batch = eager_body
    host = model.generate(**batch, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    assert host.shape[1] == batch["input_ids"].shape[1] + NEW_TOKENS
    assert torch.equal(model.generate(**batch, max_new_tokens=NEW_TOKENS, eos_token_id=[], cuda_graph=True), host)

    # End of sequence: the first sequence ends by its 2nd new token, the second by its
    # 4th (earlier where the random model repeats itself), so both loops stop after at
    # most 4 tokens; the graph side runs on to its next check and cuts back.
    new = host[:, batch["input_ids"].shape[1]:]
    settings = dict(max_new_tokens=NEW_TOKENS, eos_token_id=[int(new[0, 1]), int(new[1, 3])], pad_token_id=3)
    want = model.generate(**batch, **settings)
    assert want.shape[1] < host.shape[1]
    got = model.generate(**batch, **settings, cuda_graph=True)
    assert torch.equal(got, want)
    held = model._decode_graphs._held
    assert torch.equal(model.generate(**batch, **settings, cuda_graph=True), want)  # the held step again
    assert model._decode_graphs._held is held


def test_body_samples_the_host_loops_ids(eager_body):
    # Eagerly the body draws from the generator in the host loop's order: same ids.
    _, model, batch = eager_body
    settings = dict(max_new_tokens=5, eos_token_id=[], do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    want = model.generate(**batch, **settings, generator=torch.Generator().manual_seed(4))
    got = model.generate(**batch, **settings, generator=torch.Generator().manual_seed(4), cuda_graph=True)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["triton", "sdpa", "torch"])
def test_static_decode_step_attends_like_the_gather_path(backend):
    # Lengths 3 and 150 (capacity 160): the static step reads the whole buffer as 2B
    # segments (one with the query, one skipped) through cross_attention (keys split over
    # programs); the planned step gathers the valid keys for causal attention.
    g = torch.Generator().manual_seed(0)
    hq, hk, d = 4, 2, 32
    prompt_k, prompt_v = (torch.randn(153, hk, d, generator=g) for _ in range(2))
    q, k, v = (torch.randn(2, h, d, generator=g) for h in (hq, hk, hk))
    one_each = torch.arange(3, dtype=torch.int32)
    outputs = []
    for static in (False, True):
        cache = KVCache(1, 2, 160, hk, d, dtype=torch.float32)
        prompt = cache.plan([3, 150])
        cache.update(0, prompt, prompt_k, prompt_v)
        cache.advance(prompt)
        if static:
            cache.start_decoding()
        step = cache.plan([1, 1])
        with set_backend(backend, op="cross_attention"):
            outputs.append(cache.attend(0, step, q, k, v, one_each, 1))
        cache.advance(step)
        assert (cache.device_lengths.tolist() if static else cache.lengths) == [4, 151]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


def test_static_decode_plan_bad_input():
    cache = KVCache(1, 2, 4, 1, 8, dtype=torch.float32)
    cache.advance(cache.plan([3, 1]))
    cache.start_decoding()
    with pytest.raises(ValueError, match="one token per sequence"):
        cache.plan([2, 1])
    cache.advance(cache.plan([1, 1]))
    with pytest.raises(ValueError, match="exceed the capacity 4"):
        cache.plan([1, 1])


def test_draw_is_multinomials_sample():
    probs = torch.softmax(torch.randn(4, 100, generator=torch.Generator().manual_seed(0)), -1)
    want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(1)).view(-1)
    assert torch.equal(draw(probs, torch.Generator().manual_seed(1)), want)


def test_cuda_graph_needs_cuda():
    model = _model("llava")
    with pytest.raises(ValueError, match="cuda_graph: needs the model on a CUDA device"):
        model.generate(**_padded_batch("llava", model), max_new_tokens=2, cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_graph_matches_host_loop(name, dtype):
    model = _model(name, "cuda", dtype)
    batch = _padded_batch(name, model, "cuda", dtype)
    want = model.generate(**batch, max_new_tokens=24, eos_token_id=[])
    assert torch.equal(model.generate(**batch, max_new_tokens=24, eos_token_id=[], cuda_graph=True), want)
    assert model._decode_graphs._held.graph is not None
    assert torch.equal(model.generate(**batch, max_new_tokens=24, eos_token_id=[], cuda_graph=True), want)
    # Sampling: a CUDA generator registered with the graph gives reproducible ids.
    settings = dict(max_new_tokens=24, eos_token_id=[], do_sample=True, top_k=20, cuda_graph=True)
    first = model.generate(**batch, **settings, generator=torch.Generator("cuda").manual_seed(3))
    again = model.generate(**batch, **settings, generator=torch.Generator("cuda").manual_seed(3))
    assert torch.equal(first, again)
