"""Tuning tables (mmfast.tuning): file naming, the MMFAST_TUNING override, matching."""

import json

import pytest
import torch

from mmfast import tuning


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(tuning, "_tables", {})
    monkeypatch.delenv(tuning.ENV_VAR, raising=False)


def _write(tmp_path, table):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    return path


def test_table_file_is_named_after_the_device():
    assert tuning.table_file("NVIDIA H100 80GB HBM3").name == "nvidia-h100-80gb-hbm3.json"


def test_no_table_means_no_winner():
    assert tuning.table_for("Fake GPU") == {}
    assert tuning.winner("Fake GPU", "norm", torch.bfloat16, {"hidden": 4096}) is None


def test_override_for_one_device_or_all(tmp_path, monkeypatch):
    wins = {"norm": [{"backend": "cuda", "dtypes": ["bfloat16"], "hidden": [1024, 8192]}]}
    monkeypatch.setenv(tuning.ENV_VAR, str(_write(tmp_path, {"device": "Fake GPU", "wins": wins})))
    assert tuning.winner("Fake GPU", "norm", torch.bfloat16, {"hidden": 1024}) == "cuda"
    assert tuning.winner("Fake GPU", "norm", torch.bfloat16, {"hidden": 1023}) is None
    assert tuning.winner("Fake GPU", "norm", torch.float16, {"hidden": 4096}) is None
    assert tuning.winner("Fake GPU", "norm", torch.bfloat16, {}) is None      # fact unknown
    assert tuning.winner("Fake GPU", "attention", torch.bfloat16, {"hidden": 4096}) is None
    assert tuning.winner("Other GPU", "norm", torch.bfloat16, {"hidden": 4096}) is None
    tuning._tables.clear()
    monkeypatch.setenv(tuning.ENV_VAR, str(_write(tmp_path, {"device": "*", "wins": wins})))
    assert tuning.winner("Other GPU", "norm", torch.bfloat16, {"hidden": 4096}) == "cuda"


def test_first_matching_entry_wins(tmp_path, monkeypatch):
    wins = {"norm": [{"backend": "triton", "hidden": [1, 2048]}, {"backend": "cuda"}]}
    monkeypatch.setenv(tuning.ENV_VAR, str(_write(tmp_path, {"device": "*", "wins": wins})))
    assert tuning.winner("G", "norm", torch.float32, {"hidden": 2048}) == "triton"
    assert tuning.winner("G", "norm", torch.float32, {"hidden": 2049}) == "cuda"


def test_unreadable_table_names_the_variable(tmp_path, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    monkeypatch.setenv(tuning.ENV_VAR, str(bad))
    with pytest.raises(ValueError, match="MMFAST_TUNING: cannot read tuning table"):
        tuning.table_for("Fake GPU")
    monkeypatch.setenv(tuning.ENV_VAR, str(_write(tmp_path, {"device": "*", "wins": []})))
    with pytest.raises(ValueError, match="is not a tuning table"):
        tuning.table_for("Other")


def test_checked_in_tables_are_well_formed():
    for path in tuning.TABLE_DIR.glob("*.json"):
        table = json.loads(path.read_text())
        assert tuning.table_file(table["device"]) == path
        for family, entries in table["wins"].items():
            assert all("backend" in entry for entry in entries), (path, family)


def test_cpu_calls_are_never_measured():
    reason = tuning.not_measured_reason("norm", "cuda", torch.device("cpu"), torch.float32, {})
    assert "nothing is measured on cpu" in reason
