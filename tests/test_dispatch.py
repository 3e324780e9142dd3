"""Backend dispatch: declared support, reasons, priority, overrides and their errors."""

import dataclasses
import logging

import pytest
import torch

import mmfast
from mmfast import dispatch
from mmfast.dispatch import Backend, Call, NoBackendError, OpFamily

CPU = torch.device("cpu")


def _family(*backends) -> OpFamily:
    family = OpFamily("toy")
    for backend in backends:
        family.register(backend)
    return family


def _call(dtype=torch.float16, **kwargs) -> Call:
    return Call(device=CPU, dtype=dtype, **kwargs)


@pytest.fixture
def toy(monkeypatch):
    """A registered family 'toy' with a picky fast backend before a general one."""
    family = _family(
        Backend("fast", run=lambda: "fast", dtypes=(torch.float16,), head_dims=(64, 80),
                layouts=("packed",), check=lambda call: ["odd length"] if call.facts.get("odd") else []),
        Backend("general", run=lambda: "general"),
    )
    monkeypatch.setitem(dispatch._families, "toy", family)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    return family


def test_first_backend_without_reasons_runs(toy):
    assert toy.select(_call(head_dim=80, layout="packed")).name == "fast"
    assert toy.select(_call(torch.float32, head_dim=80, layout="packed")).name == "general"
    assert toy.select(_call(head_dim=72, layout="packed")).name == "general"
    assert toy.select(_call(head_dim=64, layout="padded")).name == "general"
    assert toy.select(_call(head_dim=64, layout="packed", facts={"odd": True})).name == "general"


def test_reasons_name_what_is_unsupported(toy):
    reasons = toy.backends["fast"].reasons(_call(torch.float32, head_dim=72, layout="padded"))
    assert reasons == [
        "dtype float32 not supported (supports float16)",
        "head dim 72 not supported",
        "layout padded not supported (supports packed)",
    ]


