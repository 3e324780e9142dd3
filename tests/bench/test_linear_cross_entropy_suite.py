"""The linear_cross_entropy benchmark suite: registered, its cases and FLOP model, its
skips, its providers computing the same gradients, and the peak-memory goal of the
table. Timings mean nothing here."""

import dataclasses

import torch

import mmfast.bench
from mmfast.bench import suites, table
from mmfast.bench.suite import Speedup
from mmfast.bench.suites import linear_cross_entropy as lce


def test_registered_with_its_providers():
    suite = suites.get("linear_cross_entropy")
    assert suite.bound == "compute"
    assert [p.name for p in suite.providers] == [
        "mmfast-triton", "mmfast-torch", "torch-eager", "torch-compile", "liger"]


def test_gpu_cases_and_flop_model():
    gpu = {c.name: c for c in lce.cases(quick=False, device=torch.device("cuda"))}  # allocates nothing
    assert len(gpu) == 10
    case = gpu["qwen2.5-vl-7b-8192tok-bf16"]
    assert (case.params["hidden"], case.params["vocab"]) == (3584, 152064)
    assert case.flops == 6 * 8192 * 3584 * 152064
    assert gpu["qwen2.5-vl-3b-1024tok-bf16"].params["vocab"] == 151936


def test_providers_compute_the_same_gradients():
    cpu = torch.device("cpu")
    suite = suites.get("linear_cross_entropy")
    case = lce.cases(quick=True, device=cpu)[0]
    assert suite.provider("liger").skip(case, cpu) in ("liger-kernel is not installed",
                                                       "liger-kernel runs on CUDA only")
    torch.manual_seed(0)
    inputs = case.make_inputs(cpu)
    assert (inputs.target == -100).any() or case.params["tokens"] < 50
    want = suite.provider("torch-eager").build(case)(inputs)
    for name in ("mmfast-triton", "mmfast-torch"):
        assert suite.provider(name).skip(case, cpu) is None
        for got, expected in zip(suite.provider(name).build(case)(inputs), want):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_peak_memory_goal_compares_the_mem_column():
    goal = Speedup("ours", ("eager",), 4.0, "4x less memory", metric="peak_mem_mb")
    suite = dataclasses.replace(suites.get("linear_cross_entropy"), speedups=(goal,))
    rows = [
        {"case": "x", "provider": "ours", "ms": 9.0, "peak_mem_mb": 100.0, "params": {}},
        {"case": "x", "provider": "eager", "ms": 1.0, "peak_mem_mb": 500.0, "params": {}},
        {"case": "y", "provider": "ours", "ms": 1.0, "peak_mem_mb": 300.0, "params": {}},
        {"case": "y", "provider": "eager", "ms": 9.0, "peak_mem_mb": 600.0, "params": {}},
    ]
    lines = table.speedup_summary(suite, rows, is_gpu=True)
    assert lines == ["speedup goal (4x less memory): 1/2 cases reach 4x the fastest of eager", "  below: y at 2.00x"]


def test_cpu_smoke_run(capsys):
    args = ["linear_cross_entropy", "--quick", "--no-save", "--provider", "mmfast-torch"]
    if torch.cuda.is_available():
        args += ["--case", "^qwen2.5-vl-3b-2048"]
    assert mmfast.bench.main(args) == 0
    out = capsys.readouterr().out
    assert "mmfast-torch" in out and "FAILED" not in out
