"""A progress bar while ``mmfast profile`` builds a large model: random-weight presets of
billions of parameters take minutes on a CPU, and a silent terminal reads as a hang.

The bar counts parameters as modules register them (torch's global parameter
registration hook, removed when the build ends); its total is the preset's estimate
(:mod:`mmfast.profile.memory`). Each phase (mmfast's model, the reference, copying the
weights) shows beside it.
"""

from __future__ import annotations

import contextlib

import torch

# Below this many parameters a build takes seconds at most: no bar.
LARGE = 200_000_000


class _Quiet:
    def set_postfix_str(self, text: str) -> None:
        pass


@contextlib.contextmanager
def building(parameters: int | None, what: str):
    """Yields an object whose ``set_postfix_str(phase)`` names the current phase; shows a
    bar only when ``parameters`` (the expected count) is large."""
    if parameters is None or parameters < LARGE:
        yield _Quiet()
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=parameters, desc=f"building {what}", unit="param", unit_scale=True, leave=False)

    def count(module, name, param):
        if param is not None:
            bar.update(param.numel())

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(count)
    try:
        yield bar
    finally:
        handle.remove()
        bar.close()
