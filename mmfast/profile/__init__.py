"""``mmfast profile vlm|ldm|sam``: a complete model on mmfast kernels against what users
would otherwise run (transformers / diffusers), side by side on this machine. ``vlm --model``
picks Qwen2.5-VL (the default), LLaVA or BLIP-2; a ``--checkpoint`` says which it holds.
``sam`` times SAM's image encoder (image embeddings per second, :mod:`mmfast.profile.sam`):
transformers' model patched with ``mmfast.patch`` against the same weights unpatched.
``ldm`` times Stable Diffusion 1.5 / 3, FLUX.1 / FLUX.2 (a ``flux*`` preset or a FLUX
pipeline checkpoint, :mod:`mmfast.profile.ldm_flux`) or, with a ``wan-*`` preset or a
WanPipeline checkpoint, Wan 2.x text-to-video (:mod:`mmfast.profile.ldm_wan`).

The sides: mmfast, the reference in eager mode, and (by default on a GPU,
``--compile-reference``) the reference with torch.compile. Warm-up, then timed rounds that
run every side once in turn (interleaved, so drift hits all alike) until every figure's
spread is small or the time budget is spent; each figure is a median with its spread
(interquartile range and min..max), and a speedup is stated only where the spreads do not
overlap. Then per side peak memory and a torch.profiler breakdown of one run (top ops by
self time). Prints a table and writes JSON (every sample) and a PNG chart (when matplotlib
is importable) under ``--out``; ``--trace`` also writes Chrome traces.

Without a GPU it runs the tiny presets and says loudly that the numbers are not GPU
numbers; without ``TRITON_INTERPRET`` the mmfast side then runs the PyTorch backends of its
ops (dispatch picks them), and the output lists the backends that actually ran.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import sys

import torch

from mmfast.profile import ldm, ldm_wan, measure, preflight, report, sam, vlm
from mmfast.profile.memory import SMALL_PRESETS
from mmfast.profile.stats import compare, figure

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# (GPU default, CPU default)
DEFAULTS = {
    # The GPU defaults are issue 8's time-to-first-token case: one 1344 px image + 256 text tokens.
    "vlm": {"new_tokens": (64, 4), "text_tokens": (256, 16)},  # the model and preset: vlm.choose_model
    "qwen2.5-vl": {"resolution": (1344, 56)},  # the other VLMs take their tower's image size
    "ldm": {"preset": ("sd15", "tiny"), "steps": (30, 2)},
    "sam": {"preset": ("sam-vit-b", "tiny")},  # at the preset's image size (1024 px for the real ones)
    "any": {"dtype": ("bfloat16", "float32"), "compile_reference": (True, False)},
}
# The measuring plan (measure.Plan), (GPU default, CPU default). A CPU run of a tiny preset
# stays well under a minute; a shared, noisy CPU mostly ends on the time budget.
MEASURE_DEFAULTS = {"warmup": (2, 1), "min_repeats": (5, 6), "max_repeats": (50, 40), "time_budget": (60.0, 20.0),
                    "target_spread": (0.02, 0.05)}
COMPILE_BACKEND = "inductor"  # of the torch.compile reference side
# The --help text: plain words (the module docstring is reStructuredText for the docs).
DESCRIPTION = ("A complete model on mmfast kernels against what users would otherwise run "
               "(transformers for vlm and sam, diffusers for ldm), side by side on this machine. "
               "vlm --model picks Qwen2.5-VL (the default), LLaVA or BLIP-2; sam times the SAM image encoder "
               "patched with mmfast.patch against the same weights unpatched.")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mmfast profile", description=DESCRIPTION)
    kinds = top.add_subparsers(dest="kind", required=True, metavar="{vlm,ldm,sam}")
    for kind, presets, what in (("vlm", vlm.PRESETS, "a vision-language model vs transformers"),
                                ("ldm", ldm.PRESETS, "Stable Diffusion (1.5 or 3), FLUX or Wan 2.x "
                                 "text-to-video vs diffusers"),
                                ("sam", sam.PRESETS, "the SAM image encoder (image embeddings per second), "
                                 "patched vs transformers sdpa and eager")):
        p = kinds.add_parser(kind, help=what, description=f"Profile {what}.")
        gpu_default = "the model's largest" if kind == "vlm" else DEFAULTS[kind]["preset"][0]
        p.add_argument("--preset", choices=presets, help=f"model size, random weights (default: "
                       f"{gpu_default} on a GPU, tiny on a CPU)" + (
                           "; sam-vit-b and sam-vit-h are the ViT-B and ViT-H encoders at 1024 px"
                           if kind == "sam" else ""))
        if kind == "vlm":
            p.add_argument("--model", choices=vlm.MODELS, help=f"which VLM (default {vlm.DEFAULT_MODEL}; with "
                           "--checkpoint, the one its config.json names); presets: " + "; ".join(
                               f"{name} {'/'.join(spec.presets)}" for name, spec in vlm.MODELS.items()))
        if kind == "sam":
            p.set_defaults(checkpoint=None, cuda_graph=False)
        else:
            p.add_argument("--checkpoint", metavar="DIR", help="load weights from a local directory instead of a "
                           "preset")
        p.add_argument("--batch", type=_positive, default=1,
                       help=f"{'images' if kind == 'sam' else 'prompts'} per run (default 1)")
        p.add_argument("--resolution", type=_positive, metavar="PX", help="image side in pixels" + (
            " (SAM takes its preset's size only: 1024, tiny 128)" if kind == "sam" else ""))
        if kind == "vlm":
            p.add_argument("--new-tokens", type=_positive, help="tokens generated per prompt (default 64 GPU, 4 CPU)")
            p.add_argument("--text-tokens", type=_positive, help="text tokens per prompt beside the image "
                           "(default 256 GPU, 16 CPU)")
        elif kind == "ldm":
            p.add_argument("--steps", type=_positive, help="denoising steps (default 30 GPU, 2 CPU; FLUX.1 28, "
                           "klein 4 on a GPU; Wan: the pipeline's 50, wan-tiny on a CPU 2)")
            p.add_argument("--guidance", type=float, help="guidance scale (default 7.5; FLUX.1's embedded guidance "
                           "3.5; none for the step-distilled klein; Wan: the pipeline's 5.0)")
            p.add_argument("--frames", type=_positive, help="Wan presets: video frames, 4k + 1 (default 33; "
                           "wan-tiny 5); --resolution N then gives N x N (default 480 x 832)")
        if kind != "sam":
            p.add_argument("--cuda-graph", action="store_true", help="mmfast side: replay each "
                           f"{'decode' if kind == 'vlm' else 'denoising'} step as a CUDA graph")
        p.add_argument("--dtype", choices=DTYPES, help="default bfloat16 on a GPU, float32 on a CPU")
        p.add_argument("--repeats", type=_positive, metavar="N", help="exactly N timed rounds (default: from "
                       "--min-repeats to --max-repeats, until every figure's interquartile range is within 5%% "
                       "(GPU: 2%%) of its median or --time-budget is spent)")
        p.add_argument("--min-repeats", type=_positive, metavar="N",
                       help="at least N timed rounds (default 5 GPU, 6 CPU)")
        p.add_argument("--max-repeats", type=_positive, metavar="N",
                       help="at most N timed rounds (default 50 GPU, 40 CPU)")
        p.add_argument("--time-budget", type=_positive_float, metavar="SECONDS",
                       help="stop timing after this long, once --min-repeats ran (default 60 GPU, 20 CPU)")
        p.add_argument("--warmup", type=_non_negative, metavar="N", help="untimed rounds first (default 2 GPU, 1 CPU)")
        p.add_argument("--backend", help="force this mmfast backend on the mmfast side (e.g. torch, triton)")
        p.add_argument("--compile-reference", action=argparse.BooleanOptionalAction,
                       help="also run the reference with torch.compile (default: on a GPU; a CPU compile takes minutes)")
        p.add_argument("--top", type=_positive, default=12, help="ops per side in the breakdown (default 12)")
        p.add_argument("--trace", metavar="OUT.json", help="write the mmfast run's Chrome trace here "
                       "(the reference's next to it, as OUT.reference.json)")
        p.add_argument("--out", metavar="DIR", default="mmfast-profile", help="where the JSON and PNG go "
                       f"(default ./mmfast-profile), named profile_{kind}{'_MODEL' if kind == 'vlm' else ''}_PRESET")
        p.add_argument("--force", action="store_true", help="build a preset even when its memory estimate "
                       "exceeds what this machine has free")
    return top


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {text}")
    return value


def _plan(args, on_gpu: bool) -> measure.Plan:
    """The measuring plan from --repeats/--min-repeats/--max-repeats/--time-budget/--warmup
    and the device's defaults; a bound given alone moves the other default to meet it."""
    pick = 0 if on_gpu else 1
    given = {name: getattr(args, name, None) for name in MEASURE_DEFAULTS}
    if getattr(args, "repeats", None) is not None:
        clash = [f"--{name.replace('_', '-')}" for name in ("min_repeats", "max_repeats") if given[name] is not None]
        if clash:
            raise ValueError(f"--repeats: gives the exact number of timed rounds; leave out {' and '.join(clash)}")
        given["min_repeats"] = given["max_repeats"] = args.repeats
    low, high = given["min_repeats"], given["max_repeats"]
    if low is not None and high is not None and low > high:
        raise ValueError(f"--min-repeats: {low} is more than --max-repeats {high}")
    values = {name: MEASURE_DEFAULTS[name][pick] if value is None else value for name, value in given.items()}
    if high is not None:
        values["min_repeats"] = min(values["min_repeats"], high)
    if low is not None:
        values["max_repeats"] = max(values["max_repeats"], low)
    return measure.Plan(warmup=values["warmup"], min_repeats=values["min_repeats"],
                        max_repeats=values["max_repeats"], budget_s=values["time_budget"],
                        target_spread=values["target_spread"])


