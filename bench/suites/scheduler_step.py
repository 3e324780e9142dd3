"""One sampler step with classifier-free guidance: guidance (optionally rescaled) and the
scheduler update, fp16, at Stable Diffusion 1.5 latents (batch 4 with guidance: model
output [8, 4, 64, 64], latents [4, 4, 64, 64]), SD3 latents (batch 1 with guidance:
model output [2, 16, 128, 128], latents [1, 16, 128, 128]) and Wan 2.1 480p latents (81
frames: [1, 16, 21, 60, 104]; the pipeline keeps them in fp32 and the transformer's output
in bf16, here both fp16).

Providers: ``mmfast-triton`` (mmfast.ops.guided_step: one kernel, plus the stats pass
with guidance rescale), ``mmfast-cuda`` (the same with backend="cuda": csrc/scheduler_step.cu,
built before timing; skipped with the reason when the CUDA path is unavailable, and for
guidance rescale, which it does not do), ``diffusers`` (``noise_pred.chunk(2)``, the guidance expression
and ``rescale_noise_cfg`` as the SD pipelines write them, then the diffusers scheduler's
own ``step``, pinned at a mid-schedule step), ``torch-compile`` (the same guidance and
update math, written in plain torch with the step's coefficients as constants, under
torch.compile, compiled afresh per case).

Schedulers: DDIM (eta 0) and Euler discrete with the SD1.5 schedule, DPM-Solver++(2M) at a
second-order step, flow-matching Euler with the SD3 schedule (shift 3), UniPC with Wan's
schedule (flow shift 3) at a step with the second-order corrector and predictor (no
guidance rescale: Wan does not use it).

Byte model: the traffic any implementation must move per step, with B latents of N
elements of s bytes (fp16: 2):

    read the model output (both halves)   2 B N s
    read the latents, write the new ones  2 B N s
    DPM-Solver++(2M): read the previous x0 and write the new one   + 2 B N s
    UniPC: read the two previous x0 and the last sample, write the new x0 and
           the corrected sample                                    + 5 B N s

Guidance rescale needs each sample's standard deviation before any element can be
written; the fused path reads both halves a second time for it (a stats pass). That read
is not counted: it shows as a lower fraction of bandwidth for the rescale cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from mmfast.bench.suite import Case, Provider, Suite, Target, backend_skip, cpu_compile_skip

GUIDANCE = 7.5
RESCALE = 0.7
STEPS, STEP = 20, 10  # the benchmarked step: mid-schedule (second order for DPM-Solver)

# (name, latent batch, channels, size, schedulers). "large" is no real model's shape: at
# the SD sizes a step moves 0.5-2 MB, which an H100 copies in under a microsecond, less
# than a kernel launch takes, so those cases measure latency; "large" (67 MB a step)
# shows whether the kernel itself streams at the bandwidth the target asks for.
GPU_SHAPES = (("sd15", 4, 4, 64, ("ddim", "euler", "dpm++2m")), ("sd3", 1, 16, 128, ("flow",)),
              ("large", 8, 16, 256, ("dpm++2m", "flow")))
CPU_SHAPES = (("sd15", 2, 4, 8, ("ddim", "euler", "dpm++2m")), ("sd3", 1, 16, 8, ("flow",)))
# Video latents [B, C, frames, height, width]: (name, batch, channels, frames, height, width, schedulers).
GPU_VIDEO_SHAPES = (("wan480", 1, 16, 21, 60, 104, ("unipc",)),)
CPU_VIDEO_SHAPES = (("wan480", 1, 16, 2, 6, 10, ("unipc",)),)
SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _diffusers_scheduler(name: str):
    import diffusers

    if name == "ddim":
        scheduler = diffusers.DDIMScheduler(**SD15, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    elif name == "euler":
        scheduler = diffusers.EulerDiscreteScheduler(**SD15, steps_offset=1)
    elif name == "dpm++2m":
        scheduler = diffusers.DPMSolverMultistepScheduler(**SD15)
    elif name == "unipc":  # Wan 2.1 / 2.2 (their scheduler_config.json), 480p
        scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=3.0, solver_order=2, solver_type="bh2")
    else:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(STEPS)
    return scheduler


# ---- cases -----------------------------------------------------------------------


@dataclass
class StepInputs:
    latents: Tensor
    model_output: Tensor   # [2B, ...], unconditional half first
    prev_x0: Tensor | None  # DPM-Solver / UniPC state: the previous x0
    older_x0: Tensor | None = None  # UniPC: the x0 before that
    last_sample: Tensor | None = None  # UniPC: the previous step's (corrected) sample


def _shape(params: dict) -> tuple[int, ...]:
    frames = (params["frames"],) if "frames" in params else ()
    return (params["batch"], params["channels"], *frames, params["size"], params.get("width", params["size"]))


def _make_inputs(params: dict, device: torch.device) -> StepInputs:
    dtype = getattr(torch, params["dtype"])
    shape = _shape(params)
    unipc = params["scheduler"] == "unipc"

    def state(wanted):
        return torch.randn(shape, device=device, dtype=dtype) if wanted else None

    return StepInputs(
        latents=torch.randn(shape, device=device, dtype=dtype) * 3.0,
        model_output=torch.randn((2 * shape[0], *shape[1:]), device=device, dtype=dtype),
        prev_x0=state(params["scheduler"] in ("dpm++2m", "unipc")), older_x0=state(unipc), last_sample=state(unipc),
    )


def _bytes(params: dict, elem: int) -> int:
    bn = 1
    for n in _shape(params):
        bn *= n
    return (4 + {"dpm++2m": 2, "unipc": 5}.get(params["scheduler"], 0)) * bn * elem


def cases(quick: bool, device: torch.device) -> list[Case]:
    gpu = device.type == "cuda"
    out = []
    for label, b, c, hw, schedulers in GPU_SHAPES if gpu else CPU_SHAPES:
        for scheduler in schedulers[:1] if quick else schedulers:
            for rescale in (0.0, RESCALE):
                params = {"model": label, "scheduler": scheduler, "rescale": rescale, "batch": b, "channels": c,
                          "size": hw, "dtype": "float16"}
                name = f"{label}-{scheduler}{'-rescale' if rescale else ''}-{2 * b}x{c}x{hw}x{hw}-fp16"
                out.append(Case(name, params, partial(_make_inputs, params), bytes=_bytes(params, 2)))
    for label, b, c, frames, h, w, schedulers in GPU_VIDEO_SHAPES if gpu else CPU_VIDEO_SHAPES:
        for scheduler in schedulers:
            params = {"model": label, "scheduler": scheduler, "rescale": 0.0, "batch": b, "channels": c,
                      "frames": frames, "size": h, "width": w, "dtype": "float16"}
            name = f"{label}-{scheduler}-{2 * b}x{c}x{frames}x{h}x{w}-fp16"
            out.append(Case(name, params, partial(_make_inputs, params), bytes=_bytes(params, 2)))
    return out


# ---- implementations -------------------------------------------------------------


def _coefficients(scheduler_name: str):
    """The mid-schedule step's coefficients, from the diffusers schedule (float64), and
    UniPC's corrector (None for the others)."""
    from mmfast.integrations.diffusers.schedulers import fused_stepper

    stepper = fused_stepper(_diffusers_scheduler(scheduler_name))
    corrector = stepper.corrector_coefficients(STEP) if scheduler_name == "unipc" else None
    return stepper.coefficients(STEP), corrector


