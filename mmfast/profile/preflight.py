"""Checks ``mmfast profile`` makes before it builds anything, so that a run that cannot
work stops at once with one line: the libraries the workload needs, whether the
``--backend`` asked for can run on this device, a ``--resolution`` a preset's vision tower
does not take, and whether the preset or checkpoint fits in this machine's memory.

Argument errors are ValueErrors whose text starts with the argument (``--backend: ...``);
``mmfast profile`` prints them as argparse does.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import torch

from mmfast.profile import memory

# The libraries each workload's reference side (and its model classes) come from.
REQUIRED = {"vlm": ("transformers",), "ldm": ("diffusers", "transformers"), "sam": ("transformers",)}
EXTRA = "mmfast[hf]"


def check_libraries(kind: str) -> None:
    """A ValueError naming the extra that installs what ``kind`` needs, when it is missing."""
    missing = [name for name in REQUIRED[kind] if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"mmfast profile {kind} needs {' and '.join(missing)}, not installed here: "
                         f"pip install '{EXTRA}'")


def check_backend(name: str, device: torch.device, dtype: torch.dtype, log=print) -> None:
    """Refuse a ``--backend`` that cannot take a call of any op family on this device in
    this dtype (e.g. triton on a CPU without TRITON_INTERPRET), with dispatch's reasons;
    name the families it cannot take when only some are out of reach."""
    import mmfast.ops  # noqa: F401  (registers the op families)
    from mmfast.dispatch import Call, op_families

    call = Call(device=device, dtype=dtype)
    usable, blocked = [], {}
    for family_name, family in op_families().items():
        backend = family.backends.get(name)
        if backend is None:
            continue
        try:
            reasons = backend.reasons(call)
        except KeyError:  # a limit that depends on each call's facts (head dim, sizes): not decidable here
            reasons = []
        if reasons:
            blocked[family_name] = reasons
        else:
            usable.append(family_name)
    if not blocked:
        return
    dtype_name = str(dtype).removeprefix("torch.")
    if not usable:
        reasons = list(dict.fromkeys(reason for family in blocked.values() for reason in family))
        raise ValueError(f"--backend {name}: cannot run on this machine ({device.type}, {dtype_name}): "
                         f"{'; '.join(reasons)}")
    log(f"note: --backend {name} cannot take {device.type} {dtype_name} calls of {', '.join(sorted(blocked))}; "
        "a run that reaches those ops stops there")


def check_resolution(args, meta_model) -> None:
    """The --resolution error of a vision tower that takes one image size, from the
    preset's meta-device model (no memory) instead of after building the real one."""
    from mmfast.profile import vlm

    vlm.inputs(args.model, meta_model, args.batch, args.resolution, args.text_tokens, torch.device("meta"),
               torch.get_default_dtype())


def _family(args) -> list[str]:
    """The presets of the asked one's model, largest first."""
    from mmfast.profile import ldm, sam, vlm

    if args.kind == "vlm":
        return list(vlm.MODELS[args.model].presets)
    if args.kind == "sam":
        return list(reversed(sam.PRESETS))
    family = ldm.prefix(args.preset)
    return [preset for preset in reversed(ldm.PRESETS) if ldm.prefix(preset) == family]


def _estimate(args, preset: str, dtype: torch.dtype, meta_model=None) -> memory.Estimate:
    from mmfast.profile import ldm, ldm_wan, vlm

    if args.kind == "vlm":
        return memory.estimate_vlm(vlm.MODELS[args.model], preset, dtype, meta_model)
    if args.kind == "sam":
        return memory.estimate_sam(preset, dtype, args.batch)
    estimate = memory.estimate_ldm(preset, dtype)
    if ldm.prefix(preset) == ldm_wan.PREFIX:  # a video's activations grow with its size, not with the weights
        extra, what = ldm_wan.activation_estimate(preset, dtype, args.batch, args.resolution, args.frames)
        estimate = dataclasses.replace(estimate, activation_bytes=extra, activations=what)
    return estimate


def _fitting_preset(args, dtype: torch.dtype, free: int) -> str:
    """The largest preset of the same model smaller than the asked one that fits in ``free``."""
    family = _family(args)
    for preset in family[family.index(args.preset) + 1:]:
        if preset in memory.SMALL_PRESETS or _estimate(args, preset, dtype).total_bytes <= free:
            return preset
    return family[-1]


def check_model(args, device: torch.device, dtype: torch.dtype, force: bool = False,
                log=print) -> memory.Estimate | None:
    """For a preset, refuse a --resolution its vision tower does not take; refuse a preset
    or checkpoint whose estimate (:mod:`mmfast.profile.memory`) exceeds what ``device``
    has free, naming both numbers and what fits instead; ``force`` builds it anyway after
    saying so. Returns the estimate (None for a tiny preset, which is not estimated, and a
    checkpoint without safetensors files)."""
    if args.checkpoint is not None:
        need = memory.estimate_checkpoint(args.kind, args.checkpoint, dtype)
        return None if need is None else _check_fits(args, need, f"--checkpoint {args.checkpoint}", device, dtype,
                                                      force, log)
    meta_model = None
    if args.kind == "vlm":
        spec = _spec(args)
        if args.preset not in memory.SMALL_PRESETS or (spec.fixed_resolution and args.resolution is not None):
            meta_model = memory.meta_vlm(spec, args.preset, dtype)
        if spec.fixed_resolution and args.resolution is not None:
            check_resolution(args, meta_model)
    if args.kind == "sam":
        from mmfast.profile import sam

        sam.check_resolution(args.preset, args.resolution)
    if args.preset in memory.SMALL_PRESETS:
        return None
    need = _estimate(args, args.preset, dtype, meta_model)
    return _check_fits(args, need, f"--preset {args.preset}", device, dtype, force, log)


def _check_fits(args, need: memory.Estimate, what: str, device: torch.device, dtype: torch.dtype, force: bool,
                log) -> memory.Estimate:
    free, where = memory.available_bytes(device)
    if need.total_bytes <= free:
        return need
    have = f"this machine has {free / memory.GIB:.1f} GiB {where}"
    if force:
        log(f"--force: building {what.removeprefix('--')}, which needs {need.describe()}, "
            f"although {have}")
        return need
    if args.checkpoint is None:
        instead = f"--preset {_fitting_preset(args, dtype, free)} fits on this {device.type}"
    elif dtype.itemsize == 4:
        instead = "--dtype bfloat16 halves the weights"
    else:
        instead = "a machine with more memory is needed"
    raise ValueError(f"{what} ({str(dtype).removeprefix('torch.')}): needs {need.describe()}, but {have}; "
                     f"{instead}; --force builds it anyway")


def _spec(args):
    from mmfast.profile import vlm

    return vlm.MODELS[args.model]
