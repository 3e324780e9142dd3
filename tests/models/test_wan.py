"""mmfast's WanVideoModel against diffusers' WanPipeline: the tiny random preset's
components (Wan 2.1 VAE layout, UniPC flow scheduler as the published pipelines use),
saved with save_pretrained, loaded with from_pretrained, final latents and decoded frames
compared for the same prompt embeddings and seed; Wan 2.2 TI2V's per-token timesteps;
the fused flow-match step and its device-schedule loop; presets built on the meta device
against diffusers' modules of the same configs; bad sizes.

fp32 and mmfast's PyTorch backends throughout, so the tolerance is fp32 accumulation-order
noise (the model batches [uncond; cond] where the pipeline makes two calls).
"""

import copy

import pytest
import torch

import mmfast

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from mmfast.models import WanVideoModel  # noqa: E402
from mmfast.models.wan_presets import WAN_PRESETS, wan_components  # noqa: E402

VIDEO = dict(height=32, width=32, num_frames=5)  # 2 x 4 x 4 latents, 8 video tokens
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(autouse=True)
def torch_backend(request):
    if "triton" in request.node.name:  # that test runs the default dispatch (Triton, interpreted)
        yield
        return
    with mmfast.set_backend("torch"):
        yield


def _pipeline(expand_timesteps=False, scheduler=None):
    from diffusers import WanPipeline

    torch.manual_seed(0)
    parts = wan_components("wan-tiny", text_encoder=False)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=parts["vae"], transformer=parts["transformer"],
                       scheduler=scheduler or parts["scheduler"], expand_timesteps=expand_timesteps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(pipe, **flags):
    return WanVideoModel(copy.deepcopy(pipe.transformer), copy.deepcopy(pipe.vae), copy.deepcopy(pipe.scheduler),
                         expand_timesteps=pipe.config.expand_timesteps, **flags).eval()


def _embeds(batch=1, tokens=7, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(batch, tokens, 32, generator=gen),
            "negative_prompt_embeds": torch.randn(batch, tokens, 32, generator=gen)}


def _both(ours, pipe, output_type, **kwargs):
    args = dict(**_embeds(), **VIDEO, num_inference_steps=3, guidance_scale=5.0)
    args.update(kwargs)
    got = ours.generate(**args, output_type=output_type, progress=False, generator=torch.Generator().manual_seed(1))
    want = pipe(**args, output_type=output_type, generator=torch.Generator().manual_seed(1)).frames
    return got, want


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    pipe = _pipeline()
    path = tmp_path_factory.mktemp("wan") / "pipe"
    pipe.save_pretrained(path)
    return pipe, path


@pytest.mark.parametrize("output_type", ["latent", "pt"])
def test_loaded_model_matches_the_pipeline(saved, output_type):
    pipe, path = saved
    ours = WanVideoModel.from_pretrained(path)
    assert type(ours.scheduler).__name__ == "UniPCMultistepScheduler" and not ours.expand_timesteps
    got, want = _both(ours, pipe, output_type)
    shape = (1, 4, 2, 4, 4) if output_type == "latent" else (1, 5, 3, 32, 32)
    assert got.shape == want.shape == shape
    torch.testing.assert_close(got, want, **TOL)


def test_from_pretrained_round_trip_and_routing(saved, tmp_path):
    pipe, path = saved
    ours = mmfast.models.from_pretrained(path)
    assert isinstance(ours, WanVideoModel) and ours.text_encoder is None and ours.transformer_2 is None
    ours.save_pretrained(tmp_path / "again")
    again = WanVideoModel.from_pretrained(tmp_path / "again")
    for a, b in ((ours, again), (pipe, again)):
        for name in ("transformer", "vae"):
            state, other = getattr(a, name).state_dict(), getattr(b, name).state_dict()
            assert state.keys() == other.keys()
            assert all(torch.equal(state[k], other[k]) for k in state)
    import json

    index = json.loads((tmp_path / "again" / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["expand_timesteps"] is False and index["boundary_ratio"] is None
    # (diffusers' WanPipeline.from_pretrained needs accelerate for the transformer's float32
    # modules, which this environment lacks: the weights are compared above instead.)
    got, want = _both(again, pipe, "latent")
    torch.testing.assert_close(got, want, **TOL)


def test_ti2v_expand_timesteps_matches_the_pipeline():
    """Wan 2.2 TI2V: one timestep per video token (the blocks' per-token modulation)."""
    pipe = _pipeline(expand_timesteps=True)
    ours = _ours(pipe)
    seen = []
    hook = ours.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["timestep"].shape),
                                                      with_kwargs=True)
    got, want = _both(ours, pipe, "latent")
    hook.remove()
    assert seen[0] == (2, 8)  # [uncond; cond] x 8 video tokens
    torch.testing.assert_close(got, want, **TOL)


