"""mmfast's models on the paths a CPU without the Triton interpreter dispatches to (native
norms and activations, SDPA segment by segment; issue 18, item 6) against the libraries
they replace, as ``mmfast profile`` builds them: the same greedy ids, the same latents."""

import pytest
import torch

from mmfast.profile import ldm, vlm
from mmfast.profile.measure import record_backends
from mmfast.profile.vlm_models import MODELS, build

CPU = torch.device("cpu")


@pytest.fixture
def no_interpreter(monkeypatch):
    """Dispatch as on a plain CPU: Triton declines (it reads the variable on every call)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.parametrize("model", ["blip2", "llava", "qwen2.5-vl"])
def test_vlm_generates_the_reference_ids(model, no_interpreter):
    ours, reference, _ = build(MODELS[model], "tiny", None, CPU, torch.float32)
    batch = vlm.inputs(model, ours, 2, 56 if model == "qwen2.5-vl" else None, 9, CPU, torch.float32)
    mine, theirs = vlm.sides(ours, reference, batch)
    ran = set()
    with record_backends(ran):
        ids = mine.generate(6)
    torch.testing.assert_close(ids, theirs.generate(6), rtol=0, atol=0)
    backends = dict(ran)
    assert backends["norm"] == "native" and backends["activation"] == "native", ran
    assert backends["attention"] == "sdpa", ran


def test_ldm_denoises_like_diffusers(no_interpreter):
    ours, pipe, _ = ldm.build("tiny", None, CPU, torch.float32)
    mine, theirs = ldm.sides(ours, pipe, 1, ldm.default_resolution(ours), 3, 7.5)
    ran = set()
    with record_backends(ran):
        latents = mine.generate("latent")
    torch.testing.assert_close(latents, theirs.generate("latent"), rtol=1e-4, atol=1e-4)
    backends = dict(ran)
    assert backends["group_norm"] == "native" and backends["norm"] == "native", ran
    assert backends["attention"] == "sdpa", ran
