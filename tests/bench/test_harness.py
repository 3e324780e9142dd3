"""The benchmark harness on any machine: registry, result files and comparison, the
CLI end to end (a CPU smoke run where there is no GPU), plots, input rotation, and the
norm suite's byte model. Timings themselves are not checked here: they mean something
only on a GPU."""

import dataclasses
import json
import re

import pytest
import torch

import mmfast.bench
from mmfast.bench import harness, results_io, suites, table
from mmfast.bench.env import detect_env
from mmfast.bench.suite import Case
from mmfast.bench.suites import norm

HAS_CUDA = torch.cuda.is_available()
# On a GPU the CLI tests stay quick by running one cheap provider on a few cases.
GPU_SUBSET = ["--provider", "torch-eager", "--case", "^rms-fwd-"] if HAS_CUDA else []


def _row(case, provider, ms, run_id, gpu="GPU A", commit="c1"):
    return {"suite": "norm", "case": case, "provider": provider, "params": {}, "ms": ms,
            "ms_p20": ms, "ms_p80": ms, "tflops": None, "gbps": 1.0, "frac_of_peak": 0.5,
            "peak_mem_mb": None, "gpu": gpu, "device": "cuda", "torch": "2.x", "triton": "3.x",
            "commit": commit, "time": run_id, "run_id": run_id, "quick": False, "smoke": False}


# ---- registry --------------------------------------------------------------------


def test_registry_lists_norm_with_its_providers():
    assert "norm" in suites.names()
    suite = suites.get("norm")
    assert suite.name == "norm" and suite.bound == "memory"
    assert [p.name for p in suite.providers] == ["mmfast-triton", "mmfast-cuda", "torch-eager", "torch-compile", "liger"]
    with pytest.raises(KeyError, match="unknown suite 'nope'"):
        suites.get("nope")


def test_norm_cases_cover_both_norms_residuals_and_passes():
    gpu = norm.cases(quick=False, device=torch.device("cuda"))  # building cases allocates nothing
    assert {c.params["hidden"] for c in gpu} == {1280, 2048, 4096, 8192}
    assert {c.params["tokens"] for c in gpu} == {4096, 16384}
    assert {(c.params["op"], c.params["residual"], c.params["pass"]) for c in gpu} == {
        (op, res, p) for op in ("rms_norm", "layer_norm") for res in (False, True) for p in ("fwd", "fwd+bwd")
    }
    assert {c.params["dtype"] for c in gpu} == {"bfloat16"}
    assert len({c.name for c in gpu}) == len(gpu) == 64  # names are the comparison keys


def test_norm_byte_model():
    m, n, s = 32, 320, 2  # bf16
    by_name = {c.name: c for c in norm.cases(quick=True, device=torch.device("cpu"))}
    assert by_name["rms-fwd-32x320-bf16"].bytes == 2 * m * n * s + n * s
    assert by_name["layer+res-fwd-32x320-bf16"].bytes == 4 * m * n * s + 2 * n * s
    # fwd+bwd adds: read dy (+dh), h; write dx; params read and their grads written.
    assert by_name["rms-fwd+bwd-32x320-bf16"].bytes == (2 + 3) * m * n * s + 3 * n * s
    assert by_name["layer+res-fwd+bwd-32x320-bf16"].bytes == (4 + 4) * m * n * s + 6 * n * s


