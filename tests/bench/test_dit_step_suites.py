"""The flux_transformer_step, wan_transformer_step and wan_vae_decode suites: registered
with their sides and issue 20's goals; the GPU cases at the published models' shapes and
their FLOP counts; models built on the device the way ``from_pretrained(torch_dtype=...)``
leaves them; on a CPU the mmfast-patched side computes what diffusers computes on the
tiny cases (the Triton interpreter); every side skips with the reason when diffusers is
missing. Timings are not checked: they mean something only on a GPU."""

import sys

import pytest
import torch

from mmfast.bench import suites
from mmfast.bench.suites import flux_transformer_step as flux
from mmfast.bench.suites import wan_transformer_step as wan
from mmfast.bench.suites import wan_vae_decode as wan_vae
from mmfast.bench.suites.diffusers_models import build_model

NAMES = ("flux_transformer_step", "wan_transformer_step", "wan_vae_decode")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_registered_with_their_sides_and_goals():
    for name in NAMES:
        suite = suites.get(name)
        assert [p.name for p in suite.providers] == ["mmfast-patched", "diffusers-eager", "diffusers-compile"]
        assert [(g.provider, g.baselines) for g in suite.speedups] == [("mmfast-patched", ("diffusers-eager",))]
    ratios = {name: suites.get(name).speedups[0].min_ratio for name in NAMES}
    assert ratios == {"flux_transformer_step": 1.6, "wan_transformer_step": 1.5, "wan_vae_decode": 2.0}
    (latency,) = suites.get("flux_transformer_step").latencies
    assert latency.max_ms == pytest.approx(4300 / 28) and latency.where == {"model": "flux1-dev", "full": True}


def test_flux_cases_at_flux1_dev_1024px():
    cases = {c.name: c for c in flux.cases(False, CUDA)}
    assert list(cases) == ["flux1-dev-1024px-2+4blocks", "flux1-dev-1024px-19+38blocks"]
    full = cases["flux1-dev-1024px-19+38blocks"]
    assert full.params["full"] and not cases["flux1-dev-1024px-2+4blocks"].params["full"]
    assert (full.params["image_tokens"], full.params["text_tokens"]) == (4096, 512)
    assert [c.name for c in flux.cases(True, CUDA)] == ["flux1-dev-1024px-2+4blocks"]
    assert abs(full.flops / 1e12 - 74.4) < 0.1  # 57 blocks of 24 D^2 per token + 4 N^2 D: dominant
    inputs = full.make_inputs(CPU)
    assert inputs["hidden_states"].shape == (1, 4096, 64) and inputs["encoder_hidden_states"].shape == (1, 512, 4096)
    assert inputs["img_ids"].shape == (4096, 3) and inputs["txt_ids"].shape == (512, 3)


def test_flux_image_ids_are_the_pipelines_rows_and_columns():
    ids = flux._image_ids(3, CPU, torch.float32)
    assert ids.tolist() == [[0, r, c] for r in range(3) for c in range(3)]


def test_wan_cases_at_480p_33_frames():
    cases = {c.name: c for c in wan.cases(False, CUDA)}
    assert list(cases) == ["wan2.1-1.3b-480p-33f-4layers", "wan2.1-1.3b-480p-33f-30layers"]
    full = cases["wan2.1-1.3b-480p-33f-30layers"]
    assert full.params["latent"] == [9, 60, 104] and full.params["video_tokens"] == 9 * 30 * 52 == 14040
    assert abs(full.flops / 1e12 - 72.9) < 0.1
    assert full.make_inputs(CPU)["hidden_states"].shape == (1, 16, 9, 60, 104)
    with pytest.raises(ValueError, match="frames"):
        wan.latent_shape(32, 480, 832)


def test_wan_vae_cases_and_the_deferred_compile():
    names = [c.name for c in wan_vae.cases(False, CUDA)]
    assert names == [f"wan2.1-vae-480p-{f}f-{d}" for f in (9, 33) for d in ("float32", "bfloat16")]
    latents = wan_vae.cases(False, CUDA)[2].make_inputs(CPU)
    assert latents.shape == (1, 16, 9, 60, 104) and latents.dtype == torch.float32


def _gemm_flops(model, inputs: dict, left_out: tuple[str, ...]) -> int:
    """2 x multiply-adds of every Linear and Conv3d one forward runs, but those under
    ``left_out`` (the per-sample embedders the FLOP models leave out)."""
    total = 0

    def count(module, args, out):
        nonlocal total
        if isinstance(module, torch.nn.Linear):
            total += 2 * args[0].numel() // module.in_features * module.in_features * module.out_features
        else:
            total += 2 * out.numel() * module.weight[0].numel()

    hooks = [m.register_forward_hook(count) for name, m in model.named_modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)) and not name.startswith(left_out)]
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    return total


