"""Checkpoint directories: save_pretrained / load_checkpoint round trips (single file,
sharded, diffusers naming), name rules, tied weights, and errors that name every problem."""

import json

import pytest
import torch
from torch import nn

from mmfast.models.checkpoint import (CheckpointError, architecture_of, from_pretrained, load_checkpoint,
                                      read_config, read_tensors, register_architecture, save_pretrained,
                                      weight_files)


class Tiny(nn.Module):
    def __init__(self, hidden=8, tie=True):
        super().__init__()
        self.embed = nn.Embedding(11, hidden)
        self.body = nn.Sequential(nn.Linear(hidden, hidden), nn.LayerNorm(hidden))
        self.head = nn.Linear(hidden, 11, bias=False)
        if tie:
            self.head.weight = self.embed.weight
        self.register_buffer("scratch", torch.zeros(3), persistent=False)


def _random(module):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0)


def test_round_trip_single_file_with_tied_weights(tmp_path):
    src = _random(Tiny())
    save_pretrained(src, tmp_path, {"architectures": ["Tiny"], "hidden": 8})
    assert read_config(tmp_path)["hidden"] == 8
    names = set(weight_files(tmp_path))
    assert "embed.weight" in names and "head.weight" not in names  # tied: written once
    dst = load_checkpoint(Tiny(), tmp_path)
    _assert_same(src, dst)
    assert dst.head.weight is dst.embed.weight


def test_round_trip_sharded_diffusers_naming(tmp_path):
    src = _random(Tiny(hidden=16, tie=False))
    save_pretrained(src, tmp_path, {"_class_name": "Tiny"}, max_shard_size="1KB",
                    weights_name="diffusion_pytorch_model.safetensors")
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 3 and all(s.startswith("diffusion_pytorch_model-") for s in shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in src.state_dict().values())
    _assert_same(src, load_checkpoint(Tiny(hidden=16, tie=False), tmp_path))
    assert torch.equal(read_tensors(tmp_path, ["head.weight"])["head.weight"], src.head.weight)


def test_name_rules_rename_and_drop(tmp_path):
    from safetensors.torch import save_file

    src = _random(Tiny(tie=False))
    legacy = {name.replace("body.", "layers."): t for name, t in src.state_dict().items()}
    legacy["rotary.inv_freq"] = torch.ones(2)
    save_file(legacy, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError):
        load_checkpoint(Tiny(tie=False), tmp_path)
    dst = load_checkpoint(Tiny(tie=False), tmp_path, rules=[(r"^layers\.", "body."), (r"inv_freq$", None)])
    _assert_same(src, dst)


def test_error_names_every_missing_unexpected_and_mismatched_key(tmp_path):
    from safetensors.torch import save_file

    state = dict(_random(Tiny(tie=False)).state_dict())
    del state["body.0.bias"], state["body.1.weight"]
    state["extra.weight"] = torch.ones(2)
    state["head.weight"] = torch.ones(5, 8)
    state["body.0.weight"] = torch.ones(8, 4)
    save_file(state, str(tmp_path / "model.safetensors"))
    target = Tiny(tie=False)
    before = target.embed.weight.detach().clone()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(target, tmp_path)
    err = info.value
    assert sorted(err.missing) == ["body.0.bias", "body.1.weight"]
    assert err.unexpected == ["extra.weight"]
    assert sorted(name for name, _, _ in err.mismatched) == ["body.0.weight", "head.weight"]
    message = str(err)
    for name in ("body.0.bias", "body.1.weight", "extra.weight", "(5, 8)", "(11, 8)", "(8, 4)"):
        assert name in message
    assert torch.equal(target.embed.weight, before)  # nothing copied from a bad checkpoint
    # Not strict: missing and unexpected keys pass, a shape mismatch still raises.
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(Tiny(tie=False), tmp_path, strict=False)


def test_missing_files_pickle_and_unknown_architecture(tmp_path, monkeypatch):
    from mmfast.models import checkpoint

    monkeypatch.setattr(checkpoint, "_ARCHITECTURES", dict(checkpoint._ARCHITECTURES))  # registry left as found
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_config(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickle"):
        weight_files(tmp_path)
    with pytest.raises(ValueError, match="unknown architecture.*LlamaForCausalLM"):
        architecture_of({"architectures": ["LlamaForCausalLM"]})

    @register_architecture("TinyForTests")
    class Registered(Tiny):
        @classmethod
        def from_pretrained(cls, directory):
            return load_checkpoint(cls(), directory)

    src = _random(Tiny())
    save_pretrained(src, tmp_path / "ok", {"architectures": ["TinyForTests"]})
    loaded = from_pretrained(tmp_path / "ok")
    assert isinstance(loaded, Registered)
    _assert_same(src, loaded)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="max_shard_size"):
        save_pretrained(Tiny(), tmp_path, {}, max_shard_size="lots")
    with pytest.raises(ValueError, match="weights_name"):
        save_pretrained(Tiny(), tmp_path, {}, weights_name="weights.pt")


def test_config_dtype_and_from_pretrained_default_to_the_checkpoints_dtype(tmp_path):
    from mmfast.models import Qwen25VLForConditionalGeneration
    from mmfast.models.checkpoint import config_dtype

    assert config_dtype({"torch_dtype": "float16"}) == torch.float16
    assert config_dtype({"dtype": "bfloat16", "torch_dtype": "float16"}) == torch.bfloat16
    assert config_dtype({"text_config": {"dtype": "bfloat16"}}) == torch.float32  # sub-configs only when named
    assert config_dtype({"text_config": {"dtype": "bfloat16"}}, "text_config") == torch.bfloat16
    assert config_dtype({"dtype": "no_such_dtype"}) == torch.float32
    torch.manual_seed(0)
    Qwen25VLForConditionalGeneration.from_preset("tiny").to(torch.bfloat16).save_pretrained(tmp_path)
    loaded = Qwen25VLForConditionalGeneration.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.lm_head.weight.dtype == torch.bfloat16 and not loaded.training