def _build_mmfast(case: Case, backend: str = "triton"):
    from mmfast.ops import guided_step

    coef, corrector = _coefficients(case.params["scheduler"])
    rescale = case.params["rescale"]

    def run(i: StepInputs):
        if corrector is not None:
            # UniPC: the oldest x0 and the last sample are overwritten by their successors.
            return guided_step(i.latents, i.model_output, coef, guidance_scale=GUIDANCE, prev_x0=i.prev_x0,
                               x0_out=i.older_x0, corrector=corrector, last_sample=i.last_sample,
                               older_x0=i.older_x0, corrected_out=i.last_sample, backend=backend)
        # DPM-Solver: the state is read and rewritten in place, as the stepper does.
        return guided_step(i.latents, i.model_output, coef, guidance_scale=GUIDANCE, guidance_rescale=rescale,
                           prev_x0=i.prev_x0, x0_out=i.prev_x0, backend=backend)
    return run


def _skip_mmfast(case: Case, device: torch.device, backend: str = "triton") -> str | None:
    from mmfast.dispatch import module_available

    if not module_available("diffusers"):
        return "diffusers is not installed (the schedule comes from its scheduler)"
    facts = {"float64": False, "one_dtype": True, "rescale": case.params["rescale"] != 0.0,
             "corrector": case.params["scheduler"] == "unipc"}
    return backend_skip("scheduler_step", backend, device, torch.float16, facts=facts)