def _fill_defaults(args, on_gpu: bool) -> None:
    pick = 0 if on_gpu else 1
    if args.kind == "vlm":
        vlm.choose_model(args, on_gpu)
    if args.kind == "ldm":
        ldm.fill_defaults(args, on_gpu)  # the model's own (FLUX's, Wan's steps and guidance; Wan's frames)
    for group in (DEFAULTS[args.kind], DEFAULTS.get(getattr(args, "model", None), {}), DEFAULTS["any"]):
        for name, values in group.items():
            if getattr(args, name, None) is None and not (name == "preset" and args.checkpoint):
                setattr(args, name, values[pick])


def _validate(args, on_gpu: bool) -> None:
    preflight.check_libraries(args.kind)
    # Where results go, checked now rather than after minutes of measuring.
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out: {args.out} is a file, not a directory")
    if args.trace is not None and os.path.isdir(args.trace):
        raise ValueError(f"--trace: {args.trace} is a directory; give a file name such as trace.json")
    if getattr(args, "cuda_graph", False) and not on_gpu:
        raise ValueError("--cuda-graph: needs a CUDA device, and this machine has none")
    if args.checkpoint is not None:
        if not os.path.isdir(args.checkpoint):
            raise ValueError(f"--checkpoint: {args.checkpoint} is not a directory")
        (vlm if args.kind == "vlm" else ldm).check_checkpoint(args.checkpoint)
    if args.backend is not None:
        import mmfast.ops  # noqa: F401  (registers the op families)
        from mmfast.dispatch import op_families

        known = sorted({name for family in op_families().values() for name in family.backends})
        if args.backend not in known:
            raise ValueError(f"--backend: no op family has a backend {args.backend!r} (known: {', '.join(known)})")


