"""The wan_vae_norm suite: registered, its cases, and its baseline doing what diffusers'
WanRMS_norm + SiLU does (and the mmfast provider the same), so that the ratio measured is
the one a Wan VAE user sees."""

import pytest
import torch

from mmfast.bench import suites
from mmfast.bench.suites import wan_vae_norm


def test_registered_cases_and_providers():
    suite = suites.get("wan_vae_norm")
    assert [p.name for p in suite.providers] == ["mmfast-triton", "diffusers-eager", "torch-compile"]
    names = [c.name for c in suite.cases(False, torch.device("cuda"))]
    assert names == [f"wan-rms-silu-fwd-1x{c}x{t}x{h}x{w}-bfloat16" for c, t, h, w in wan_vae_norm.DECODER_SHAPES]
    case = suite.cases(False, torch.device("cuda"))[-1]
    assert case.bytes == 2 * 96 * 4 * 480 * 832 * 2


def test_baseline_and_mmfast_provider_are_diffusers_math():
    pytest.importorskip("diffusers")
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    suite = suites.get("wan_vae_norm")
    case = suite.cases(True, torch.device("cpu"))[0]
    inputs = case.make_inputs(torch.device("cpu"))
    norm = WanRMS_norm(case.params["channels"], images=False)
    with torch.no_grad():
        norm.gamma.copy_(inputs.gamma.view(-1, 1, 1, 1))
        want = torch.nn.functional.silu(norm(inputs.x))
    providers = {p.name: p for p in suite.providers}
    torch.testing.assert_close(providers["diffusers-eager"].build(case)(inputs), want, rtol=0, atol=0)
    torch.testing.assert_close(providers["mmfast-triton"].build(case)(inputs), want, rtol=1e-5, atol=1e-6)