def _skip_mmfast_cuda(case: Case, device: torch.device) -> str | None:
    reason = _skip_mmfast(case, device, "cuda")
    if reason is None:
        from mmfast.cuda import build

        if not build.load(device):  # build here, so that no case times a compile
            reason = f"CUDA C++ path unavailable: {build.unavailable_reason(device)}"
    return reason


def _rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale):
    # As diffusers' pipelines write it (pipelines/stable_diffusion: rescale_noise_cfg).
    dims = list(range(1, noise_pred_text.ndim))
    std_text = noise_pred_text.std(dim=dims, keepdim=True)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    return guidance_rescale * (noise_cfg * (std_text / std_cfg)) + (1 - guidance_rescale) * noise_cfg


def _build_diffusers(case: Case):
    name, rescale = case.params["scheduler"], case.params["rescale"]
    scheduler = _diffusers_scheduler(name)
    timestep = scheduler.timesteps[STEP]

    def run(i: StepInputs):
        if name != "ddim":
            scheduler._step_index = STEP  # every call is the same mid-schedule step
        if name == "dpm++2m":
            scheduler.lower_order_nums = 2
            scheduler.model_outputs = [None, i.prev_x0]  # step shifts the previous x0 down
        if name == "unipc":  # second-order corrector and predictor
            scheduler.lower_order_nums = scheduler.this_order = 2
            scheduler.model_outputs = [i.older_x0, i.prev_x0]
            scheduler.last_sample = i.last_sample
        uncond, cond = i.model_output.chunk(2)
        noise_pred = uncond + GUIDANCE * (cond - uncond)
        if rescale:
            noise_pred = _rescale_noise_cfg(noise_pred, cond, rescale)
        return scheduler.step(noise_pred, timestep, i.latents, return_dict=False)[0]
    return run


def _skip_diffusers(case: Case, device: torch.device) -> str | None:
    from mmfast.dispatch import module_available

    return None if module_available("diffusers") else "diffusers is not installed"


def _plain_step(model_output, latents, prev_x0, older_x0, last_sample, coef, corrector, rescale: float):
    """Guidance and the linear update in plain torch (fp32 math, like the fused kernel);
    with UniPC's corrector first, its state updated in place as the fused step does."""
    uncond, cond = model_output.float().chunk(2)
    m = uncond + GUIDANCE * (cond - uncond)
    if rescale:
        m = _rescale_noise_cfg(m, cond, rescale)
    x = latents.float()
    if prev_x0 is None:
        return (coef.cx * x + coef.cm * m).to(model_output.dtype)
    x0 = coef.px * x + coef.pm * m
    if corrector is not None:
        x = (corrector.kx * last_sample.float() + corrector.k0 * prev_x0.float()
             + corrector.k1 * older_x0.float() + corrector.kt * x0)
        last_sample.copy_(x)
    prev = coef.cx * x + coef.cm * m + coef.c0 * x0 + coef.c1 * prev_x0.float()
    (older_x0 if corrector is not None else prev_x0).copy_(x0)
    return prev.to(model_output.dtype)


def _build_compile(case: Case):
    coef, corrector = _coefficients(case.params["scheduler"])
    rescale = case.params["rescale"]
    torch.compiler.reset()  # a fresh compile per case (dynamo stops recompiling after a few)
    compiled = torch.compile(partial(_plain_step, coef=coef, corrector=corrector, rescale=rescale))
    return lambda i: compiled(i.model_output, i.latents, i.prev_x0, i.older_x0, i.last_sample)


def _skip_compile(case: Case, device: torch.device) -> str | None:
    return cpu_compile_skip(device) or _skip_diffusers(case, device)


SUITE = Suite(
    name="scheduler_step",
    description="classifier-free guidance (+ rescale) and one scheduler step, fp16",
    bound="memory",
    cases=cases,
    providers=(
        Provider("mmfast-triton", _build_mmfast, _skip_mmfast),
        Provider("mmfast-cuda", partial(_build_mmfast, backend="cuda"), _skip_mmfast_cuda),
        Provider("diffusers", _build_diffusers, _skip_diffusers),
        Provider("torch-compile", _build_compile, _skip_compile),
    ),
    plot_x="scheduler",
    plot_panels=("model", "rescale"),
    targets=(Target("mmfast-triton", 0.85,
                    "issue 7: fused scheduler + guidance step >= 85% of measured copy bandwidth"),),
)
