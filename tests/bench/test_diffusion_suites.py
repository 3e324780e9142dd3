"""The group_norm and diffusion_unet suites: registered, cases and byte model, and a
CPU smoke run that runs what it can and says why it skips the rest."""

import torch

import mmfast
from mmfast.bench import suites

HAS_CUDA = torch.cuda.is_available()


def test_registered_with_their_providers():
    assert {"group_norm", "diffusion_unet"} <= set(suites.names())
    assert [p.name for p in suites.get("group_norm").providers] == ["mmfast-triton", "torch-eager", "torch-compile"]
    assert "diffusers-cl-compile" in [p.name for p in suites.get("diffusion_unet").providers]


def test_group_norm_cases_cover_unet_shapes_layouts_and_passes():
    cases = suites.get("group_norm").cases(False, torch.device("cuda"))
    assert {c.params["layout"] for c in cases} == {"nchw", "nhwc"}
    assert {c.params["pass"] for c in cases} == {"fwd", "fwd+bwd"}
    first = next(c for c in cases if c.name == "gn-silu-fwd-nchw-2x320x64x64-fp16")
    assert first.bytes == 2 * (2 * 320 * 64 * 64) * 2  # read x, write y; fp16


def test_diffusion_unet_says_why_it_skips_on_cpu():
    suite = suites.get("diffusion_unet")
    case = suite.cases(True, torch.device("cpu"))[0]
    reason = suite.provider("mmfast").skip(case, torch.device("cpu"))
    assert reason and ("CUDA" in reason or "diffusers" in reason)


def test_smoke_run(capsys):
    assert mmfast.bench.main(["group_norm", "--quick", "--no-save", "--case", "^gn-silu-fwd-nhwc",
                              "--provider", "torch-eager"]) == 0
    out = capsys.readouterr().out
    assert "torch-eager" in out and "FAILED" not in out
