"""Bad arguments to the sequence-parallel API, checked without starting any process
(torch.distributed is not initialised in the test process)."""

import pytest
import torch
import torch.distributed as dist

import mmfast
from mmfast.distributed import gather_sequence, shard_length, shard_sequence, ulysses_attention


def test_shard_length_rounds_up_and_checks_its_arguments():
    assert [shard_length(n, 4) for n in (0, 1, 4, 5, 9)] == [0, 1, 1, 2, 3]
    assert shard_length(7, 1) == 7
    with pytest.raises(ValueError, match="length"):
        shard_length(-1, 2)
    with pytest.raises(ValueError, match="world_size"):
        shard_length(8, 0)
    with pytest.raises(ValueError, match="length"):
        shard_length(True, 2)


def test_uninitialised_or_wrong_group_is_named():
    assert not dist.is_initialized()
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="group: torch.distributed is not initialised"):
        ulysses_attention(x, x, x)
    with pytest.raises(TypeError, match="group: expected a torch.distributed ProcessGroup"):
        ulysses_attention(x, x, x, "world")
    with pytest.raises(ValueError, match="group: torch.distributed is not initialised"):
        shard_sequence(x)
    with pytest.raises(ValueError, match="dim"):
        shard_sequence(x, dim=4)
    with pytest.raises(ValueError, match="dim"):
        gather_sequence(x, 4, dim=-5)


def test_patch_names_sequence_parallel_and_patches_nothing():
    # Checked before the family is looked up: even a target no family knows gets this error.
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="sequence_parallel: expected a torch.distributed ProcessGroup"):
        mmfast.patch(model, sequence_parallel="world")
    assert not hasattr(model, "_mmfast_patch_handle")


def test_world_group_read_before_init_process_group_is_named(monkeypatch):
    # dist.group.WORLD is None until init_process_group: in a multi-process launch
    # (torchrun sets WORLD_SIZE) an explicit None is that mistake, not "no sequence parallelism".
    pytest.importorskip("diffusers")
    from tests.integrations.diffusers_models import tiny_flux

    assert dist.group.WORLD is None
    model = tiny_flux()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="sequence_parallel: got None in a launch of WORLD_SIZE=2 processes"):
        mmfast.patch(model, sequence_parallel=dist.group.WORLD)
    assert not hasattr(model, "_mmfast_patch_handle")
    mmfast.patch(model).undo()  # left out: runs as usual, launched or not
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: None means no sequence parallelism
    handle = mmfast.patch(model, sequence_parallel=None)
    assert handle.replaced and not handle.sequence_parallel_models
    handle.undo()
