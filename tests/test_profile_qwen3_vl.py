"""``mmfast profile vlm --model qwen3-vl`` on a CPU (tiny preset, a couple of tokens): it runs
end to end, both sides hold the same weights and decode the same ids, and the defaults are
the Qwen3-VL-8B preset with a 1344 px image on a GPU."""

import json

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

import mmfast  # noqa: E402
from mmfast.cli import main  # noqa: E402
from mmfast.profile import vlm  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_end_to_end(tmp_path, capsys):
    assert main(["profile", "vlm", "--model", "qwen3-vl", "--new-tokens", "2", "--out", str(tmp_path),
                 "--repeats", "1", "--backend", "torch", "--dtype", "float32", "--top", "5"]) == 0
    data = json.loads((tmp_path / "profile_vlm_qwen3-vl_tiny.json").read_text())
    assert (data["vlm_model"], data["preset"], data["resolution"]) == ("qwen3-vl", "tiny", 64)
    for side in data["sides"]:
        first, full = (side["metrics"][key]["samples"] for key in ("time_to_first_token_s", "generate_s"))
        assert all(0 < f < g for f, g in zip(first, full))
    assert "reference: transformers Qwen3VLForConditionalGeneration" in capsys.readouterr().out


def test_sides_generate_the_same_tokens():
    cpu = torch.device("cpu")
    ours, reference, _ = vlm.build(vlm.MODELS["qwen3-vl"], "tiny", None, cpu, torch.float32)
    batch = vlm.inputs("qwen3-vl", ours, 2, 96, 16, cpu, torch.float32)  # 96 px: 6x6 patches, 9 image tokens
    assert int((batch.input_ids[0] == ours.config.image_token_id).sum()) == 9
    ours_side, reference_side = vlm.sides(ours, reference, batch)
    with mmfast.set_backend("torch"):
        got = ours_side.generate(3)
    assert got.shape == (2, batch.input_ids.shape[1] + 3)
    assert torch.equal(got, reference_side.generate(3))


def test_defaults_and_gpu_case():
    from argparse import Namespace

    from mmfast.profile.vlm_models import QWEN3_VL_RESOLUTION

    for on_gpu, preset in ((True, "qwen3-vl-8b"), (False, "tiny")):
        args = Namespace(checkpoint=None, model="qwen3-vl", preset=None)
        vlm.choose_model(args, on_gpu)
        assert args.preset == preset
    assert QWEN3_VL_RESOLUTION[0] == 1344
    args = Namespace(checkpoint=None, model=None, preset="qwen3-vl-8b")  # only Qwen3-VL has it
    vlm.choose_model(args, True)
    assert args.model == "qwen3-vl"