def _cpu_name() -> str:
    """The CPU's model name (Linux) or architecture, and the threads torch uses on it."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{name}, {torch.get_num_threads()} threads"


def _trace_paths(trace: str | None):
    if trace is None:
        return None, None
    stem, ext = os.path.splitext(trace)
    return trace, f"{stem}.reference{ext or '.json'}"


def _weights_bytes(*modules) -> int:
    seen, total = set(), 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total


def _backend_note(device: torch.device, ran: set) -> str:
    from mmfast.dispatch import triton_interpreted

    listing = ", ".join(f"{op}={backend}" for op, backend in sorted(ran)) or "none recorded"
    if device.type == "cuda":
        why = ""
    elif triton_interpreted():
        why = " (TRITON_INTERPRET=1: Triton kernels run under the interpreter, so their times are meaningless)"
    else:
        why = " (no GPU and no TRITON_INTERPRET: dispatch ran the PyTorch backends of mmfast's ops)"
    return f"mmfast backends that ran: {listing}{why}"


def run(args, log=print) -> dict:
    """Build both sides, time and profile them; returns the results (what the JSON holds)."""
    from tqdm.auto import tqdm

    import mmfast

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    if args.preset is not None and args.checkpoint is not None:
        raise ValueError("--preset/--checkpoint: give one or the other (a checkpoint brings its own config)")
    _validate(args, on_gpu)
    plan = _plan(args, on_gpu)
    _fill_defaults(args, on_gpu)
    dtype = DTYPES[args.dtype]
    if args.backend is not None:
        preflight.check_backend(args.backend, device, dtype, log)
    estimate = preflight.check_model(args, device, dtype, args.force, log)
    device_name = torch.cuda.get_device_name(device) if on_gpu else _cpu_name()
    if not on_gpu:
        subject = "a small model" if args.preset in SMALL_PRESETS else args.checkpoint or f"preset {args.preset}"
        log("=" * 78 + f"\n  NO GPU: these are CPU numbers of {subject}, NOT GPU numbers.\n"
            "  They show that the profile runs, not how fast mmfast is.\n" + "=" * 78)

    compile_backend = COMPILE_BACKEND if args.compile_reference else None
    what = f"{args.kind}{' ' + args.model if args.kind == 'vlm' else ''}"
    log(f"building {what} ({args.checkpoint or 'preset ' + args.preset}) on {device}, {args.dtype} ...")
    if args.kind == "vlm":
        ours, reference, description = vlm.build(vlm.MODELS[args.model], args.preset, args.checkpoint, device, dtype,
                                                 estimate and estimate.phases)
        batch_inputs = vlm.inputs(args.model, ours, args.batch, args.resolution, args.text_tokens, device, dtype)
        args.resolution = batch_inputs.pixels
        prompt_tokens = batch_inputs.input_ids.shape[1]
        sides = vlm.sides(ours, reference, batch_inputs, compile_backend, args.cuda_graph)
        one_call = args.new_tokens  # what side.generate takes
        weights = (_weights_bytes(ours), _weights_bytes(reference))
    elif args.kind == "sam":
        ours, reference, eager, description = sam.build(args.preset, device, dtype, estimate and estimate.phases)
        pixels = sam.inputs(reference, args.batch, device, dtype)
        args.resolution = pixels.shape[-1]
        one_call = None  # side.encode takes nothing
        sides = sam.sides(ours, reference, eager, pixels, compile_backend)
        # the compiled side holds the sdpa model's weights
        weights = (_weights_bytes(ours), _weights_bytes(reference), _weights_bytes(eager), _weights_bytes(reference))
    else:
        work = ldm.workload(args.preset, args.checkpoint)  # ldm, or ldm_wan for Wan
        ours, reference, description = work.build(args.preset, args.checkpoint, device, dtype,
                                                  estimate and estimate.phases)
        args.resolution = args.resolution or work.default_resolution(ours)
        video = {"frames": args.frames} if work is ldm_wan else {}
        options = video or {"preset": args.preset}  # FLUX's prompt length depends on the preset
        sides = work.sides(ours, reference, args.batch, args.resolution, args.steps, args.guidance, args.cuda_graph,
                           compile_backend, **options)
        one_call = "pt"
        weights = (_weights_bytes(ours), _weights_bytes(*work.reference_modules(reference)))

    traces = _trace_paths(args.trace)
    ran: set = set()
    side_scope = functools.partial(_side_scope, ran=ran, backend=args.backend)
    if args.kind == "vlm":
        samplers = [vlm.sampler(side, args.new_tokens, device) for side in sides]
    elif args.kind == "sam":
        samplers = [sam.sampler(side, device) for side in sides]
    else:
        samplers = [work.sampler(side, device) for side in sides]
    bar = tqdm(total=plan.warmup + plan.max_repeats + len(sides), desc=f"profile {args.kind}", unit="round",
               leave=False)
    scoped = [_within(functools.partial(side_scope, index), sample) for index, sample in enumerate(samplers)]
    measured = measure.interleaved(scoped, plan, progress=bar)
    columns = report.COLUMNS[args.kind]
    results_sides = []
    for index, (side, samples) in enumerate(zip(sides, measured.samples)):
        one_run = side.encode if args.kind == "sam" else functools.partial(side.generate, one_call)
        with side_scope(index):
            # a compiled side shares the reference's weights
            peak = measure.peak_memory_gib(one_run, device, weights[min(index, len(weights) - 1)])
            ops = measure.op_breakdown(one_run, device, args.top, traces[index] if index < len(traces) else None)
        bar.update(1)
        if args.kind == "vlm":
            metrics = vlm.metrics(args.batch, prompt_tokens, args.new_tokens, samples)
        elif args.kind == "sam":
            metrics = sam.metrics(args.batch, samples)
        else:
            metrics = work.metrics(args.batch, args.steps, samples)
        metrics["peak_memory_gib"] = None if peak is None else figure([peak])
        results_sides.append({"name": side.name, "metrics": metrics, "ops": ops})
    bar.close()

    basis = columns[0].key  # the headline
    ours_metrics = results_sides[0]["metrics"]
    for side in results_sides[1:]:  # how many times better mmfast is than this side, per compared figure
        side["mmfast_speedup"] = {column.key: compare(ours_metrics[column.key], side["metrics"][column.key],
                                                      column.lower_is_better)
                                  for column in columns if column.compared}
    speedups = results_sides[1]["mmfast_speedup"]  # over the eager reference
    notes = [_backend_note(device, ran)]
    if args.kind == "ldm":
        notes.append(work.reference_note(reference))
    elif args.kind == "sam":
        notes.append(sam.reference_note())
    else:
        notes.append(vlm.reference_note(args.model))
    if compile_backend is not None:
        compiled = {"vlm": "forward", "ldm": "denoiser", "sam": "sdpa model"}[args.kind]
        notes.append(f"torch.compile side: the reference's {compiled} "
                     f"compiled (backend {compile_backend!r}); its warm-up runs hold the compile time")
    return {
        "kind": args.kind, "model": description, "preset": args.preset, "checkpoint": args.checkpoint,
        "device": str(device), "device_name": device_name, "gpu_numbers": on_gpu, "dtype": args.dtype,
        "batch": args.batch, "resolution": args.resolution,
        "measurement": {"warmup": plan.warmup, "min_repeats": plan.min_repeats, "max_repeats": plan.max_repeats,
                        "time_budget_s": plan.budget_s, "target_spread": plan.target_spread,
                        "rounds": measured.rounds, "stopped": measured.stopped, "seconds": measured.seconds,
                        "order": "interleaved: each round runs every side once, in the order of sides",
                        "spread": "q1..q3 (interquartile range) and min..max of the samples"},
        **({"vlm_model": args.model, "new_tokens": args.new_tokens, "text_tokens": args.text_tokens,
            "prompt_tokens": prompt_tokens, "cuda_graph": args.cuda_graph}
           if args.kind == "vlm"
           else {"steps": args.steps, "guidance": args.guidance, "cuda_graph": args.cuda_graph, **video}
           if args.kind == "ldm" else {}),
        "backend_override": args.backend, "backends_ran": [f"{op}={b}" for op, b in sorted(ran)],
        "sides": results_sides, "speedup": speedups[basis], "speedup_basis": f"reference {basis} / mmfast {basis}",
        "speedups": speedups, "compile_reference": compile_backend is not None, "notes": notes,
        "versions": {"torch": torch.__version__, "mmfast": mmfast.__version__, **_library_versions()},
    }


@contextlib.contextmanager
def _side_scope(index: int, ran: set, backend: str | None):
    """Around every call of a side: on mmfast's (the first), record the backends that run
    and apply --backend."""
    with contextlib.ExitStack() as stack:
        if index == 0:
            import mmfast

            stack.enter_context(measure.record_backends(ran))
            if backend is not None:
                stack.enter_context(mmfast.set_backend(backend))
        yield


def _within(scope, sample):
    """``sample`` run inside a fresh ``scope()`` context each time."""
    def run_in_scope():
        with scope():
            return sample()
    return run_in_scope


def _library_versions() -> dict:
    import importlib.metadata

    versions = {}
    for name in ("transformers", "diffusers", "triton"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        results = run(args)
    except (ValueError, FileNotFoundError) as error:
        if str(error).startswith("--"):  # a bad argument: report it as argparse does
            p.error(str(error))
        # Bad input (a damaged checkpoint names its file and field): one line, no traceback.
        print(f"{p.prog}: error: {error}", file=sys.stderr)
        return 1
    size = results["resolution"]
    size = f"{size[0]} x {size[1]}" if isinstance(size, (list, tuple)) else str(size)
    size += f" px, {results['frames']} frames" if "frames" in results else " px"
    print(f"\n{results['kind']}: {results['model']}, batch {results['batch']}, {size}, "
          f"{results['dtype']}, on {results['device_name']}" + ("" if results["gpu_numbers"] else "  [CPU: NOT GPU NUMBERS]"))
    print(report.measurement(results))
    print(report.table(results))
    print(report.speedups(results))
    for note in results["notes"]:
        print(note)
    print()
    print(report.breakdown(results, args.top))
    for path in report.write(results, args.out) + [t for t in _trace_paths(args.trace) if t]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
