"""One launcher for the tests that run torch.distributed on CPU: ``run_ranks(check, world,
tmp_path, *args)`` starts ``world`` processes, each joins a gloo group
(``init_process_group``, the file store under ``tmp_path``: no port to race for) and runs
``check(rank, world, *args)``; the test fails with every failing rank's traceback.

``start_method``: "fork" (the default where the platform has it) starts the workers with
the test process's imports (torch, mmfast, diffusers), so a worker costs no import time;
"spawn" starts fresh interpreters (``check`` and ``args`` must then pickle: a module-level
function of a test module does). Each worker runs ``torch.set_num_threads(1)``: several
processes share a small CPU. ``timeout`` bounds every collective, so a rank that fails
before one makes its peers fail instead of hanging the test run.
"""

from __future__ import annotations

import datetime
import traceback
import uuid
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = datetime.timedelta(seconds=120)


def _worker(rank, check, world, init_file, timeout, args, failures, finished):
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timeout)
        check(rank, world, *args)
        dist.barrier()
        finished.put(rank)
    except BaseException:
        failures.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(check, world: int, tmp_path, *args, start_method: str | None = None,
              timeout: datetime.timedelta = TIMEOUT) -> None:
    """Run ``check(rank, world, *args)`` on ``world`` gloo ranks (see the module docstring);
    ``tmp_path``: a directory (pytest's fixture) for the rendezvous file."""
    if start_method is None:
        start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(start_method)
    failures, finished = ctx.SimpleQueue(), ctx.SimpleQueue()
    init_file = tmp_path / f"dist_init_{uuid.uuid4().hex}"  # fresh: a run may follow another in tmp_path
    try:
        mp.start_processes(_worker, args=(check, world, init_file, timeout, args, failures, finished),
                           nprocs=world, join=True, start_method=start_method)
    except Exception as error:
        messages = []
        while not failures.empty():
            messages.append(failures.get())
        done = set()
        while not finished.empty():
            done.add(finished.get())
        if not messages and done == set(range(world)):
            # Every rank passed every check and the final barrier; a process then died in
            # gloo's teardown (seen rarely under load, a SIGABRT at exit). The results were
            # all checked.
            warnings.warn(f"a worker crashed after all checks passed: {error}")
            return
        pytest.fail("\n".join(messages) or f"a worker failed: {error}")
    done = {finished.get() for _ in range(world)}
    assert done == set(range(world)), f"ranks that finished: {sorted(done)}"