def test_triton_provider_says_why_it_is_skipped_without_the_interpreter(monkeypatch):
    case = norm.cases(quick=True, device=torch.device("cpu"))[0]
    provider = suites.get("norm").provider("mmfast-triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in provider.skip(case, torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert provider.skip(case, torch.device("cpu")) is None


# ---- harness ---------------------------------------------------------------------


def test_quantile_matches_torch():
    values = sorted(torch.rand(11, dtype=torch.float64).tolist())
    for q in (0.0, 0.2, 0.5, 0.8, 1.0):
        expected = torch.quantile(torch.tensor(values, dtype=torch.float64), q).item()
        assert harness.quantile(values, q) == pytest.approx(expected, rel=1e-12)


def test_rotating_inputs_exceed_twice_l2_with_independent_copies():
    nbytes = 1000 * 4
    case = Case("c", {}, make_inputs=lambda device: {"x": torch.randn(1000, device=device)}, bytes=nbytes)
    env = detect_env(torch.device("cpu"))
    few = harness.rotating_inputs(case, dataclasses.replace(env, l2_bytes=nbytes + nbytes // 4))
    assert len(few) == 3  # ceil(2 * 1.25 * nbytes / nbytes)
    assert len({t["x"].data_ptr() for t in few}) == len(few)
    many = harness.rotating_inputs(case, dataclasses.replace(env, l2_bytes=10**9))
    assert len(many) == harness.CPU_MAX_COPIES  # capped


def test_tensor_bytes_counts_nested_tensors_once():
    x = torch.zeros(10, dtype=torch.float32)
    inputs = norm.NormInputs(x=x, weight=torch.zeros(4, dtype=torch.bfloat16), bias=None,
                             residual=None, dy=None, dh=None)
    assert harness.tensor_bytes(inputs) == 40 + 8
    assert harness.tensor_bytes({"a": [x, x], "b": (x,)}) == 40


# ---- result files ----------------------------------------------------------------


def test_rows_append_load_and_compare_round_trip(tmp_path):
    old = [_row("a", "p", 2.0, "2025-01-01T00:00:00+00:00"), _row("b", "p", 4.0, "2025-01-01T00:00:00+00:00")]
    newer = [_row("a", "p", 1.0, "2025-02-01T00:00:00+00:00", commit="c2")]
    other_gpu = [_row("a", "p", 9.0, "2025-03-01T00:00:00+00:00", gpu="GPU B")]
    for rows in (old, newer, other_gpu):
        results_io.append_rows(tmp_path, "norm", rows)
    loaded = results_io.load_rows(tmp_path, "norm")
    assert loaded == old + newer + other_gpu

    latest = results_io.latest_rows(loaded, "GPU A")
    assert latest[("a", "p")]["commit"] == "c2"  # the most recent on this GPU, not GPU B's
    assert latest[("b", "p")]["ms"] == 4.0  # a case missing from the last run keeps its last row
    assert results_io.time_change(_row("a", "p", 0.9, "x"), latest[("a", "p")]) == pytest.approx(-0.1)
    assert results_io.time_change(_row("a", "p", 0.9, "x"), None) is None
    assert results_io.latest_rows(loaded, "GPU C") == {}


def test_a_damaged_line_is_skipped_with_a_warning(tmp_path, capsys):
    results_io.append_rows(tmp_path, "norm", [_row("a", "p", 1.0, "t")])
    with results_io.results_path(tmp_path, "norm").open("a") as f:
        f.write('{"suite": "norm", "ca\n')
    assert len(results_io.load_rows(tmp_path, "norm")) == 1
    assert "unreadable row" in capsys.readouterr().err


# ---- command line ----------------------------------------------------------------


def test_smoke_run_of_the_norm_suite(capsys):
    assert mmfast.bench.main(["norm", "--quick", "--no-save", *GPU_SUBSET]) == 0
    out = capsys.readouterr().out
    assert "torch-eager" in out
    if HAS_CUDA:
        assert "measured peaks:" in out and "of peak" in out
    else:
        assert "NOT GPU numbers" in out
        assert "mmfast-triton" in out  # skipped with its reason, or run under the interpreter
        assert "FAILED" not in out
        # No peak is measured on a CPU, so no fraction of one is shown (it went over 100%).
        assert "measured peaks:" not in out and "of peak: not reported on a CPU" in out
        header = next(line for line in out.splitlines() if line.startswith("case "))
        assert "of peak" not in header
        # mmfast-cuda cannot run here: the run says how much of mmfast it measured.
        assert re.search(r"^mmfast: measured \d+ of \d+ runs of its providers; skipped \d+ \(.*cuda", out, re.M) \
            or "measured nothing of mmfast" in out


def test_a_cpu_run_without_the_interpreter_says_it_measured_nothing_of_mmfast(monkeypatch, capsys):
    if HAS_CUDA:
        pytest.skip("Triton runs compiled on a GPU")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert mmfast.bench.main(["norm", "--quick", "--no-save"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "of mmfast" in line]
    assert len(lines) == 1 and lines[0].startswith("measured nothing of mmfast: all 16 runs of its providers")
    assert "TRITON_INTERPRET=1" in lines[0]


def test_mmfast_summary():
    from mmfast.bench.cli import mmfast_summary

    assert mmfast_summary({"measured": 3, "skipped": {}}) is None
    assert mmfast_summary({"measured": 2, "skipped": {"no GPU": 2}}) == (
        "mmfast: measured 2 of 4 runs of its providers; skipped 2 (no GPU)")
    line = mmfast_summary({"measured": 0, "skipped": {"no GPU": 2, "not built": 1}})
    assert line.startswith("measured nothing of mmfast: all 3 runs of its providers were skipped (no GPU; not built)")


def test_table_shows_of_peak_only_where_a_peak_was_measured():
    suite = suites.get("norm")
    measured = _row("rms-a", "torch-eager", 1.0, "r1")
    assert "of peak" in table.format_table(suite, [measured]).splitlines()[0]
    unmeasured = {**measured, "frac_of_peak": None}
    text = table.format_table(suite, [unmeasured], is_gpu=False)
    assert "of peak" not in text.splitlines()[0] and "%" not in text


def test_save_compare_and_plot(tmp_path, capsys):
    args = ["norm", "--quick", "--provider", "torch-eager", "--case", "^rms", "--out", str(tmp_path)]
    assert mmfast.bench.main([*args, "--save", "--no-plot"]) == 0
    rows = results_io.load_rows(tmp_path, "norm")
    assert rows and all(tuple(r) == harness.ROW_FIELDS for r in rows)
    assert {r["provider"] for r in rows} == {"torch-eager"}
    assert all(r["ms_p20"] <= r["ms"] <= r["ms_p80"] and r["gbps"] > 0 for r in rows)
    assert all(r["smoke"] is (not HAS_CUDA) for r in rows)
    peaks = results_io.load_rows(tmp_path, results_io.PEAKS)
    if HAS_CUDA:
        assert len(peaks) == 2 and peaks[0]["tflops"] > 0 and peaks[1]["gbps"] > 0
    else:
        assert peaks == [] and all(r["frac_of_peak"] is None for r in rows)  # no peak measured on a CPU
    capsys.readouterr()

    pytest.importorskip("matplotlib")
    assert mmfast.bench.main([*args, "--no-save", "--compare", "--plot"]) == 0
    out = capsys.readouterr().out
    assert "time vs last" in out and "compared with: commit" in out
    assert re.search(r"[+-]\d+\.\d%", out)
    (png,) = (tmp_path / "plots").glob("norm_*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(results_io.load_rows(tmp_path, "norm")) == len(rows)  # --no-save wrote nothing


def test_bad_arguments(capsys):
    assert mmfast.bench.main(["no-such-suite"]) == 2
    assert "unknown suite" in capsys.readouterr().err
    assert mmfast.bench.main(["--case", "("]) == 2
    assert mmfast.bench.main(["--help"]) == 0
    assert "--compare" in capsys.readouterr().out


def test_list_runs_nothing(capsys, tmp_path):
    assert mmfast.bench.main(["--list", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "norm:" in out and "rms-fwd-" in out
    assert not any(tmp_path.iterdir())


def test_rows_are_json_lines(tmp_path):
    path = results_io.append_rows(tmp_path, "norm", [_row("a", "p", 1.0, "t")])
    assert path == tmp_path / "norm.jsonl"
    assert json.loads(path.read_text().splitlines()[0])["case"] == "a"


# ---- GPU-only logic, checked with stand-ins ------------------------------------------


def test_gpu_timing_takes_do_bench_quantiles_in_order(monkeypatch):
    triton_testing = pytest.importorskip("triton.testing")
    seen = {}

    def fake_do_bench(fn, warmup, rep, quantiles):
        seen.update(warmup=warmup, rep=rep, quantiles=quantiles)
        fn()
        return [1.0, 2.0, 3.0]  # do_bench answers in the order the quantiles were asked

    monkeypatch.setattr(triton_testing, "do_bench", fake_do_bench)
    calls = []
    timing = harness.time_gpu(lambda: calls.append(1))
    assert timing == harness.Timing(ms=2.0, ms_p20=1.0, ms_p80=3.0)
    assert seen["quantiles"] == [0.2, 0.5, 0.8] and calls == [1]


def test_targets_are_marked_and_summarised_on_gpu_runs_only():
    suite = suites.get("norm")
    rows = [{**_row("a", "mmfast-triton", 1.0, "t"), "frac_of_peak": 0.85},
            {**_row("b", "mmfast-triton", 1.0, "t"), "frac_of_peak": 0.50},
            {**_row("a", "torch-eager", 1.0, "t"), "frac_of_peak": 0.10}]
    text = table.format_table(suite, rows, is_gpu=True)
    assert re.search(r"^a .*mmfast-triton.*85\.0%.* ok$", text, re.M)
    assert re.search(r"^b .*mmfast-triton.*50\.0%.* LOW$", text, re.M)
    summary = table.target_summary(suite, rows, is_gpu=True)
    assert "1/2 mmfast-triton rows reach 80%" in summary[0]
    assert summary[1:] == ["  below: b at 50.0%"]
    assert "not checked" in table.target_summary(suite, rows, is_gpu=False)[0]
    assert " ok" not in table.format_table(suite, rows, is_gpu=False)


def test_speedup_goals_compare_with_the_fastest_baseline_of_matching_cases():
    from mmfast.bench.suite import Speedup

    goal = Speedup("ours", ("a", "b"), 2.0, "2x", where={"pass": "fwd"})
    suite = dataclasses.replace(suites.get("norm"), speedups=(goal,))
    rows = [
        {"case": "x", "provider": "ours", "ms": 1.0, "params": {"pass": "fwd"}},
        {"case": "x", "provider": "a", "ms": 3.0, "params": {"pass": "fwd"}},
        {"case": "x", "provider": "b", "ms": 2.5, "params": {"pass": "fwd"}},  # fastest: 2.5x
        {"case": "y", "provider": "ours", "ms": 1.0, "params": {"pass": "fwd"}},
        {"case": "y", "provider": "b", "ms": 1.5, "params": {"pass": "fwd"}},  # 1.5x: below
        {"case": "z", "provider": "ours", "ms": 1.0, "params": {"pass": "bwd"}},  # not this goal's
        {"case": "z", "provider": "a", "ms": 0.1, "params": {"pass": "bwd"}},
    ]
    lines = table.speedup_summary(suite, rows, is_gpu=True)
    assert lines[0] == "speedup goal (2x): 1/2 cases reach 2x the fastest of a, b"
    assert lines[1:] == ["  below: y at 1.50x"]
    assert table.speedup_summary(suite, rows, is_gpu=False) == [
        "speedup goal (2x): not checked, this is not a GPU run"]


def test_latency_goals_read_the_matching_rows_against_the_limit():
    from mmfast.bench.suite import Latency

    goal = Latency("ours", 150.0, "28 steps in 4.2 s", where={"full": True})
    suite = dataclasses.replace(suites.get("norm"), latencies=(goal,))
    rows = [
        {"case": "x", "provider": "ours", "ms": 149.0, "params": {"full": True}},
        {"case": "y", "provider": "ours", "ms": 151.5, "params": {"full": True}},  # over
        {"case": "y", "provider": "theirs", "ms": 300.0, "params": {"full": True}},  # not the goal's provider
        {"case": "z", "provider": "ours", "ms": 900.0, "params": {"full": False}},  # not the goal's case
    ]
    assert table.latency_summary(suite, rows, is_gpu=True) == [
        "latency goal (28 steps in 4.2 s): 1/2 ours rows within 150.0 ms", "  over: y at 151.5 ms"]
    assert table.latency_summary(suite, rows, is_gpu=False) == [
        "latency goal (28 steps in 4.2 s): not checked, this is not a GPU run"]


@pytest.mark.parametrize("name", suites.names())
def test_every_goal_names_providers_of_its_suite(name):
    suite = suites.get(name)
    providers = {p.name for p in suite.providers}
    for goal in suite.speedups:
        assert {goal.provider, *goal.baselines} <= providers, goal.text
    for target in suite.targets:
        assert target.provider in providers, target.text
    for latency in suite.latencies:
        assert latency.provider in providers, latency.text
