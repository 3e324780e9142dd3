"""The hf_decoder_attention suite without a GPU: registry, cases and FLOP model, why it
skips on CPU, and its runner on a tiny config (prefill and a decode step over a given
cache) giving the same hidden states for sdpa and mmfast. Timings mean nothing here."""

import pytest
import torch

import mmfast
from mmfast.bench import suites
from mmfast.bench.suites import hf_decoder_attention as hf

pytest.importorskip("transformers")


def test_registered_with_cases_and_flops():
    suite = suites.get("hf_decoder_attention")
    assert suite is hf.SUITE and [p.name for p in suite.providers] == ["transformers-sdpa", "transformers-fa2", "mmfast"]
    for quick in (False, True):
        cases = suite.cases(quick, torch.device("cuda"))
        assert len({c.name for c in cases}) == len(cases) and all(c.flops > 0 for c in cases)
    assert hf._flops(1, [3], [3]) == 2 * hf._layer_weights() * 3 + 4 * 28 * 128 * 6  # 6 causal pairs
    reason = suite.provider("mmfast").skip(suite.cases(True, torch.device("cpu"))[0], torch.device("cpu"))
    assert "CUDA" in reason


def test_runner_on_a_tiny_config_agrees_across_implementations(monkeypatch):
    monkeypatch.setattr(hf, "QWEN2_7B", {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 2,
                                         "num_key_value_heads": 1, "vocab_size": 64})
    monkeypatch.setattr(hf, "HEAD_DIM", 32)
    monkeypatch.setattr(hf, "DTYPE", torch.float32)
    cpu = torch.device("cpu")
    for case in (hf.Case("prefill", {"layers": 2}, lambda d: hf._prefill_inputs([6, 3], 2, 6, d)),
                 hf.Case("decode", {"layers": 2}, lambda d: hf._decode_inputs(2, [5, 2], 5, d))):
        inputs = case.make_inputs(cpu)
        with mmfast.set_backend("torch"):
            want, got = (hf._provider(impl)(case)(inputs) for impl in ("sdpa", "mmfast"))
        valid = inputs["attention_mask"][:, -want.shape[1]:].bool()
        torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
