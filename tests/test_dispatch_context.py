"""set_backend overrides per thread and per async context (issue 16 item 10), with blocks
that restore exactly what they found, and misspelt backend names refused."""

import asyncio
import threading

import pytest
import torch

import mmfast
from mmfast import dispatch
from mmfast.dispatch import Backend, Call, NoBackendError, OpFamily

CALL = Call(device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture
def toy(monkeypatch):
    family = OpFamily("toy")
    for name in ("fast", "general", "other"):
        family.register(Backend(name, run=lambda: None))
    monkeypatch.setitem(dispatch._families, "toy", family)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    return family


def test_interleaved_with_blocks_leave_nothing_behind(toy):
    first, second = mmfast.set_backend("general", op="toy"), None
    first.__enter__()
    second = mmfast.set_backend("other", op="toy")
    second.__enter__()
    assert toy.select(CALL).name == "other"
    first.__exit__(None, None, None)  # out of order: the open block's override stays
    assert toy.select(CALL).name == "other"
    second.__exit__(None, None, None)
    assert toy.select(CALL).name == "fast"
    assert dispatch.current_overrides() == {}


def test_with_restores_exactly_what_it_found(toy):
    mmfast.set_backend("general", op="toy")
    try:
        with mmfast.set_backend("other", op="toy"):
            mmfast.set_backend(None, op="toy")  # statements inside the block are undone with it
            mmfast.set_backend("fast")
            assert toy.select(CALL).name == "fast"
        assert dispatch.current_overrides() == {"toy": "general"}
    finally:
        mmfast.set_backend(None, op="toy")
    assert dispatch.current_overrides() == {}


def test_statements_do_not_pile_up(toy):
    for _ in range(100):
        mmfast.set_backend("general", op="toy")
        mmfast.set_backend(None, op="toy")
    assert len(dispatch._layers.get()) <= 2
    assert dispatch.current_overrides() == {}


def test_threads_do_not_see_each_others_overrides(toy):
    barrier = threading.Barrier(2)
    seen = {"a": [], "b": []}

    def thread_a():
        with mmfast.set_backend("other", op="toy"):
            for _ in range(300):
                barrier.wait()
                seen["a"].append(toy.select(CALL).name)

    def thread_b():
        for _ in range(300):
            barrier.wait()
            seen["b"].append(toy.select(CALL).name)

    with mmfast.set_backend("general", op="toy"):  # the main thread's: neither thread sees it
        threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert toy.select(CALL).name == "general"
    assert seen == {"a": ["other"] * 300, "b": ["fast"] * 300}


def test_a_thread_override_does_not_break_another_threads_call(toy):
    # Issue 16: an override in one thread made another thread's plain call raise.
    refusing = OpFamily("toy")
    refusing.register(Backend("fast", run=lambda: None, dtypes=(torch.float16,)))
    refusing.register(Backend("general", run=lambda: None))
    dispatch._families["toy"] = refusing
    inside, done = threading.Event(), threading.Event()

    def holder():
        with mmfast.set_backend("fast", op="toy"):
            inside.set()
            done.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    inside.wait(10)
    try:
        assert refusing.select(CALL).name == "general"  # the holder's override would refuse float32
    finally:
        done.set()
        t.join()


def test_async_tasks_have_their_own_overrides(toy):
    async def task(name, ready, proceed):
        with mmfast.set_backend(name, op="toy"):
            ready.set()
            await proceed.wait()
            return toy.select(CALL).name

    async def main():
        ready = [asyncio.Event(), asyncio.Event()]
        proceed = asyncio.Event()
        tasks = [asyncio.create_task(task(n, r, proceed)) for n, r in zip(("general", "other"), ready)]
        for r in ready:
            await r.wait()
        outside = toy.select(CALL).name
        proceed.set()
        return outside, await asyncio.gather(*tasks)

    assert asyncio.run(main()) == ("fast", ["general", "other"])
    assert dispatch.current_overrides() == {}


def test_misspelt_backend_names_raise_naming_the_valid_ones(toy, monkeypatch):
    with pytest.raises(ValueError, match=r"name: no op family has a backend 'trtion' \(known: .*triton"):
        mmfast.set_backend("trtion")
    with pytest.raises(TypeError, match="name: expected a backend name"):
        mmfast.set_backend(3)
    x = torch.randn(2, 8)
    monkeypatch.setenv(dispatch.ENV_VAR, "trtion")
    with pytest.raises(ValueError, match=r"MMFAST_BACKEND: no op family has a backend 'trtion' \(known: .*torch"):
        mmfast.ops.rms_norm(x)
    monkeypatch.setenv(dispatch.ENV_VAR, "norm=trtion")
    with pytest.raises(ValueError, match=r"MMFAST_BACKEND: op family 'norm' has no backend 'trtion' \(known: .*torch"):
        mmfast.ops.rms_norm(x)
    monkeypatch.setenv(dispatch.ENV_VAR, "nrom=torch")
    with pytest.raises(ValueError, match=r"MMFAST_BACKEND: unknown op family 'nrom'"):
        mmfast.ops.rms_norm(x)
    monkeypatch.setenv(dispatch.ENV_VAR, "norm=torch")
    assert mmfast.ops.rms_norm(x).shape == x.shape


def test_no_backend_error_is_a_value_error():
    assert issubclass(NoBackendError, ValueError)
    with pytest.raises(ValueError, match="dtype float64 not supported"):
        mmfast.ops.gelu(torch.randn(3, dtype=torch.float64), backend="triton")


def test_compile_traces_through_an_override_and_retraces_when_it_changes(toy):
    def fn(x):
        return x + 1 if toy.select(CALL).name == "other" else x - 1

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    x = torch.zeros(2)
    assert compiled(x).tolist() == [-1.0, -1.0]
    with mmfast.set_backend("other", op="toy"):
        assert compiled(x).tolist() == [1.0, 1.0]
    assert compiled(x).tolist() == [-1.0, -1.0]
    x, w = torch.randn(4, 16), torch.randn(16)
    norm = torch.compile(lambda x, w: mmfast.ops.rms_norm(x, w), fullgraph=True, backend="eager")
    with mmfast.set_backend("torch", op="norm"):
        torch.testing.assert_close(norm(x, w), mmfast.ops.rms_norm(x, w, backend="torch"))


def test_info_reports_an_invalid_environment_override(monkeypatch, capsys):
    from mmfast.cli import main

    monkeypatch.setenv(dispatch.ENV_VAR, "norm=trtion")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "MMFAST_BACKEND is invalid, every call will fail: MMFAST_BACKEND: op family 'norm' has no backend 'trtion'" in out
