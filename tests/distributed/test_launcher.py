"""The shared gloo launcher reports a failing rank (its traceback) instead of passing or
hanging, and runs a passing check on every rank."""

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launcher import run_ranks


def _sum_of_ranks(rank, world, expected):
    x = torch.tensor([float(rank)])
    dist.all_reduce(x)
    assert x.item() == expected


def _rank_one_fails(rank, world):
    if rank == 1:
        raise ValueError("rank one refuses")
    dist.barrier()  # rank 0 waits on a peer that never comes: the launcher must end it


def test_every_rank_runs_the_check(tmp_path):
    run_ranks(_sum_of_ranks, 3, tmp_path, 3.0)


def test_a_failing_rank_fails_the_test_with_its_traceback(tmp_path):
    with pytest.raises(pytest.fail.Exception, match=r"(?s)rank 1:.*ValueError: rank one refuses"):
        run_ranks(_rank_one_fails, 2, tmp_path)
    with pytest.raises(pytest.fail.Exception, match="rank 0"):
        run_ranks(_sum_of_ranks, 2, tmp_path, 100.0)  # a wrong result fails too; the same tmp_path serves again