def test_fused_flow_match_step_and_device_schedule(monkeypatch):
    """A FlowMatchEuler scheduler takes mmfast's fused guided step; the CUDA graph's body
    (timestep and coefficients from a device table), run eagerly, gives the same latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = _pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    ours = _ours(pipe)
    got, want = _both(ours, pipe, "latent")
    torch.testing.assert_close(got, want, **TOL)
    monkeypatch.setattr(ours, "_capture_graphs", False)
    graphed = ours.generate(**_embeds(), **VIDEO, num_inference_steps=3, progress=False, cuda_graph=True,
                            generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(graphed, got, **TOL)


def test_second_expert_below_the_boundary():
    """Wan 2.2 A14B's two experts: transformer_2 and guidance_scale_2 below boundary_ratio (0.875,
    Wan2.2-T2V-A14B's; with flow shift 3 two of four steps fall below it)."""
    from diffusers import WanPipeline

    base = _pipeline()
    torch.manual_seed(5)
    second = wan_components("wan-tiny", text_encoder=False)["transformer"]
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=base.vae, transformer=base.transformer,
                       transformer_2=second, scheduler=base.scheduler, boundary_ratio=0.875)
    pipe.set_progress_bar_config(disable=True)
    ours = _ours(pipe, transformer_2=copy.deepcopy(second), boundary_ratio=0.875)
    calls = {"first": 0, "second": 0}
    ours.transformer.register_forward_pre_hook(lambda *a: calls.__setitem__("first", calls["first"] + 1))
    ours.transformer_2.register_forward_pre_hook(lambda *a: calls.__setitem__("second", calls["second"] + 1))
    got, want = _both(ours, pipe, "latent", num_inference_steps=4, guidance_scale_2=2.0)
    assert calls["first"] > 0 and calls["second"] > 0
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("name", list(WAN_PRESETS))
def test_presets_on_the_meta_device_match_diffusers(name):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    preset = WAN_PRESETS[name]
    with torch.device("meta"):
        ours = WanVideoModel.from_preset(name, text_encoder=False)
        reference = {"transformer": WanTransformer3DModel(**preset["transformer"]),
                     "vae": AutoencoderKLWan(**preset["vae"])}
    for part, module in reference.items():
        mine = getattr(ours, part).state_dict()
        theirs = module.state_dict()
        assert mine.keys() == theirs.keys()
        assert all(mine[k].shape == theirs[k].shape for k in mine)
    count = sum(p.numel() for p in ours.transformer.parameters())
    published = {"wan-tiny": None, "wan2.1-1.3b": 1.42e9, "wan2.2-5b": 5.0e9}[name]
    if published is not None:  # the names say 1.3B and 5B
        assert abs(count - published) / published < 0.05, count
    assert ours.expand_timesteps == (name == "wan2.2-5b")
    assert ours.vae_scale_factor == (16 if name == "wan2.2-5b" else 8) and ours.temporal_factor == 4