def test_flop_models_count_every_gemm_of_a_forward_plus_the_attention():
    pytest.importorskip("diffusers")
    (case,) = flux.cases(False, CPU)
    model = flux.make_model(case.params, CPU)
    n, d = case.params["image_tokens"] + case.params["text_tokens"], 2 * 32
    attention = 3 * 4 * n * n * d  # 1 + 2 blocks of joint attention
    assert case.flops == _gemm_flops(model, case.make_inputs(CPU), ("time_text_embed",)) + attention

    (case,) = wan.cases(False, CPU)
    model = wan.make_model(case.params, CPU)
    n, t, d = case.params["video_tokens"], case.params["text_tokens"], 2 * 32
    attention = 2 * (4 * n * n * d + 4 * n * t * d)  # 2 blocks of self- and cross-attention
    left_out = ("condition_embedder.time_embedder", "condition_embedder.time_proj")
    assert case.flops == _gemm_flops(model, case.make_inputs(CPU), left_out) + attention


def test_the_real_configs_build_the_published_parameter_counts():
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKLWan, FluxTransformer2DModel, WanTransformer3DModel

    meta = torch.device("meta")
    count = lambda cls, config: sum(p.numel() for p in build_model(lambda: cls(**config), meta, torch.bfloat16)
                                    .parameters())
    assert abs(count(FluxTransformer2DModel, flux.FLUX1_DEV) / 1e9 - 11.9) < 0.05  # FLUX.1-dev: 11.9B
    assert abs(count(WanTransformer3DModel, wan.WAN21_T2V_1_3B) / 1e9 - 1.42) < 0.02  # "1.3B": 1.42B
    assert abs(count(AutoencoderKLWan, wan_vae.WAN21_VAE) / 1e6 - 127) < 1  # Wan 2.1 VAE: 127M


def test_models_are_built_as_from_pretrained_leaves_them():
    pytest.importorskip("diffusers")
    model = wan.make_model({"model": "tiny", "layers": 2, "dtype": "bfloat16"}, CPU)
    fp32 = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    assert fp32 and all(any(part in model._keep_in_fp32_modules for part in n.split(".")) for n in fp32)
    assert "blocks.0.scale_shift_table" in fp32 and "blocks.0.attn1.to_q.weight" not in fp32
    assert all(b.dtype == torch.float32 for b in model.buffers())  # the rotary tables ("rope")
    again = wan.make_model({"model": "tiny", "layers": 2, "dtype": "bfloat16"}, CPU)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


@pytest.mark.slow  # a few seconds each: the patched models' kernels on the Triton interpreter
@pytest.mark.parametrize("name", NAMES)
def test_mmfast_patched_computes_what_diffusers_computes_on_the_cpu_case(name):
    pytest.importorskip("diffusers")
    suite = suites.get(name)
    (case,) = suite.cases(False, CPU)
    inputs = case.make_inputs(CPU)
    got = suite.provider("mmfast-patched").build(case)(inputs)
    want = suite.provider("diffusers-eager").build(case)(inputs)
    assert got.shape == want.shape and want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert "torch.compile on CPU" in suite.provider("diffusers-compile").skip(case, CPU)


def test_every_side_skips_with_the_reason_without_diffusers(monkeypatch, tmp_path):
    from mmfast import dispatch
    from mmfast.bench import evidence_worker

    monkeypatch.setitem(dispatch._module_found, "diffusers", False)
    for name in NAMES:
        suite = suites.get(name)
        for case in suite.cases(False, CUDA) + suite.cases(False, CPU):
            for provider in suite.providers:
                assert provider.skip(case, CUDA) == "diffusers is not installed"
    # a diffusers that is there but does not import (a carried wheel without its requirements)
    monkeypatch.setitem(dispatch._module_found, "diffusers", True)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    reason = suites.get("flux_transformer_step").providers[0].skip(flux.cases(False, CUDA)[0], CUDA)
    assert reason.startswith("diffusers does not import here: ModuleNotFoundError")
    monkeypatch.setitem(dispatch._module_found, "diffusers", False)
    # as the evidence run's worker records it: skipped, with the reason
    case = suites.get("wan_vae_decode").cases(True, CPU)[0]
    status, rows = evidence_worker.run_bench(
        {"suite": "wan_vae_decode", "case": case.name, "provider": "mmfast-patched"},
        evidence_worker.BenchContext(tmp_path, "x", quick=True))
    assert status == "skipped" and rows[0]["reason"] == "diffusers is not installed"
