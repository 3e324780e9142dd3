"""The contrastive benchmark suite: registered, its cases and FLOP model, its skips, and
a CPU smoke run of one provider. Timings mean nothing here."""

import torch

import mmfast.bench
from mmfast.bench import suites
from mmfast.bench.suites import contrastive


def test_registered_with_its_providers():
    suite = suites.get("contrastive")
    assert suite.bound == "compute"
    assert [p.name for p in suite.providers] == [
        "mmfast-triton", "mmfast-torch", "torch-eager", "open_clip", "inf-cl", "siglip-kernel"]


def test_gpu_cases_and_flop_model():
    gpu = contrastive.cases(quick=False, device=torch.device("cuda"))  # allocates nothing
    assert {c.params["batch"] for c in gpu} == {4096, 16384, 65536, 262144, 1048576}
    assert {c.params["dim"] for c in gpu} == {512, 768, 1024}
    assert {c.params["loss"] for c in gpu} == {"clip", "siglip"}
    assert {c.params["dtype"] for c in gpu} == {"bfloat16"}
    assert len({c.name for c in gpu}) == len(gpu) == 30
    case = next(c for c in gpu if c.name == "clip-65536x1024-bf16")
    assert case.flops == 6 * 65536**2 * 1024


def test_skips_say_why():
    cpu = torch.device("cpu")
    clip, siglip = contrastive.cases(quick=True, device=cpu)
    suite = suites.get("contrastive")
    assert suite.provider("inf-cl").skip(siglip, cpu) == "Inf-CL has no sigmoid loss"
    assert "sigmoid loss" in suite.provider("siglip-kernel").skip(clip, cpu)
    big = contrastive.cases(quick=False, device=torch.device("cuda"))[-1]
    assert "skipped above" in suite.provider("mmfast-torch").skip(big, cpu)


def test_cpu_smoke_run(capsys):
    args = ["contrastive", "--quick", "--no-save", "--provider", "torch-eager"]
    if torch.cuda.is_available():
        args += ["--case", "^clip-16384"]
    assert mmfast.bench.main(args) == 0
    out = capsys.readouterr().out
    assert "torch-eager" in out and "FAILED" not in out