def test_tiny_preset_with_its_text_encoder_generates():
    model = WanVideoModel.from_preset("wan-tiny")
    assert model.text_encoder is not None
    latents = model.generate(**_embeds(), **VIDEO, num_inference_steps=2, progress=False)
    assert latents.shape == (1, 4, 2, 4, 4) and bool(latents.isfinite().all())
    with pytest.raises(ValueError, match="prompt: this model has no text encoder or tokenizer"):
        model.generate(prompt="a cat", **VIDEO, num_inference_steps=1, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_frames=4), "num_frames: 4 is not 4k \\+ 1"),
    (dict(num_frames=0), "num_frames: 0 is not 4k \\+ 1"),
    (dict(height=24), "height: 24 is not a positive multiple of 16"),
    (dict(width=40), "width: 40 is not a positive multiple of 16"),
    (dict(num_inference_steps=0), "num_inference_steps: expected a positive integer"),
    (dict(output_type="np"), "output_type: expected 'latent' or 'pt'"),
    (dict(guidance_scale_2=3.0), "guidance_scale_2: only for a model with a second expert"),
    (dict(cuda_graph=True), "cuda_graph: needs the model on a CUDA device"),
    (dict(prompt_embeds=torch.randn(1, 7, 16)), "prompt_embeds: last dimension 16 is not the transformer's "
                                                "text_dim 32"),
    (dict(negative_prompt_embeds=torch.randn(1, 5, 32)), "negative_prompt_embeds: shape \\(1, 5, 32\\) differs"),
])
def test_bad_arguments(kwargs, message):
    model = _ours(_pipeline())
    args = dict(**_embeds(), **VIDEO, num_inference_steps=1, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        model.generate(**args)


def test_unipc_graphed_denoiser_matches_host_loop(monkeypatch):
    """UniPC with cuda_graph: the guided denoiser call from a graph's static tensors (run
    eagerly here), diffusers' step between; reused by a second call."""
    pipe = _pipeline(expand_timesteps=True)
    ours = _ours(pipe)
    args = dict(**_embeds(), **VIDEO, num_inference_steps=3, progress=False)
    host = ours.generate(**args, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(ours, "_capture_graphs", False)
    graphed = ours.generate(**args, generator=torch.Generator().manual_seed(1), cuda_graph=True)
    assert len(ours._prediction_graphs) == 1
    again = ours.generate(**args, generator=torch.Generator().manual_seed(1), cuda_graph=True)
    assert len(ours._prediction_graphs) == 1
    assert torch.equal(graphed, host) and torch.equal(again, host)


@pytest.mark.gpu
def test_cuda_graphs_match_host_loop():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for scheduler in (None, FlowMatchEulerDiscreteScheduler(shift=3.0)):
        ours = _ours(_pipeline(scheduler=scheduler)).to("cuda")
        args = dict(**{k: v.cuda() for k, v in _embeds().items()}, **VIDEO, num_inference_steps=3, progress=False)
        host = ours.generate(**args, generator=torch.Generator("cuda").manual_seed(1))
        graphed = ours.generate(**args, generator=torch.Generator("cuda").manual_seed(1), cuda_graph=True)
        torch.testing.assert_close(graphed, host, **TOL)


def _char_tokenizer(folder):
    """A character-level tokenizer (a CLIP one without merges; ids inside the tiny UMT5's
    vocabulary): a real UMT5 tokenizer needs a downloaded vocabulary."""
    import json

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!")


def test_text_prompts_through_umt5_match_the_pipeline(tmp_path):
    """prompt / negative_prompt text: cleaned, padded to max_sequence_length, UMT5, the
    padding positions zeroed, as WanPipeline encodes them."""
    from diffusers import WanPipeline

    torch.manual_seed(0)
    parts = wan_components("wan-tiny")
    parts["text_encoder"].eval()  # built in training mode (dropout); a loaded one is in eval mode
    tokenizer = _char_tokenizer(tmp_path / "tok")
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=parts["text_encoder"], vae=parts["vae"],
                       transformer=parts["transformer"], scheduler=parts["scheduler"])
    pipe.set_progress_bar_config(disable=True)
    ours = WanVideoModel(copy.deepcopy(parts["transformer"]), copy.deepcopy(parts["vae"]),
                         copy.deepcopy(parts["scheduler"]), copy.deepcopy(parts["text_encoder"]), tokenizer).eval()
    text = dict(prompt=["a  cat &amp; a dog", "x"], negative_prompt="blurry", max_sequence_length=12)
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt(text["prompt"], text["negative_prompt"], max_sequence_length=12)
    assert torch.equal(ours.encode_text(text["prompt"], 12), embeds)
    assert torch.equal(ours.encode_text(["blurry"] * 2, 12), negative)
    args = dict(**text, **VIDEO, num_inference_steps=2, guidance_scale=4.0)
    got = ours.generate(**args, progress=False, generator=torch.Generator().manual_seed(1))
    want = pipe(**args, output_type="latent", generator=torch.Generator().manual_seed(1)).frames
    torch.testing.assert_close(got, want, **TOL)


def test_triton_kernels_end_to_end():
    """Every mmfast kernel of the model on Triton (interpreted on a CPU): attention (32-wide
    heads), rotary, q/k RMS norms, adaLN and gated residuals (per-token, TI2V), GELU, the
    VAE's channel RMS norms; one guided UniPC step, decoded."""
    from mmfast.profile.measure import record_backends

    pipe = _pipeline(expand_timesteps=True)
    ours = _ours(pipe)
    ran = set()
    with record_backends(ran):
        got, want = _both(ours, pipe, "pt", num_inference_steps=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert {op for op, _ in ran} >= {"attention", "adaln", "rotary", "channel_rms_norm"}, ran
    assert all(backend.startswith("triton") for _, backend in ran), ran