def test_missing_module_and_device_are_reasons():
    backend = Backend("ext", run=None, devices=("cuda",), requires=("surely_not_a_module_xyz",))
    assert backend.reasons(_call()) == [
        "module 'surely_not_a_module_xyz' is not installed",
        "device cpu not supported (supports cuda)",
    ]


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    backend = Backend("triton", run=None, triton=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.reasons(_call()) == []
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backend.reasons(_call()) == ["device cpu runs Triton only under TRITON_INTERPRET=1"]


def test_dot_backend_refuses_bfloat16_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dot = Backend("triton", run=None, triton=True, dot=True)
    assert dot.reasons(_call(torch.bfloat16)) == ["the Triton interpreter computes bfloat16 tl.dot wrongly"]
    assert dot.reasons(_call(torch.float16)) == []
    assert Backend("triton", run=None, triton=True).reasons(_call(torch.bfloat16)) == []


def test_no_backend_error_lists_every_backend():
    family = _family(
        Backend("a", run=None, dtypes=(torch.float16,)),
        Backend("b", run=None, devices=("cuda",)),
    )
    with pytest.raises(NoBackendError) as info:
        family.select(_call(torch.float32))
    message = str(info.value)
    assert "a: dtype float32 not supported" in message
    assert "b: device cpu not supported" in message


def test_backend_argument_overrides_priority(toy):
    assert toy.select(_call(head_dim=80, layout="packed"), backend="general").name == "general"


def test_forced_backend_that_cannot_take_the_call_raises(toy):
    with pytest.raises(NoBackendError, match=r"backend 'fast' \(chosen by backend=\) cannot take .*head dim 72"):
        toy.select(_call(head_dim=72, layout="packed"), backend="fast")


def test_unknown_backend_name_raises(toy):
    with pytest.raises(ValueError, match="op family 'toy' has no backend 'nope' .*known: fast, general"):
        toy.select(_call(), backend="nope")
    with pytest.raises(ValueError, match="name: op family 'toy' has no backend 'nope'"):
        mmfast.set_backend("nope", op="toy")
    with pytest.raises(TypeError, match="backend: expected a backend name"):
        toy.select(_call(), backend=3)
    with pytest.raises(ValueError, match="op: unknown op family 'nope'"):
        mmfast.set_backend("torch", op="nope")


def test_set_backend_per_family_and_as_context(toy):
    call = _call(head_dim=80, layout="packed")
    with mmfast.set_backend("general", op="toy"):
        assert toy.select(call).name == "general"
        with mmfast.set_backend("fast", op="toy"):
            assert toy.select(call).name == "fast"
        assert toy.select(call).name == "general"
    assert toy.select(call).name == "fast"
    mmfast.set_backend("general", op="toy")
    try:
        assert toy.select(call).name == "general"
        assert toy.select(call, backend="fast").name == "fast"  # the call's argument wins
    finally:
        mmfast.set_backend(None, op="toy")
    assert toy.select(call).name == "fast"


def test_global_override_applies_only_where_the_backend_exists(toy):
    call = _call(head_dim=80, layout="packed")
    with mmfast.set_backend("general"):
        assert toy.select(call).name == "general"
        # 'norm' has no backend called 'general': it dispatches as usual.
        norm_call = Call(device=CPU, dtype=torch.float64, facts={"hidden": 8})
        assert mmfast.ops.norm.NORM.select(norm_call).name == "torch"


def test_environment_variable(toy, monkeypatch):
    call = _call(head_dim=80, layout="packed")
    monkeypatch.setenv(dispatch.ENV_VAR, "general")
    assert toy.select(call).name == "general"
    monkeypatch.setenv(dispatch.ENV_VAR, "norm=torch, toy=general")
    assert toy.select(call).name == "general"
    monkeypatch.setenv(dispatch.ENV_VAR, "norm=torch")
    assert toy.select(call).name == "fast"
    monkeypatch.setenv(dispatch.ENV_VAR, "toy=fast")
    with pytest.raises(NoBackendError, match=r"chosen by MMFAST_BACKEND"):
        toy.select(_call(head_dim=72, layout="packed"))
    # set_backend beats the environment.
    monkeypatch.setenv(dispatch.ENV_VAR, "toy=fast")
    with mmfast.set_backend("general", op="toy"):
        assert toy.select(call).name == "general"


def test_environment_variable_reaches_the_public_op(monkeypatch):
    x = torch.randn(3, 16)
    monkeypatch.setenv(dispatch.ENV_VAR, "norm=torch")
    calls = []
    torch_backend = mmfast.ops.norm.NORM.backends["torch"]
    spy = dataclasses.replace(torch_backend, run=lambda *a: calls.append(1) or torch_backend.run(*a))
    monkeypatch.setitem(mmfast.ops.norm.NORM.backends, "torch", spy)
    mmfast.ops.rms_norm(x)
    assert calls == [1]


def test_choice_logged_once_at_debug(toy, caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "_logged", set())
    call = _call(head_dim=80, layout="packed")
    with caplog.at_level(logging.DEBUG, logger="mmfast.dispatch"):
        for _ in range(3):
            toy.select(call)
    messages = [r.getMessage() for r in caplog.records if r.name == "mmfast.dispatch"]
    assert messages == ["toy: backend fast for cpu float16"]


def test_duplicate_backend_name_rejected(toy):
    with pytest.raises(ValueError, match="already has a backend 'fast'"):
        toy.register(Backend("fast", run=None))


def test_norm_on_cpu_without_interpreter_uses_native(monkeypatch):
    # Where no Triton kernel runs, PyTorch's fused ops, not the float32/float64 oracle.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    call = Call(device=CPU, dtype=torch.float32, facts={"hidden": 64, "param_dtypes": (torch.float32,), "rms": True})
    assert mmfast.ops.norm.NORM.select(call).name == "native"
    # The remembered CPU choice follows TRITON_INTERPRET, and the oracle keeps float64
    # and weights of another dtype.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert mmfast.ops.norm.NORM.select(call).name == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert mmfast.ops.norm.NORM.select(call).name == "native"
    assert mmfast.ops.norm.NORM.select(dataclasses.replace(call, dtype=torch.float64)).name == "torch"
    mixed = Call(device=CPU, dtype=torch.bfloat16, facts={"hidden": 64, "param_dtypes": (torch.float32,), "rms": True})
    assert mmfast.ops.norm.NORM.select(mixed).name == "torch"


def test_remembered_cpu_choice_asks_a_replaced_backend_again(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    call = Call(device=CPU, dtype=torch.float32, facts={"hidden": 64, "param_dtypes": (), "rms": True})
    family = mmfast.ops.norm.NORM
    assert family.select(call).name == "native"
    refusing = dataclasses.replace(family.backends["native"], check=lambda call: ["refuses"])
    with monkeypatch.context() as patched:
        patched.setitem(family.backends, "native", refusing)
        assert family.select(call).name == "torch"
    assert family.select(call).name == "native"  # and again once it is back


def test_remembered_cpu_choice_is_still_reported(monkeypatch):
    # mmfast profile lists the backends that ran from _log_choice: a remembered choice too.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    seen = []
    monkeypatch.setattr(dispatch, "_log_choice", lambda op, backend, call: seen.append((op, backend)))
    call = Call(device=CPU, dtype=torch.float32, facts={"hidden": 32, "param_dtypes": (), "rms": False})
    for _ in range(3):
        mmfast.ops.norm.NORM.select(call)
    assert seen == [("norm", "native")] * 3
