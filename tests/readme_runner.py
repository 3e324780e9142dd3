"""Runs README.md's snippets for tests/test_readme.py, each in a fresh process.

    python tests/readme_runner.py ROOT JOBS.json RESULTS.json

JOBS.json: a list of ``{"id": ..., "line": N, "code": "..."}`` (a python block; N: the README
line of its opening fence) or ``{"id": ..., "argv": [...], "env": {...}}`` (``python -m
mmfast ARGV`` with these variables set). RESULTS.json gets ``{id: {"ok": bool, "seconds":
s, "output": "..."}}``.

torch, transformers and mmfast are imported once here, then each job runs in a child
forked from this process (where fork exists; else a new interpreter each), so every
job starts from a fresh interpreter's state (backend overrides, patched models,
globals) without paying for those imports again. Each child runs in an empty working
directory, and a snippet's tracebacks name README.md lines.
"""

import json
import os
import runpy
import sys
import tempfile
import time
import traceback

PRELOADED = ("torch", "transformers", "mmfast")  # only to save time: a failure shows in the snippet


def _exec_snippet(readme: str, line: int, code: str) -> None:
    # Padding puts each statement on its README line, so tracebacks quote the README.
    compiled = compile("\n" * line + code, readme, "exec")
    exec(compiled, {"__name__": "__main__"})


def _run_job(readme: str, job: dict) -> None:
    if "argv" in job:  # as `python -m mmfast ARGV` would
        os.environ.update(job.get("env", {}))
        sys.argv = ["mmfast", *job["argv"]]
        runpy.run_module("mmfast", run_name="__main__", alter_sys=True)
    else:
        _exec_snippet(readme, job["line"], job["code"])


def _run_forked(readme: str, job: dict, workdir: str, log_path: str) -> bool:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.chdir(workdir)
            _run_job(readme, job)
            status = 0
        except SystemExit as stop:  # sys.exit(): its code, as python would exit
            status = 0 if stop.code in (None, 0) else 1
            if status:
                traceback.print_exc()
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status) == 0


def _run_in_new_interpreter(readme: str, job: dict, workdir: str, log_path: str, root: str) -> bool:
    import subprocess

    env = {**os.environ, **job.get("env", {})}
    if "argv" in job:
        argv = [sys.executable, "-c", f"import sys, runpy; sys.path.insert(0, {root!r}); sys.argv[1:] = "
                f"{job['argv']!r}; runpy.run_module('mmfast', run_name='__main__', alter_sys=True)"]
    else:
        argv = [sys.executable, "-c", f"import sys; sys.path.insert(0, {root!r})\n"
                f"exec(compile({chr(10) * job['line'] + job['code']!r}, {readme!r}, 'exec'), {{'__name__': '__main__'}})"]
    with open(log_path, "w") as log:
        return subprocess.run(argv, cwd=workdir, env=env, stdout=log, stderr=log).returncode == 0


def main(root: str, jobs_path: str, results_path: str) -> None:
    sys.path[0] = root  # the checkout's mmfast, as pytest sees it (not this file's folder)
    readme = os.path.join(root, "README.md")
    with open(jobs_path) as f:
        jobs = json.load(f)
    forking = hasattr(os, "fork")
    if forking:
        for name in PRELOADED:
            try:
                __import__(name)
            except Exception:
                pass
    results = {}
    for job in jobs:
        with tempfile.TemporaryDirectory(prefix="readme-snippet-") as workdir, \
                tempfile.TemporaryDirectory(prefix="readme-log-") as logdir:
            log_path = os.path.join(logdir, "output.txt")
            start = time.perf_counter()
            if forking:
                ok = _run_forked(readme, job, workdir, log_path)
            else:
                ok = _run_in_new_interpreter(readme, job, workdir, log_path, root)
            seconds = time.perf_counter() - start
            with open(log_path, errors="replace") as f:
                output = f.read()
        results[job["id"]] = {"ok": ok, "seconds": seconds, "output": output}
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
