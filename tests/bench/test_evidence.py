"""The GPU evidence run (scripts/gpu_evidence.sh), checked without a GPU so that it works
when one comes: a dry run on the fake clock (tiny shapes, fake timing, Triton
interpreted) through all three stages, with a stage cut off at its budget and an item
killed at its cap; a second run that skips what the first recorded; the bare-tree
bootstrap in a Python with no mmfast installed; the headline table; collect."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from mmfast.bench import evidence, evidence_checks, evidence_plan, evidence_process, suites
from mmfast.bench.evidence_record import FILES, MAX_FILES, collect
from mmfast.testing import reference_errors

ROOT = Path(__file__).resolve().parents[2]


def _summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_dry_run_stages_budgets_cut_offs_skip_and_report(tmp_path, capsys):
    torch.randn(1 << 22).exp_()  # a parallel op first, as earlier tests do: the fork must survive it
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--dry-run", "--checks", "norm-rms", "--dtypes", "float16,float32", "--suites", "norm",
              "--tests", "tests/ops/test_adaln.py"]
    # Budgets: checks 10 s, headline 20 s (cumulative deadline 30 s), rest until 150 - 10 s.
    # On the fake clock the norm kernel rows cost 40 s each: the headline stage is cut off
    # inside its first one; one rest item costs 61 s, over its 60 s cap: killed, recorded
    # as timed out; the rest stage then runs out of time too.
    code = evidence.main(common + ["--out", str(first), "--total", "150", "--budget", "checks=10",
                                   "--budget", "headline=20",
                                   "--fake-cost", "bench/norm/rms-fwd+bwd-*/torch-eager=61",
                                   "--fake-cost", "bench/norm/*/mmfast-triton=40"])
    report = capsys.readouterr().out
    assert code == 1, report  # an item timed out in this run

    files = sorted(p.name for p in first.iterdir())
    assert len(files) <= MAX_FILES and set(files) == set(FILES), files
    summary = _summary(first)
    stages = summary["runs"][-1]["stages"]
    assert [stages[s]["deadline_s"] for s in ("checks", "headline", "rest")] == [10.0, 30.0, 140.0]
    assert stages["checks"]["status"] == "done" and stages["checks"]["used_s"] == 2.0
    assert stages["headline"]["status"] == "cut off at its budget"
    assert stages["rest"]["status"] == "cut off at its budget"
    items = summary["items"]
    assert items["check/norm-rms/float16"]["status"] == items["check/norm-rms/float32"]["status"] == "ok"
    assert items["peaks"]["status"] == "ok"
    head = "bench/norm/rms-fwd-32x320-bf16/mmfast-triton"
    assert items[head]["status"] == "cut off"  # killed at the stage deadline: not recorded
    timed_out = "bench/norm/rms-fwd+bwd-32x320-bf16/torch-eager"
    assert items[timed_out]["status"] == "timeout" and "cap of 60 s" in items[timed_out]["reason"]
    assert items["tests"]["status"] == "ok"

    # Rows as they went: the checks against float64 (NaN-poisoned outputs), the peaks, the
    # GPU tests (skipped here, with the reason), nothing of the items that were cut off.
    checks = _rows(first / "checks.jsonl")
    assert [(r["check"], r["dtype"], r["status"]) for r in checks] == [
        ("norm-rms", "float16", "ok"), ("norm-rms", "float32", "ok")]
    assert {r["what"] for r in checks[0]["results"]} == {"output 0", "output 1", "grad of x", "grad of weight",
                                                         "grad of residual"}
    assert all(r["error"] <= r["bound"] and not r["nan"] for r in checks[0]["results"])
    bench = _rows(first / "bench.jsonl")
    measured = {r["evidence_item"] for r in bench if r.get("ms") is not None}
    assert measured == {"peaks", "bench/norm/rms-fwd+bwd-32x320-bf16/mmfast-triton"}
    skipped = {r["provider"]: r["reason"] for r in bench if r.get("status") == "skipped"}
    assert set(skipped) == {"mmfast-cuda", "torch-compile"} and "CPU" in skipped["torch-compile"]
    tests = _rows(first / "tests.jsonl")
    assert tests and all(r["outcome"] == "skipped" and "gpu" in r["nodeid"] for r in tests)
    assert "[DRY RUN" in report

    # The report ends with exactly what did not run.
    tail = report[report.index("DID NOT RUN"):]
    assert "stage headline: 5 of 6 items (cut off at its budget):" in tail
    assert "bench/norm: all 5 items of this stage (1 cases, every provider)" in tail
    assert "rms-fwd+bwd-32x320-bf16 [liger]; rms+res-fwd-32x320-bf16 [all]; " in tail
    assert tail.splitlines()[-1] == "not run: checks 0 of 2, headline 5 of 6, rest 31 of 36"
    assert tail in (first / "evidence.log").read_text()
    assert "stage checks" not in tail
    assert timed_out.rsplit("/", 1)[0] + " [torch-eager" not in tail  # recorded: not "did not run"
    assert "TIMEOUT " + timed_out in report

    # A second run on the same source, the first run's folder as the record: what was
    # recorded is skipped, what was cut off runs; the output holds the whole record.
    code = evidence.main(common + ["--out", str(second), "--record-dir", str(first),
                                   "--stages", "checks,headline"])
    report = capsys.readouterr().out
    assert code == 0, report
    stages = _summary(second)["runs"][-1]["stages"]
    assert stages["checks"]["status"] == "all recorded"
    assert stages["headline"]["recorded_before"] == 1 and stages["headline"]["status"] == "done"
    assert stages["rest"]["status"] == "not asked for (--stages)"
    assert len(_rows(second / "checks.jsonl")) == 2  # copied from the record, not run again
    bench = _rows(second / "bench.jsonl")
    assert sum(r["evidence_item"] == "peaks" for r in bench) == 2  # matmul and copy, once
    assert any(r["evidence_item"] == head for r in bench)
    assert len(_summary(second)["runs"]) == 2
    tail = report[report.index("DID NOT RUN"):]
    assert "stage rest: not asked for (--stages)" in tail
    assert "stage headline" not in tail
    assert tail.splitlines()[-1] == "not run: checks 0 of 2, headline 0 of 6"


def test_worker_runs_from_a_bare_tree_without_an_install(tmp_path):
    # The device machine: a copy of the repository and a Python that has torch but no
    # mmfast. -S drops site-packages' .pth files (this venv's editable install);
    # PYTHONPATH gives torch back. The worker must find mmfast.kernels and mmfast.bench.
    plan = {"out": str(tmp_path), "size": "tiny", "quick": True, "commit": "x",
            "items": [{"id": "check/norm-layer/float32", "kind": "check",
                       "params": {"spec": "norm-layer", "dtype": "float32"}}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": sysconfig.get_paths()["purelib"],
           "TRITON_INTERPRET": "1", "MMFAST_POISON_OUTPUTS": "1", "CUDA_VISIBLE_DEVICES": ""}
    probe = ("import runpy, sys; sys.argv = ['gpu_evidence.py', '--worker', sys.argv[1]]; "
             "assert 'mmfast' not in sys.modules; "
             f"runpy.run_path({str(ROOT / 'scripts' / 'gpu_evidence.py')!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-S", "-c", probe, str(tmp_path / "plan.json")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    events = [json.loads(line.split("@@evidence ", 1)[1]) for line in done.stdout.splitlines()
              if "@@evidence " in line]
    assert done.returncode == 0, done.stdout + done.stderr
    finished = [e for e in events if e["event"] == "done"]
    assert [(e["item"], e["status"]) for e in finished] == [("check/norm-layer/float32", "ok")], done.stdout
    assert finished[0]["rows"][0]["backend"] == "triton"


def test_every_suite_has_a_headline_case():
    cuda = torch.device("cuda")
    for name in suites.names():
        assert name in evidence_plan.HEADLINE, f"suite {name}: no headline case in evidence_plan.HEADLINE"
        cases = [c.name for c in suites.get(name).cases(False, cuda)]
        assert evidence_plan.HEADLINE[name] in cases, f"suite {name}: no case {evidence_plan.HEADLINE[name]}"
    assert set(evidence_plan.HEADLINE) == set(suites.names())


def test_plan_orders_by_value_and_budgets_are_cumulative():
    assert evidence_plan.stage_deadlines(0, 480, evidence_plan.STAGE_BUDGETS) == {
        "checks": 90, "headline": 330, "rest": 470}
    assert evidence_plan.stage_deadlines(0, 100, evidence_plan.STAGE_BUDGETS) == {
        "checks": 90, "headline": 90, "rest": 90}
    head, rest = evidence_plan.bench_items({
        "norm": (["a", "rms+res-fwd-16384x4096-bf16"], ["mmfast-triton", "torch-compile", "torch-eager"]),
        "qwen_window_attention": (["qwen-window-fwd-1x1792px-bf16"], ["mmfast-triton-short"])})
    assert [i.id for i in head] == [
        "peaks", "bench/qwen_window_attention/qwen-window-fwd-1x1792px-bf16/mmfast-triton-short",
        "bench/norm/rms+res-fwd-16384x4096-bf16/mmfast-triton", "bench/norm/rms+res-fwd-16384x4096-bf16/torch-eager",
        "bench/norm/rms+res-fwd-16384x4096-bf16/torch-compile"]
    assert [i.id for i in rest] == [f"bench/norm/a/{p}" for p in ("mmfast-triton", "torch-compile", "torch-eager")]
    checks = evidence_plan.check_items(("bfloat16", "float16"))
    assert checks[0].id == "check/attention-windows-rotary/bfloat16"
    assert {i.params["dtype"] for i in checks[:len(checks) // 2]} == {"bfloat16"}
    assert checks[-1].params["cuda_build"]


def test_deferred_headline_providers_run_first_in_the_rest_stage():
    vae, case = "wan_vae_decode", evidence_plan.HEADLINE["wan_vae_decode"]
    assert evidence_plan.HEADLINE_DEFERRED == {vae: ("diffusers-compile",)}
    head, rest = evidence_plan.bench_items({
        "norm": (["rms+res-fwd-16384x4096-bf16", "b"], ["torch-eager", "torch-compile"]),
        vae: (["other", case], ["mmfast-patched", "diffusers-eager", "diffusers-compile"])})
    assert [i.id for i in head] == [
        "peaks", "bench/norm/rms+res-fwd-16384x4096-bf16/torch-eager", f"bench/{vae}/{case}/mmfast-patched",
        f"bench/{vae}/{case}/diffusers-eager", "bench/norm/rms+res-fwd-16384x4096-bf16/torch-compile"]
    assert rest[0].id == f"bench/{vae}/{case}/diffusers-compile" and rest[0].stage == "rest"
    assert rest[0].cap_s == evidence_plan.CAP_VAE_COMPILE_S == 300
    assert {i.cap_s for i in head if i.id.startswith(f"bench/{vae}/")} == {evidence_plan.CAP_COMPILE_S}
    assert {i.cap_s for i in head if i.id.startswith("bench/norm/")} == {evidence_plan.CAP_BENCH_S,
                                                                       evidence_plan.CAP_COMPILE_S}
    assert {i.id for i in rest[1:]} == {"bench/norm/b/torch-eager", "bench/norm/b/torch-compile"} | {
        f"bench/{vae}/other/{p}" for p in ("mmfast-patched", "diffusers-eager", "diffusers-compile")}


def test_the_dry_run_headline_stage_fits_its_budget_on_the_fake_clock():
    # What the dry run plans (every suite's quick CPU cases) at the fake clock's costs:
    # the headline stage must fit its budget, or a dry run would cut it off.
    cpu = torch.device("cpu")
    head, _ = evidence_plan.bench_items({name: ([c.name for c in suites.get(name).cases(True, cpu)],
                                                [p.name for p in suites.get(name).providers])
                                         for name in suites.names()})
    estimate = sum(evidence.FAKE_COSTS[i.kind] for i in head)
    assert estimate <= evidence_plan.STAGE_BUDGETS["headline"], estimate
    new = {"flux_transformer_step", "wan_transformer_step", "wan_vae_decode"}
    assert {i.params["suite"] for i in head if i.kind == "bench"} >= new


def test_reference_errors_report_unwritten_and_inaccurate_outputs():
    x = torch.randn(8, 16, dtype=torch.float16)

    def unwritten(x):
        y = (x.float() * 2).to(x.dtype)
        y[3, 5] = float("nan")
        return y

    rows = reference_errors(unwritten, lambda x: x * 2, {"x": x})
    assert rows[0]["nan"] and not rows[0]["ok"] and "NaN" in rows[0]["problem"]
    rows = reference_errors(lambda x: x * 2.01, lambda x: x * 2, {"x": x}, grad_inputs=("x",))
    assert [r["what"] for r in rows] == ["output 0", "grad of x"]
    assert not rows[0]["ok"] and rows[0]["error"] > rows[0]["bound"] and "exceeds" in rows[0]["problem"]
    assert rows == reference_errors(lambda x: x * 2.01, lambda x: x * 2, {"x": x}, grad_inputs=("x",))
    assert all(r["ok"] for r in reference_errors(lambda x: x * 2, lambda x: x * 2, {"x": x}, grad_inputs=("x",)))


def test_collect_files_a_device_run_under_bench_results(tmp_path):
    came_back, results = tmp_path / "files", tmp_path / "results"
    came_back.mkdir()
    (came_back / "summary.json").write_text(json.dumps({"source": "src-0123456789ab", "commit": "unknown",
                                                        "runs": [], "items": {}}))
    row = {"suite": "norm", "case": "c", "provider": "p", "ms": 1.5, "run_id": "r1", "smoke": False}
    (came_back / "bench.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "suite": "peaks"}) + "\n")
    (came_back / "evidence.log").write_text("log\n")
    dest = collect(came_back, results, commit="0123abcd")
    assert dest == results / "evidence" / "src-0123456789ab"
    assert _summary(dest)["commit"] == "0123abcd"  # the device machine could not name it
    assert sorted(p.name for p in dest.iterdir()) == ["bench.jsonl", "evidence.log", "summary.json"]
    collect(came_back, results)  # again: no duplicate rows
    assert [r["case"] for r in _rows(results / "norm.jsonl")] == ["c"]
    assert len(_rows(results / "peaks.jsonl")) == 1
    with pytest.raises(ValueError, match="no summary.json"):
        collect(tmp_path / "nothing", results)


@pytest.mark.parametrize("spec", [s for s in evidence_checks.specs() if not s.needs_cuda_build], ids=lambda s: s.name)
def test_every_stage_one_check_runs_at_tiny_size(spec):
    # What stage 1 runs on the GPU at real size, here at tiny size in fp16 under the
    # interpreter: the specs call their ops the way the ops accept, and pass.
    row = evidence_checks.run_check(spec, "tiny", torch.float16, torch.device("cpu"))
    assert row["status"] == "ok", row
    assert row["results"] and all(r["error"] is not None for r in row["results"])


def test_the_cuda_checks_need_the_cuda_build():
    cuda = [s for s in evidence_checks.specs() if s.backend in ("cuda", "cuda_short")]
    assert cuda and all(s.needs_cuda_build for s in cuda)
    assert {s.family for s in cuda} == {"attention", "norm", "group_norm", "scheduler_step"}


def test_real_clock_waits_until_the_deadline_or_the_next_event():
    import queue
    import time

    clock, events = evidence_process.RealClock(), queue.Queue()
    start = clock.now()
    assert clock.wait(events, start + 0.2, None) is None and clock.now() - start >= 0.2
    events.put({"event": "start", "item": "x"})
    assert clock.wait(events, clock.now() + 60, None) == {"event": "start", "item": "x"}
    os.environ["MMFAST_EVIDENCE_T0"] = str(time.time() - 100)  # the bash entry started 100 s ago
    try:
        assert 99 < evidence_process.RealClock().now() < 110
    finally:
        del os.environ["MMFAST_EVIDENCE_T0"]


def test_a_worker_that_dies_inside_an_item_is_a_crash_and_a_new_worker_goes_on(tmp_path, capsys, monkeypatch):
    # What an illegal memory access does to a real worker. The dry run forks its workers
    # from this process, so they inherit the patch.
    from mmfast.bench import evidence_worker

    real = evidence_worker.run_check

    def dies_on_layer_norm(params, size):
        if params["spec"] == "norm-layer":
            os._exit(3)
        return real(params, size)

    monkeypatch.setattr(evidence_worker, "run_check", dies_on_layer_norm)
    code = evidence.main(["--dry-run", "--out", str(tmp_path), "--stages", "checks", "--checks", "norm-*",
                          "--dtypes", "float32,float16"])
    report = capsys.readouterr().out
    assert code == 1
    items = _summary(tmp_path)["items"]
    assert {i: items[i]["status"] for i in items} == {
        "check/norm-rms/float32": "ok", "check/norm-layer/float32": "crash",
        "check/norm-rms/float16": "ok", "check/norm-layer/float16": "crash"}
    assert items["check/norm-layer/float16"]["reason"] == "worker exited with code 3"
    assert "CRASH check/norm-layer/float32: worker exited with code 3" in report


def test_a_broken_cuda_context_hands_the_rest_to_a_new_worker(tmp_path, capsys, monkeypatch):
    # After the first item the (pretended) CUDA context is unusable: its row is kept, the
    # worker exits, and a new one runs the other items; nothing is recorded as failed.
    from mmfast.bench import evidence_worker

    marker = tmp_path / "broke-once"

    def broken_once():
        if marker.exists():
            return None
        marker.write_text("")
        return "RuntimeError: CUDA error: an illegal memory access was encountered"

    monkeypatch.setattr(evidence_worker, "cuda_broken", broken_once)
    out = tmp_path / "out"
    code = evidence.main(["--dry-run", "--out", str(out), "--stages", "checks", "--checks", "norm-*",
                          "--dtypes", "float32"])
    assert code == 0, capsys.readouterr().out
    items = _summary(out)["items"]
    assert {i: items[i]["status"] for i in items} == {"check/norm-rms/float32": "ok", "check/norm-layer/float32": "ok"}
    assert "new worker: CUDA context broken (RuntimeError: CUDA error: an illegal memory access" in \
        (out / "evidence.log").read_text()
