"""The Qwen2.5-VL production path (packed, head dim 80, fused rotary) compiled ahead of
time for sm_90a, no GPU needed: its backward spilled 4 KB/thread (dK/dV) and 1.2 KB (dQ)
with the head dim padded to 128 and rotary tiles rotated inside the loops. Full table:
scripts/sm90_attention_resources.py (run in a subprocess: the tests' interpreter mode
replaces the compiler)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[2]

PROGRAM = """
import json, sys, tempfile, torch, triton
sys.path.insert(0, "scripts")
import sm90_attention_resources as sm90
triton.knobs.cache.dir = tempfile.mkdtemp()
with sm90.gpu_configs() as launches:
    sm90.general_launches(80, torch.bfloat16, rotary=True, varlen=True)
rows = []
for fn, args, kwargs in launches:
    if fn.__name__ in ("_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"):
        row = sm90.compile_launch(fn, args, kwargs)
        rows.append(dict(row, kernel=fn.__name__, pieces=[kwargs["HEAD_D0"], kwargs["HEAD_D1"]],
                         overflow=kwargs["LOOP"]))
print(json.dumps(rows))
"""


def test_qwen25_vl_rotary_backward_compiles_without_spills():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", PROGRAM], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    # The main pass of each kernel, then (packed) the overflow pass past max_seqlen.
    assert sorted((r["kernel"], r["overflow"]) for r in rows) == [
        ("_attention_bwd_dkdv_kernel", False), ("_attention_bwd_dkdv_kernel", True),
        ("_attention_bwd_dq_kernel", False), ("_attention_bwd_dq_kernel", True)]
    for row in rows:
        assert row["pieces"] == [64, 16], row
        assert row["spill_stores"] == 0, row
        if not row["overflow"]:  # the overflow pass's small tiles are for correctness, not speed
            assert row["wgmma"] > 0 and row["mma_sync"] == 0, row
