"""Checkpoint faults the loaders must name: a tensor missing, one too many, one mis-shaped."""

import torch


def break_weights(file, missing: str, shrunk: str) -> None:
    """Rewrite the safetensors ``file`` without ``missing``, with ``shrunk`` cut to 2 rows and
    with an unexpected ``extra.weight``."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(file))
    state.pop(missing)
    state[shrunk] = state[shrunk][:2].contiguous()
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(file))
