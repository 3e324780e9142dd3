"""The sm_90a compile gate (mmfast/compile_gate): every Triton entry kernel compiled for an
H100 ahead of time, without a GPU, through the project's own launchers at model shapes.

The quick subset runs here in a fresh interpreter (this process has the Triton
interpreter on; kernels defined under it cannot be compiled) with a Triton cache of its
own, so no earlier compile can hide a failure. The full set:
``python -m mmfast.compile_gate --full`` (writes bench/results/sm90_resources.jsonl).

The other tests check that the gate's parts can fail: a kernel that reads a plain
module-level float, one that spills, a kernel no case launches, a stale known issue.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, tmp_path: Path, timeout: int) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter: compiler on, every autotune config, own cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MMFAST_AUTOTUNE")}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_quick_subset_compiles_for_sm90a_without_spills(tmp_path):
    verdict_file = tmp_path / "verdict.json"
    done = subprocess.run(
        [sys.executable, "-m", "mmfast.compile_gate", "--jobs", "2", "--json", str(verdict_file)],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MMFAST_AUTOTUNE")},
    )
    assert verdict_file.exists(), done.stdout[-5000:] + done.stderr[-5000:]
    verdict = json.loads(verdict_file.read_text())
    report = "\n".join(line for line in done.stdout.splitlines() if not line.startswith("  "))
    assert verdict["failures"] == [], report
    assert verdict["uncovered"] == [], report
    assert verdict["stale"] == [], report
    assert verdict["compile_errors"] == 0, report
    assert verdict["dot_rows"] > 0 and verdict["wgmma_rows"] > 0, report
    assert done.returncode == 0, report


def test_every_entry_kernel_is_in_the_quick_subset():
    # Coverage without compiling: the quick cases' recorded launches reach every entry
    # kernel (the compile itself is the slow test above).
    code = """
    import json
    from mmfast.compile_gate.gate import _plan, entry_kernels
    launched = {f"{l.module}.{l.name}" for _, l in _plan(quick=True, families=())}
    print(json.dumps({"uncovered": sorted(set(entry_kernels()) - launched), "launched": len(launched)}))
    """
    done = _python(code, REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["uncovered"] == [], f"entry kernels no quick case launches: {result['uncovered']}"
    assert result["launched"] >= 30


_TOY = '''
import triton
import triton.language as tl

_PLAIN = 0.5                    # what activation.py had: refused by the compiler
_CONST = tl.constexpr(0.5)


@triton.jit
def _reads_plain_float_kernel(X, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < n) * _PLAIN, mask=offs < n)


@triton.jit
def _reads_constexpr_kernel(X, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < n) * _CONST, mask=offs < n)


@triton.jit
def _huge_row_kernel(X, n, BLOCK: tl.constexpr):
    # A whole 64k-wide float32 row in the registers of one warp: it has to spill.
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n).to(tl.float32)
    tl.store(X + offs, (x * tl.sum(x * x, axis=0)).to(X.dtype.element_ty), mask=offs < n)
'''


def test_gate_reports_compile_errors_and_spills(tmp_path):
    (tmp_path / "toy_kernels.py").write_text(_TOY)
    code = """
    import json, torch
    import toy_kernels as k
    from mmfast.compile_gate.fake_cuda import fake_cuda, tensor
    from mmfast.compile_gate.record import recording
    from mmfast.compile_gate.sm90 import compile_launch
    with fake_cuda(), recording() as launches:
        x = tensor(65536, dtype=torch.float16)
        k._reads_plain_float_kernel[(1,)](x, 100, BLOCK=128)
        k._reads_constexpr_kernel[(1,)](x, 100, BLOCK=128)
        k._huge_row_kernel[(1,)](x, 65536, BLOCK=65536, num_warps=1)
    out = {}
    for l in launches:
        c = compile_launch(l)
        out[l.name] = {"ok": c.ok, "error": c.error, "spill": c.spill_bytes, "regs": c.regs}
    print(json.dumps(out))
    """
    done = _python(code, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert not out["_reads_plain_float_kernel"]["ok"]
    assert "_PLAIN" in out["_reads_plain_float_kernel"]["error"]
    assert out["_reads_constexpr_kernel"]["ok"] and out["_reads_constexpr_kernel"]["spill"] == 0
    assert out["_reads_constexpr_kernel"]["regs"] > 0
    assert out["_huge_row_kernel"]["ok"] and out["_huge_row_kernel"]["spill"] > 0


def test_launchers_see_an_h100_and_autotuners_record_every_config(tmp_path):
    code = """
    import json, torch
    from mmfast.compile_gate.fake_cuda import fake_cuda, tensor
    from mmfast.compile_gate.record import recording
    from mmfast.kernels import attention, patch_embed
    with fake_cuda(), recording() as launches:
        q = tensor(2, 100, 4, 64, dtype=torch.bfloat16)
        attention.attention_fwd(q, q, q, None, None, 100, 100, -1, -1, 0.1)
        x = tensor(1, 3, 28, 28, dtype=torch.bfloat16)
        patch_embed.patch_embed_fwd(x, tensor(32, 3 * 14 * 14, dtype=torch.bfloat16), None, None, None, 14)
        # A view that starts 2 bytes into its storage: not 16-byte aligned.
        flat = tensor(64, dtype=torch.float16)[1:]
    print(json.dumps({
        "attention": [l.constexprs["BLOCK_M"] for l in launches if l.name == "_attention_fwd_kernel"],
        "patch_configs": sum(l.name == "_patch_embed_fwd_kernel" for l in launches),
        "configs_listed": len(patch_embed._ALL_CONFIGS),
        "offset": flat.storage_offset(), "device": str(flat.device),
    }))
    """
    done = _python(code, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["attention"] == [128]          # the GPU tile (the CPU/interpreter tile is 16)
    assert out["patch_configs"] == out["configs_listed"] == 4
    assert out["offset"] == 1 and out["device"] == "cuda:0"


def test_known_issues_are_strict(monkeypatch):
    from mmfast.compile_gate import known_issues

    listed = known_issues.KNOWN_ATTENTION_ISSUES
    entry = known_issues.KnownIssue("_attention_fwd_kernel", "padding", "a test entry", {"head_dim": (72, 80)})
    monkeypatch.setattr(known_issues, "KNOWN_ATTENTION_ISSUES", (entry,))
    row = {"kernel": entry.kernel, "constexprs": {}, "dims": {"head_dim": 80}, "problems": ["padding", "spill"]}
    failures, expected = known_issues.classify(row, row["problems"])
    assert failures == ["spill"] and expected and expected[0].startswith("padding")
    # The same row without the problem: the entry is stale and must be deleted.
    assert entry in known_issues.stale_entries([{**row, "problems": []}])
    assert entry not in known_issues.stale_entries([row])
    # Only attention kernels may be listed.
    for issue in listed:
        assert "attention" in issue.kernel, issue


def test_update_replaces_only_the_named_families_rows(tmp_path):
    # ``--full --only F --update``: F's rows replaced, the others kept, families in the
    # order of cases.py whatever order the file had.
    from mmfast.compile_gate.table import read_rows, replace_families, write_rows

    def rows(family, *shapes):
        return [{"family": family, "shape": s} for s in shapes]

    old = rows("attention", "a1", "a2") + rows("norm", "n1") + rows("attention_rel_pos", "stale") + rows("gone", "g")
    new = rows("attention_rel_pos", "r1", "r2") + rows("channel_rms_norm", "c1")
    path = tmp_path / "table.jsonl"
    write_rows(path, old)
    table = replace_families(read_rows(path), new, ("attention_rel_pos", "channel_rms_norm"))
    assert [(r["family"], r["shape"]) for r in table] == [
        ("norm", "n1"), ("channel_rms_norm", "c1"), ("attention", "a1"), ("attention", "a2"),
        ("attention_rel_pos", "r1"), ("attention_rel_pos", "r2"), ("gone", "g")]
    assert read_rows(tmp_path / "missing.jsonl") == []
    with pytest.raises(ValueError, match="families"):
        replace_families(old, new, ())
    with pytest.raises(ValueError, match="outside families"):
        replace_families(old, new, ("attention_rel_pos",))
