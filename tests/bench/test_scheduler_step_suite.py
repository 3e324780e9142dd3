"""The scheduler_step benchmark suite: registered, its cases and byte model. (Its CPU smoke
run is `mmfast bench scheduler_step --quick`; timings mean something only on a GPU.)"""

import torch

from mmfast.bench import suites
from mmfast.bench.suites import scheduler_step


def test_registered_with_its_providers_and_target():
    suite = suites.get("scheduler_step")
    assert suite.bound == "memory"
    assert [p.name for p in suite.providers] == ["mmfast-triton", "mmfast-cuda", "diffusers", "torch-compile"]
    assert [(t.provider, t.min_frac) for t in suite.targets] == [("mmfast-triton", 0.85)]


def test_gpu_cases_are_the_sd15_sd3_wan_and_a_bandwidth_sized_shape():
    gpu = scheduler_step.cases(quick=False, device=torch.device("cuda"))  # allocates nothing
    shapes = {(c.params["model"], *scheduler_step._shape(c.params)) for c in gpu}
    assert shapes == {("sd15", 4, 4, 64, 64), ("sd3", 1, 16, 128, 128), ("large", 8, 16, 256, 256),
                      ("wan480", 1, 16, 21, 60, 104)}
    assert {c.params["scheduler"] for c in gpu} == {"ddim", "euler", "dpm++2m", "flow", "unipc"}
    assert {c.params["rescale"] for c in gpu} == {0.0, scheduler_step.RESCALE}
    assert len({c.name for c in gpu}) == len(gpu) == 13


def test_byte_model():
    by_name = {c.name: c for c in scheduler_step.cases(quick=False, device=torch.device("cuda"))}
    latents = 4 * 4 * 64 * 64
    # read both halves of the model output and the latents, write the latents: 4 tensors of fp16
    assert by_name["sd15-euler-8x4x64x64-fp16"].bytes == 4 * latents * 2
    # DPM-Solver++(2M) also reads and writes its previous x0
    assert by_name["sd15-dpm++2m-rescale-8x4x64x64-fp16"].bytes == 6 * latents * 2
    assert by_name["sd3-flow-2x16x128x128-fp16"].bytes == 4 * 16 * 128 * 128 * 2
    # UniPC (Wan): also the two previous x0 and the last sample read, x0 and the corrected sample written
    assert by_name["wan480-unipc-2x16x21x60x104-fp16"].bytes == 9 * 16 * 21 * 60 * 104 * 2
