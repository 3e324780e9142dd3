"""Damaged and hostile checkpoint directories (issue 16): each gives one ValueError that
names the file and the field or tensor, before anything large is allocated; nothing is
cast silently and no file outside the directory is read."""

import json
import os
import struct

import pytest
import torch
from torch import nn

from mmfast.models import Qwen25VLForConditionalGeneration
from mmfast.models.checkpoint import load_checkpoint, read_config, save_pretrained, weight_files


class Tiny(nn.Module):
    def __init__(self, tie=True):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.register_buffer("steps", torch.arange(3))  # an integer buffer
        if tie:
            self.head.weight = self.embed.weight


def _saved(tmp_path, tie=True, **config):
    torch.manual_seed(0)
    return save_pretrained(Tiny(tie), tmp_path, {"architectures": ["Tiny"], **config})


def _header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(path, header, payload):
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload)


def test_truncated_and_corrupted_safetensors_name_the_file(tmp_path):
    _saved(tmp_path)
    weights = tmp_path / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:20])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        load_checkpoint(Tiny(), tmp_path)
    weights.write_bytes(good[:8] + b"{" * 4 + good[12:])  # byte-flipped header
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        weight_files(tmp_path)


def test_dtype_relabelled_or_integer_parameter_is_refused(tmp_path):
    _saved(tmp_path)
    weights = tmp_path / "model.safetensors"
    header, payload = _header(weights)
    header["embed.weight"]["dtype"] = "I32"  # same size, other kind: would load as integers cast to float
    _write_header(weights, header, payload)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'embed.weight' is stored as I32 .*float32"):
        load_checkpoint(Tiny(), tmp_path)

    from safetensors.torch import save_file

    state = {"embed.weight": torch.randint(0, 5, (11, 8)), "steps": torch.arange(3)}
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"tensor 'embed.weight' is stored as I64"):
        load_checkpoint(Tiny(), tmp_path)
    state = {"embed.weight": torch.randn(11, 8), "steps": torch.arange(3.0)}  # a float into an int buffer
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"tensor 'steps' is stored as F32 but the module's is int64"):
        load_checkpoint(Tiny(), tmp_path)
    state = {"embed.weight": torch.randn(11, 8, dtype=torch.float16), "steps": torch.arange(3, dtype=torch.int32)}
    save_file(state, str(weights))  # float into float and int into int still cast
    loaded = load_checkpoint(Tiny(), tmp_path)
    assert loaded.embed.weight.dtype == torch.float32 and loaded.steps.tolist() == [0, 1, 2]


def test_tied_names_with_different_values_are_refused(tmp_path):
    from safetensors.torch import save_file

    _saved(tmp_path)
    embed = torch.randn(11, 8)
    save_file({"embed.weight": embed, "head.weight": embed.clone(), "steps": torch.arange(3)},
              str(tmp_path / "model.safetensors"))
    assert torch.equal(load_checkpoint(Tiny(), tmp_path).head.weight, embed)  # same values: fine
    save_file({"embed.weight": embed, "head.weight": embed + 1, "steps": torch.arange(3)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"tensor 'head.weight' differs from 'embed.weight'.*ties them"):
        load_checkpoint(Tiny(), tmp_path)
    assert torch.equal(load_checkpoint(Tiny(tie=False), tmp_path).head.weight, embed + 1)


def test_vlm_with_tied_embeddings_and_a_different_lm_head(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = Qwen25VLForConditionalGeneration.from_preset("tiny")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" in state
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"tensor 'lm_head.weight' differs from .*embed_tokens.weight"):
        Qwen25VLForConditionalGeneration.from_pretrained(tmp_path)


@pytest.mark.parametrize("text, match", [
    ("{not json", r"config\.json is not valid JSON"),
    ("[1, 2]", r"config\.json must hold a JSON object, got a JSON list"),
])
def test_invalid_config_json_names_the_file(tmp_path, text, match):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        read_config(tmp_path)


@pytest.mark.parametrize("value", [-1, 10 ** 12, 1e12, 2.5, float("nan")])
def test_absurd_sizes_are_refused_before_any_allocation(tmp_path, value):
    torch.manual_seed(0)
    Qwen25VLForConditionalGeneration.from_preset("tiny").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["vocab_size"] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: field 'text_config\.vocab_size' must be an integer"):
        Qwen25VLForConditionalGeneration.from_pretrained(tmp_path)


def test_a_size_that_fits_the_config_but_not_the_file_fails_before_allocation(tmp_path, monkeypatch):
    torch.manual_seed(0)
    Qwen25VLForConditionalGeneration.from_preset("tiny").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["vocab_size"] = 2 ** 24  # plausible, but the file's embeddings are smaller
    (tmp_path / "config.json").write_text(json.dumps(config))
    materialised = []
    monkeypatch.setattr(nn.Module, "to_empty", lambda self, **kw: materialised.append(1))
    with pytest.raises(ValueError, match=r"shape mismatch for .*embed_tokens.weight"):
        Qwen25VLForConditionalGeneration.from_pretrained(tmp_path)
    assert materialised == []


@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors",
                                   "C:\\weights.safetensors", ""])
