"""``mmfast profile`` runs end to end on a CPU (tiny presets, a couple of tokens/steps) and
writes the JSON it promises; bad arguments are refused with messages naming them. The
measuring (stopping rule, interleaving, spreads, verdicts, time to first token inside the
generate call) is tested with a fake clock, so deterministically.

The mmfast side runs its ops' PyTorch backends (``--backend torch``): the test suite sets
TRITON_INTERPRET on CPU machines, under which a single tiny UNet evaluation takes seconds.
"""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from mmfast.cli import main  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    # These models are far too small for intra-op threads; on a busy shared CPU two threads
    # spin against other processes and the runs take several times longer.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


COMMON = ["--repeats", "1", "--backend", "torch", "--dtype", "float32", "--top", "5"]


def _results(out, kind):
    written = sorted(out.glob(f"profile_{kind}_*.json"))
    assert len(written) == 1, written
    data = json.loads(written[0].read_text())
    assert data["kind"] == kind and data["gpu_numbers"] is False and data["device"] == "cpu"
    assert [side["name"].split()[0] for side in data["sides"]] == ["mmfast", kind == "vlm" and "transformers"
                                                                   or "diffusers"]
    for side in data["sides"]:
        assert side["metrics"]["peak_memory_gib"] is None  # no allocator statistics on a CPU
        assert 0 < len(side["ops"]) <= 5 and all(op["self_ms"] > 0 and op["calls"] > 0 for op in side["ops"])
    rounds = data["measurement"]["rounds"]
    for side in data["sides"]:  # every figure keeps every sample, one per timed round
        for key, figure in side["metrics"].items():
            if figure is not None and key != "peak_memory_gib":
                assert figure["n"] == rounds == len(figure["samples"]), key
                assert figure["min"] <= figure["q1"] <= figure["median"] <= figure["q3"] <= figure["max"]
    assert data["speedup"]["median"] > 0 and isinstance(data["speedup"]["differs"], bool)
    assert data["backend_override"] == "torch"
    assert data["backends_ran"] and all(entry.endswith("=torch") for entry in data["backends_ran"])
    return data


