"""A progress bar while ``mmfast profile`` builds a large model: random-weight presets of
billions of parameters take minutes on a CPU, and a silent terminal reads as a hang.

The bar counts parameters as modules register them (torch's global parameter
registration hook, removed when the build ends), phase by phase: the estimate
(:mod:`mmfast.profile.memory`) says how many parameters each phase creates (mmfast's
model, the reference, ...). A phase that registers more than that (mmfast's UNet is
diffusers' with its blocks rebuilt) stays at its end until the next phase starts, so
the bar never runs past 100% or backwards.
"""

from __future__ import annotations

import contextlib

import torch

# Below this many parameters a build takes seconds at most: no bar.
LARGE = 200_000_000


class _Quiet:
    def phase(self, name: str) -> None:
        pass


class _Bar:
    def __init__(self, phases: dict[str, int], what: str):
        from tqdm.auto import tqdm

        self.phases = phases
        self.bar = tqdm(total=sum(phases.values()), desc=f"building {what}", unit="param", unit_scale=True,
                        leave=False)
        self.end = 0  # where the current phase ends on the bar

    def phase(self, name: str) -> None:
        """Start phase ``name``: the bar moves to the end of the previous one."""
        self.bar.update(self.end - self.bar.n)
        self.end += self.phases.get(name, 0)
        self.bar.set_postfix_str(name)

    def registered(self, module, name, param) -> None:
        if param is not None:
            self.bar.update(min(param.numel(), self.end - self.bar.n))


@contextlib.contextmanager
def building(phases: dict[str, int] | None, what: str):
    """Yields an object whose ``phase(name)`` starts each phase of the build; shows a bar
    only when ``phases`` (parameters each phase registers) add up to a large model."""
    if not phases or sum(phases.values()) < LARGE:
        yield _Quiet()
        return
    progress = _Bar(phases, what)
    handle = torch.nn.modules.module.register_module_parameter_registration_hook(progress.registered)
    try:
        yield progress
    finally:
        handle.remove()
        progress.bar.close()
