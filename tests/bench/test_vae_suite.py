"""The vae suite: registered, its cases, its GroupNorm byte model checked against the
GroupNorm inputs of a real (tiny) decode, and a CPU run that says why it skips."""

import pytest
import torch

import mmfast
from mmfast.bench import suites
from mmfast.bench.suites import vae as vae_suite


def test_registered_cases_and_providers():
    suite = suites.get("vae")
    assert [p.name for p in suite.providers] == ["diffusers-eager", "diffusers-compile", "mmfast", "mmfast-cl"]
    names = [c.name for c in suite.cases(False, torch.device("cuda"))]
    assert names == [f"{v}-{p}-{d}" for v, p in (("sd15", 512), ("sd15", 1024), ("sd3", 1024))
                     for d in ("float16", "bfloat16")]


def test_groupnorm_model_counts_what_a_decode_normalises():
    diffusers = pytest.importorskip("diffusers")
    config = dict(vae_suite._COMMON, block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    vae = diffusers.AutoencoderKL(**config).eval()
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(args[0].numel()))
             for m in vae.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    with torch.no_grad():
        vae.decode(torch.randn(1, 4, 3, 3))
    for hook in hooks:
        hook.remove()
    assert sum(seen) == vae_suite.decoder_groupnorm_elements(config, 3)


def test_cpu_run_skips_with_the_reason(capsys):
    assert mmfast.bench.main(["vae", "--quick", "--no-save"]) == 0
    out = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert "needs a CUDA device" in out or "diffusers is not installed" in out