def test_vlm_tiny_end_to_end(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    # Two new tokens: one decode step. Time to first token is stamped inside each generate
    # call, so it is below that call's time and decode tokens/s exists in every sample.
    assert main(["profile", "vlm", "--preset", "tiny", "--new-tokens", "2", "--text-tokens", "5", "--batch", "2",
                 "--out", str(tmp_path), "--trace", str(trace), *COMMON, "--repeats", "3"]) == 0  # the last wins
    data = _results(tmp_path, "vlm")
    assert (data["batch"], data["new_tokens"], data["resolution"]) == (2, 2, 56)
    assert (data["text_tokens"], data["prompt_tokens"]) == (5, 5 + 1 + 4)  # text, vision start, 2x2 merged patches
    assert data["measurement"]["rounds"] == 3 and data["measurement"]["stopped"] == "max_repeats"
    for side in data["sides"]:
        m = side["metrics"]
        first, full = m["time_to_first_token_s"]["samples"], m["generate_s"]["samples"]
        assert all(0 < f < g for f, g in zip(first, full))
        assert m["decode_tokens_per_s"]["samples"] == [2 * 1 / (g - f) for f, g in zip(first, full)]
        assert m["images_per_s"]["median"] > 0 and m["prefill_tokens_per_s"]["median"] > m["images_per_s"]["median"]
    assert any(entry.startswith("attention=") for entry in data["backends_ran"])
    assert json.loads(trace.read_text())["traceEvents"] and (tmp_path / "trace.reference.json").is_file()
    assert sorted(path.name for path in tmp_path.glob("profile_*")) == ["profile_vlm_qwen2.5-vl_tiny.json",
                                                                      "profile_vlm_qwen2.5-vl_tiny.png"]
    printed = capsys.readouterr().out
    assert "NOT GPU NUMBERS" in printed and "decode tok/s (higher is better)" in printed
    assert "mmfast backends that ran" in printed and "3 timed rounds" in printed
    assert f"wrote {tmp_path / 'profile_vlm_qwen2.5-vl_tiny.png'}" in printed
    verdict = printed.split("mmfast vs transformers (sdpa)")[1].splitlines()[1]
    assert verdict.startswith("  generate (s): ") and ("no difference measured" in verdict or "x, " in verdict)


def test_ldm_tiny_end_to_end(tmp_path, capsys):
    assert main(["profile", "ldm", "--preset", "tiny", "--steps", "1", "--batch", "1", "--out", str(tmp_path), *COMMON]) == 0
    data = _results(tmp_path, "ldm")
    assert (data["steps"], data["resolution"]) == (1, 16)
    for side in data["sides"]:
        m = side["metrics"]
        assert m["it_per_s"]["median"] > 0 and m["s_per_image"]["median"] > 0
        assert m["it_per_s"]["samples"] == [1 / s for s in m["denoise_s"]["samples"]]
        # Denoising is stamped inside the end-to-end call, as the VAE's decoder starts.
        assert all(0 < d < e for d, e in zip(m["denoise_s"]["samples"], m["end_to_end_s"]["samples"]))
    assert "StableDiffusionPipeline" in " ".join(data["notes"])
    assert "it/s" in capsys.readouterr().out


def test_ldm_sd3_tiny_end_to_end(tmp_path):
    assert main(["profile", "ldm", "--preset", "sd3-tiny", "--steps", "1", "--out", str(tmp_path), *COMMON]) == 0
    data = _results(tmp_path, "ldm")
    assert (data["preset"], data["steps"], data["resolution"]) == ("sd3-tiny", 1, 16)
    assert data["sides"][1]["name"] == "diffusers StableDiffusion3Pipeline"
    assert all(side["metrics"]["it_per_s"]["median"] > 0 for side in data["sides"])
    assert any(entry.startswith("adaln=") for entry in data["backends_ran"])  # the MM-DiT blocks are mmfast's


def test_ldm_sd3_from_checkpoint(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from mmfast.models.sd3_presets import sd3_components

    pipe = StableDiffusion3Pipeline(**sd3_components("sd3-tiny", text_encoder_3=False), tokenizer=None,
                                    tokenizer_2=None, tokenizer_3=None)
    pipe.save_pretrained(tmp_path / "sd3", safe_serialization=True)
    assert main(["profile", "ldm", "--checkpoint", str(tmp_path / "sd3"), "--steps", "1", "--out", str(tmp_path),
                 *COMMON]) == 0
    data = _results(tmp_path, "ldm")
    assert data["preset"] is None and data["sides"][1]["name"] == "diffusers StableDiffusion3Pipeline"


@pytest.mark.parametrize("kind, preset, extra", [("vlm", "tiny", ["--new-tokens", "2"]),
                                                  ("ldm", "tiny", ["--steps", "1"])])
def test_compiled_reference_side(kind, preset, extra, tmp_path, capsys, monkeypatch):
    # aot_eager: the compile path without the minutes of C++ that inductor builds on a CPU.
    from torch._dynamo.utils import counters

    monkeypatch.setattr("mmfast.profile.COMPILE_BACKEND", "aot_eager")
    counters.clear()
    assert main(["profile", kind, "--preset", preset, "--compile-reference", "--out", str(tmp_path),
                 *extra, *COMMON]) == 0
    data = json.loads(next(tmp_path.glob(f"profile_{kind}_*.json")).read_text())
    names = [side["name"] for side in data["sides"]]
    assert len(names) == 3 and names[2] == f"{names[1]} + torch.compile" and data["compile_reference"]
    assert counters["stats"]["unique_graphs"] > 0  # the third side really ran compiled code
    for side in data["sides"][1:]:
        assert all(ratio["median"] > 0 for ratio in side["mmfast_speedup"].values() if ratio is not None)
    assert data["speedups"] == data["sides"][1]["mmfast_speedup"]
    printed = capsys.readouterr().out
    assert f"mmfast vs {names[2]} (" in printed and "(backend 'aot_eager')" in printed


@pytest.mark.parametrize("argv, message", [
    (["vlm", "--preset", "70b"], "invalid choice: '70b'"),
    (["ldm", "--preset", "7b"], "invalid choice: '7b'"),
    (["vlm", "--checkpoint", "/no/such/dir"], "--checkpoint: /no/such/dir is not a directory"),
    (["ldm", "--batch", "0"], "expected a positive integer"),
    (["vlm", "--backend", "warp"], "--backend: no op family has a backend 'warp'"),
    (["vlm", "--preset", "tiny", "--checkpoint", "."], "--preset/--checkpoint: give one or the other"),
    (["ldm", "--cuda-graph"], "--cuda-graph: needs a CUDA device"),
    (["vlm", "--cuda-graph"], "--cuda-graph: needs a CUDA device"),
    (["vlm", "--model", "llava", "--preset", "7b"], "--preset: llava has no preset '7b' (its presets: llava-1.5-7b"),
    (["vlm", "--model", "blip2", "--resolution", "64", *COMMON], "--resolution: blip2's vision tower takes 16 px"),
    (["vlm", "--repeats", "3", "--max-repeats", "4"], "--repeats: gives the exact number of timed rounds; "
                                                     "leave out --max-repeats"),
    (["vlm", "--min-repeats", "9", "--max-repeats", "4"], "--min-repeats: 9 is more than --max-repeats 4"),
    (["ldm", "--time-budget", "0"], "expected a positive number, got 0"),
    (["ldm", "--warmup", "-1"], "expected 0 or a positive integer, got -1"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_checkpoint_without_config_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["profile", "ldm", "--checkpoint", str(tmp_path)])
    assert "not a diffusers pipeline directory (no model_index.json" in capsys.readouterr().err


def test_vlm_from_checkpoint(tmp_path):
    import torch

    from mmfast.models import Qwen25VLForConditionalGeneration

    torch.manual_seed(0)
    Qwen25VLForConditionalGeneration.from_preset("tiny").save_pretrained(tmp_path / "model")
    assert main(["profile", "vlm", "--checkpoint", str(tmp_path / "model"), "--new-tokens", "2",
                 "--out", str(tmp_path), *COMMON]) == 0
    data = _results(tmp_path, "vlm")
    assert data["preset"] is None and data["model"] == f"qwen2.5-vl, checkpoint {tmp_path / 'model'}"


@pytest.mark.parametrize("model", ["llava", "blip2"])
def test_vlm_llava_and_blip2_tiny_end_to_end(model, tmp_path, capsys):
    assert main(["profile", "vlm", "--model", model, "--new-tokens", "2", "--out", str(tmp_path), *COMMON]) == 0
    data = _results(tmp_path, "vlm")
    assert (data["vlm_model"], data["preset"], data["resolution"]) == (model, "tiny", {"llava": 28, "blip2": 16}[model])
    assert all(side["metrics"]["time_to_first_token_s"]["median"] > 0 for side in data["sides"])
    assert (tmp_path / f"profile_vlm_{model}_tiny.json").is_file()  # its own file set, per model
    architecture = {"llava": "LlavaForConditionalGeneration", "blip2": "Blip2ForConditionalGeneration"}[model]
    assert f"reference: transformers {architecture}" in capsys.readouterr().out


@pytest.mark.parametrize("model", ["qwen2.5-vl", "llava", "blip2"])
def test_vlm_sides_generate_the_same_tokens(model):
    # The two sides hold the same weights: greedy decoding gives the same ids.
    import torch

    import mmfast
    from mmfast.profile import vlm

    cpu = torch.device("cpu")
    ours, reference, _ = vlm.build(vlm.MODELS[model], "tiny", None, cpu, torch.float32)
    batch = vlm.inputs(model, ours, 2, 56 if model == "qwen2.5-vl" else None, 16, cpu, torch.float32)
    ours_side, reference_side = vlm.sides(ours, reference, batch)
    with mmfast.set_backend("torch"):
        got = ours_side.generate(3)
    assert got.shape == (2, batch.input_ids.shape[1] + 3)
    assert torch.equal(got, reference_side.generate(3))


def test_vlm_checkpoint_says_which_model(tmp_path, capsys):
    import torch

    from mmfast.models import LlavaForConditionalGeneration

    torch.manual_seed(0)
    LlavaForConditionalGeneration.from_preset("tiny").save_pretrained(tmp_path / "llava")
    assert main(["profile", "vlm", "--checkpoint", str(tmp_path / "llava"), "--new-tokens", "2",
                 "--out", str(tmp_path), *COMMON]) == 0
    assert _results(tmp_path, "vlm")["vlm_model"] == "llava"
    with pytest.raises(SystemExit):
        main(["profile", "vlm", "--model", "blip2", "--checkpoint", str(tmp_path / "llava")])
    assert "--model: blip2 given, but the checkpoint holds a llava model" in capsys.readouterr().err


def test_vlm_model_and_preset_defaults():
    from argparse import Namespace

    from mmfast.profile import vlm

    for preset, model, on_gpu, want in ((None, None, True, ("qwen2.5-vl", "7b")),
                                        (None, "llava", True, ("llava", "llava-1.5-7b")),
                                        (None, "blip2", False, ("blip2", "tiny")),
                                        ("opt-2.7b", None, False, ("blip2", "opt-2.7b")),  # only BLIP-2 has it
                                        ("tiny", None, False, ("qwen2.5-vl", "tiny"))):
        args = Namespace(checkpoint=None, model=model, preset=preset)
        vlm.choose_model(args, on_gpu)
        assert (args.model, args.preset) == want


# ---- measuring, with a fake clock ---------------------------------------------------------


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _sampler(name, clock, durations, log):
    """A side whose n-th timed call takes durations[n % len] seconds of the fake clock."""
    calls = iter(range(10**6))

    def sample():
        seconds = durations[next(calls) % len(durations)]
        log.append(name)
        clock.now += seconds
        return {"t": seconds}
    return sample


def _plan(**overrides):
    from mmfast.profile.measure import Plan

    return Plan(**{"warmup": 1, "min_repeats": 3, "max_repeats": 10, "budget_s": 100.0, "target_spread": 0.05,
                   **overrides})


def test_rounds_interleave_the_sides_after_warm_up():
    from mmfast.profile.measure import interleaved

    clock, log = FakeClock(), []
    sides = [_sampler(name, clock, [1.0], log) for name in "ABC"]
    measured = interleaved(sides, _plan(warmup=2), clock=clock)
    assert log == list("ABC") * (2 + 3)  # two warm-up rounds, then the minimum: the spread is 0
    assert (measured.rounds, measured.stopped, measured.seconds) == (3, "spread", 9.0)
    assert measured.samples == [{"t": [1.0, 1.0, 1.0]}] * 3  # warm-up calls are not samples


def test_noisy_sides_run_until_the_time_budget():
    from mmfast.profile.measure import interleaved

    clock, log = FakeClock(), []
    sides = [_sampler("A", clock, [1.0, 1.0, 2.0], log), _sampler("B", clock, [1.0], log)]
    # Warm-up takes A's first duration; the timed rounds take 1+1, 2+1, 1+1, 1+1 seconds: 9 >= 8
    # after the fourth (A's middle half stays 25% or more of its median: never small enough).
    measured = interleaved(sides, _plan(budget_s=8.0), clock=clock)
    assert (measured.rounds, measured.stopped, measured.seconds) == (4, "budget", 9.0)
    assert measured.samples[0]["t"] == [1.0, 2.0, 1.0, 1.0] and measured.samples[1]["t"] == [1.0] * 4


def test_min_and_max_repeats_bound_the_rounds():
    from mmfast.profile.measure import interleaved

    clock = FakeClock()
    noisy = [_sampler("A", clock, [1.0, 3.0], [])]
    assert interleaved(noisy, _plan(budget_s=0.5, min_repeats=5), clock=clock).rounds == 5  # past the budget
    capped = interleaved(noisy, _plan(max_repeats=6), clock=clock)
    assert (capped.rounds, capped.stopped) == (6, "max_repeats")


@pytest.mark.parametrize("overrides, message", [
    ({"warmup": -1}, "warmup: expected 0 or more"),
    ({"min_repeats": 0}, "min_repeats, max_repeats: expected 1 <= min_repeats <= max_repeats"),
    ({"min_repeats": 4, "max_repeats": 3}, "got 4 and 3"),
    ({"budget_s": 0.0}, "budget_s: expected a positive number"),
    ({"target_spread": -0.1}, "target_spread: expected a fraction >= 0"),
])
def test_plan_refuses_bad_bounds(overrides, message):
    with pytest.raises(ValueError, match=message):
        _plan(**overrides)


def test_figure_median_quartiles_and_extremes():
    from mmfast.profile.stats import figure, relative_spread

    f = figure([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (f["median"], f["q1"], f["q3"], f["min"], f["max"], f["n"]) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert f["samples"] == [5.0, 1.0, 3.0, 2.0, 4.0]  # in the order taken
    assert figure([2.0])["q1"] == figure([2.0])["q3"] == 2.0
    assert figure([]) is None and figure([1.0, None]) is None
    assert relative_spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2.0 / 3.0)


def test_speedup_only_where_the_spreads_do_not_overlap():
    from mmfast.profile.stats import compare, figure

    ours, slow, close = figure([1.0, 1.1, 1.2]), figure([2.0, 2.2, 2.4]), figure([1.1, 1.2, 1.3])
    apart = compare(ours, slow, lower_is_better=True)  # times: reference / ours, round by round
    assert apart["differs"] and apart["samples"] == pytest.approx([2.0] * 3) and apart["median"] == pytest.approx(2)
    overlapping = compare(ours, close, lower_is_better=True)
    assert not overlapping["differs"] and overlapping["median"] == pytest.approx(1.1 / 1.0, rel=0.1)
    rate = compare(figure([10.0, 10.0]), figure([5.0, 5.0]), lower_is_better=False)  # rates: ours / reference
    assert rate["differs"] and rate["median"] == 2.0
    assert compare(None, slow, True) is None and compare(ours, None, True) is None
    with pytest.raises(ValueError, match="ours, reference: paired figures"):
        compare(ours, figure([1.0]), True)


def test_verdicts_name_the_ranges():
    from mmfast.profile.report import COLUMNS, verdict
    from mmfast.profile.stats import compare, figure

    generate = COLUMNS["vlm"][0]
    ours, theirs = figure([1.0, 2.0, 3.0]), figure([2.0, 2.5, 3.0])
    text = verdict(generate, ours, theirs, compare(ours, theirs, True), "transformers")
    assert text.startswith("generate (s): no difference measured (the spreads overlap: mmfast 1.5..2.5, "
                           "transformers 2.25..2.75; per-round ratio IQR")
    ours, slow = figure([1.0, 1.5, 2.0]), figure([2.0, 3.0, 4.0])
    assert verdict(generate, ours, slow, compare(ours, slow, True), "x") == (
        "generate (s): mmfast 2.00x, faster (IQR 2.00..2.00x, min..max 2.00..2.00x)")
    slower = verdict(generate, ours, slow, compare(slow, ours, True), "x")
    assert slower.startswith("generate (s): mmfast 0.50x, slower")
    assert verdict(COLUMNS["vlm"][2], None, None, None, "x") == "decode (tok/s): n/a (not measured on both sides)"


def test_time_to_first_token_is_stamped_inside_the_generate_call():
    import torch

    from mmfast.profile import vlm

    clock = FakeClock()

    def generate(new_tokens, first_token=None):
        clock.now += 0.25  # vision tower + prefill
        first_token()
        first_token()  # a second call changes nothing
        clock.now += 0.05 * (new_tokens - 1)  # decode steps

    sample = vlm.sampler(vlm.Side("fake", generate), 5, torch.device("cpu"), clock=clock)
    assert sample() == {"time_to_first_token_s": 0.25, "generate_s": pytest.approx(0.45)}
    silent = vlm.sampler(vlm.Side("silent", lambda new_tokens, first_token=None: None), 5, torch.device("cpu"),
                         clock=clock)
    with pytest.raises(RuntimeError, match="silent: generate returned without producing a first token"):
        silent()


def test_denoising_is_stamped_inside_the_end_to_end_call():
    import torch

    from mmfast.profile import ldm

    clock = FakeClock()

    def generate(output_type, decode_start=None):
        assert output_type == "pt"
        clock.now += 2.0  # denoising
        decode_start()
        clock.now += 0.5  # VAE decode

    assert ldm.sampler(ldm.Side("fake", generate), torch.device("cpu"), clock=clock)() == {
        "denoise_s": 2.0, "end_to_end_s": 2.5}
    silent = ldm.Side("silent", lambda output_type, decode_start=None: None)
    with pytest.raises(RuntimeError, match="silent: the call returned without running the VAE's decoder"):
        ldm.sampler(silent, torch.device("cpu"), clock=clock)()


def test_real_ldm_sides_stamp_the_decode_start():
    import torch

    import mmfast
    from mmfast.profile import ldm

    cpu = torch.device("cpu")
    ours, pipe, _ = ldm.build("tiny", None, cpu, torch.float32)
    for side in ldm.sides(ours, pipe, 1, 16, 1, 7.5):
        stamps = []
        with mmfast.set_backend("torch"):
            image = side.generate("pt", lambda: stamps.append(len(stamps)))
        assert stamps == [0] and image.shape == (1, 3, 16, 16)
    assert not ours.vae.decoder._forward_pre_hooks and not pipe.vae.decoder._forward_pre_hooks


def test_vlm_metrics_per_sample():
    from mmfast.profile import vlm

    m = vlm.metrics(2, 10, 5, {"time_to_first_token_s": [0.5, 0.25], "generate_s": [1.0, 0.75]})
    assert m["decode_tokens_per_s"]["samples"] == [2 * 4 / 0.5, 2 * 4 / 0.5]
    assert m["prefill_tokens_per_s"]["samples"] == [40.0, 80.0] and m["images_per_s"]["samples"] == [4.0, 8.0]
    assert m["generate_s"]["median"] == 0.875
    one = vlm.metrics(1, 10, 1, {"time_to_first_token_s": [0.5], "generate_s": [0.5]})
    assert one["decode_tokens_per_s"] is None  # a single new token has no decode step


@pytest.mark.parametrize("model", ["qwen2.5-vl", "blip2"])
def test_real_sides_stamp_the_first_token(model):
    # The hooks fire inside real generate calls of both sides (mmfast: its lm_head; transformers:
    # a logits processor), once per call, before the call ends.
    import torch

    import mmfast
    from mmfast.profile import vlm

    cpu = torch.device("cpu")
    ours, reference, _ = vlm.build(vlm.MODELS[model], "tiny", None, cpu, torch.float32)
    batch = vlm.inputs(model, ours, 1, 56 if model == "qwen2.5-vl" else None, 4, cpu, torch.float32)
    for side in vlm.sides(ours, reference, batch):
        stamps = []
        with mmfast.set_backend("torch"):
            out = side.generate(3, lambda: stamps.append(len(stamps)))
        assert stamps == [0] and out.shape[1] == batch.input_ids.shape[1] + 3
        assert not vlm._lm_head(ours)._forward_hooks  # the hook is gone after the call


def _fake_results(kind="vlm", device="cpu"):
    from mmfast.profile.report import COLUMNS
    from mmfast.profile.stats import compare, figure

    def metrics(scale):
        return {column.key: None if column.key in ("decode_tokens_per_s", "peak_memory_gib")
                else figure([scale, scale * 1.1, scale * 1.2]) for column in COLUMNS[kind]}

    sides = [{"name": "mmfast", "metrics": metrics(1.0), "ops": []},
             {"name": "transformers (sdpa)", "metrics": metrics(2.0), "ops": []}]
    sides[1]["mmfast_speedup"] = {c.key: compare(sides[0]["metrics"][c.key], sides[1]["metrics"][c.key],
                                                 c.lower_is_better) for c in COLUMNS[kind] if c.compared}
    return {"kind": kind, "model": "qwen2.5-vl, preset tiny", "preset": "tiny", "checkpoint": None,
            "vlm_model": "qwen2.5-vl", "device": device, "device_name": "a CPU", "dtype": "float32", "batch": 1,
            "sides": sides, "measurement": {"rounds": 3}}


def test_chart_reads_at_a_glance():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from mmfast.profile.report import chart

    figure = chart(_fake_results())
    try:
        titles = [axis.get_title() for axis in figure.axes]
        # The headline first, with its verdict.
        assert titles[0].startswith("generate (s)\nlower is better\nmmfast 2.00x, faster\n(IQR 2.00..2.00x)")
        assert all("lower is better" in t or "higher is better" in t for t in titles)
        assert "peak memory" not in " ".join(titles)  # no allocator statistics on a CPU: no panel of n/a
        decode = figure.axes[titles.index(next(t for t in titles if t.startswith("decode")))]
        assert [text.get_text() for text in decode.texts] == ["n/a", "n/a"] and not decode.patches  # no empty bars
        generate = figure.axes[0]
        assert len(generate.patches) == 2 and generate.patches[1].get_height() == pytest.approx(2.2)  # medians
        assert len(generate.collections) >= 2  # the spreads: error bars and min..max lines
        assert "CPU: not GPU numbers" in figure._suptitle.get_text() and "a CPU" in figure._suptitle.get_text()
    finally:
        plt.close(figure)
    gpu = chart(_fake_results(device="cuda"))
    try:
        assert any(axis.get_title().startswith("peak memory") for axis in gpu.axes)
        assert "not GPU numbers" not in gpu._suptitle.get_text()
    finally:
        plt.close(gpu)


def test_one_file_set_per_kind_model_and_preset(tmp_path):
    from mmfast.profile.report import file_stem, write

    results = _fake_results()
    assert file_stem(results) == "profile_vlm_qwen2.5-vl_tiny"
    assert file_stem({**results, "vlm_model": "llava"}) == "profile_vlm_llava_tiny"
    assert file_stem({**results, "preset": None, "checkpoint": "/models/My Qwen/"}) == \
        "profile_vlm_qwen2.5-vl_checkpoint-My-Qwen"
    assert file_stem({**results, "kind": "ldm", "preset": "sd3-tiny"}) == "profile_ldm_sd3-tiny"
    written = write(results, str(tmp_path / "out"))
    assert written == [str(tmp_path / "out" / "profile_vlm_qwen2.5-vl_tiny.json"),
                       str(tmp_path / "out" / "profile_vlm_qwen2.5-vl_tiny.png")][:len(written)]
    assert json.loads((tmp_path / "out" / "profile_vlm_qwen2.5-vl_tiny.json").read_text())["sides"][0]["metrics"][
        "generate_s"]["samples"] == [1.0, 1.1, 1.2]


@pytest.mark.parametrize("kind", ["vlm", "ldm"])
def test_help_names_the_output_folder(kind, capsys):
    with pytest.raises(SystemExit):
        main(["profile", kind, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default ./mmfast-profile" in text and f"profile_{kind}_" in text and "--time-budget SECONDS" in text