def test_index_shards_outside_the_directory_are_refused(tmp_path, shard):
    ckpt = tmp_path / "ckpt"
    save_pretrained(Tiny(tie=False), ckpt, {}, max_shard_size=200)
    (tmp_path / "outside.safetensors").write_bytes((next(ckpt.glob("model-0000*"))).read_bytes())
    index = ckpt / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["embed.weight"] = shard
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="outside the checkpoint directory|non-empty strings"):
        weight_files(ckpt)


def test_symlinked_shards_inside_the_directory_load(tmp_path):
    # Hugging Face's cache: snapshot files are symlinks into a blobs/ folder elsewhere.
    ckpt, blobs = tmp_path / "snapshot", tmp_path / "blobs"
    src = Tiny(tie=False)
    save_pretrained(src, ckpt, {}, max_shard_size=200)
    blobs.mkdir()
    for shard in ckpt.glob("model-0000*"):
        shard.rename(blobs / shard.name)
        os.symlink(blobs / shard.name, shard)
    loaded = load_checkpoint(Tiny(tie=False), ckpt)
    assert torch.equal(loaded.head.weight, src.head.weight)


def test_pipeline_component_faults(tmp_path):
    from mmfast.models import _pipeline_dir as layout

    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"unet: .*config\.json must hold a JSON object"):
        layout.read_json(folder / "config.json", "unet")
    with pytest.raises(ValueError, match=r"field 'block_out_channels' must be an integer in"):
        layout.check_config_sizes({"block_out_channels": [32, -64]}, folder / "config.json")
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../../x.safetensors"}}))
    with pytest.raises(ValueError, match="outside the checkpoint directory"):
        layout.weight_files(folder)
    (folder / "diffusion_pytorch_model.safetensors.index.json").unlink()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors: not a readable safetensors"):
        layout.read_state_dict(folder)


def test_pipeline_component_dtype_and_tie_checks(tmp_path):
    from safetensors.torch import save_file

    from mmfast.models import _pipeline_dir as layout

    folder = tmp_path / "text_encoder"
    folder.mkdir()
    embed = torch.randn(11, 8)
    save_file({"embed.weight": embed, "head.weight": embed + 1, "steps": torch.arange(3)},
              str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'embed.weight' and 'head.weight' .* differ"):
        layout.load_weights(Tiny(), folder)
    save_file({"embed.weight": torch.ones(11, 8, dtype=torch.int64), "steps": torch.arange(3)},
              str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"tensor 'embed.weight' .* stored as torch.int64"):
        layout.load_weights(Tiny(), folder)


@pytest.mark.parametrize("text, match", [
    ("{not json", "is not valid JSON"),
    ('{"architectures": ["Qwen2_5_VLForConditionalGeneration"], "text_config": {"vocab_size": -1}}',
     "field 'text_config.vocab_size'"),
])
def test_profile_cli_reports_a_damaged_checkpoint_in_one_line(tmp_path, capsys, text, match):
    from mmfast.cli import main

    (tmp_path / "config.json").write_text(text)
    assert main(["profile", "vlm", "--checkpoint", str(tmp_path), "--new-tokens", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "config.json") in err[0] and match in err[0], err
