"""The processes and clocks of the GPU evidence run (mmfast.bench.evidence).

A :class:`Worker` is a child process running items (mmfast.bench.evidence_worker): on
the GPU machine a fresh ``python3 scripts/gpu_evidence.py --worker PLAN`` in its own
session (so that killing it kills its compilers too); in the CPU dry run a fork of the
orchestrator, which has torch and the suites imported already. Its events arrive on a
queue, read by a thread; everything else it prints goes to the log.

:class:`RealClock` waits on that queue until a deadline; :class:`FakeClock` (dry run)
stands still except that each finished item advances it by a declared cost.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mmfast.bench import evidence_plan as plan
from mmfast.bench.evidence_record import Record
from mmfast.bench.evidence_worker import PREFIX

ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP = ROOT / "scripts" / "gpu_evidence.py"
# A silent worker in the fake-clock dry run is a bug, not a slow GPU: give up after this.
FAKE_REAL_TIMEOUT_S = 300


# ---- clocks --------------------------------------------------------------------------


class RealClock:
    """Seconds since the command started: MMFAST_EVIDENCE_T0 (epoch seconds, set by
    scripts/gpu_evidence.sh before it installs carried wheels), else since now."""

    fake = False

    def __init__(self):
        started = os.environ.get("MMFAST_EVIDENCE_T0")
        try:
            ago = max(0.0, time.time() - float(started)) if started else 0.0
        except ValueError:
            ago = 0.0
        self._t0 = time.monotonic() - ago

    def now(self) -> float:
        return time.monotonic() - self._t0

    def wait(self, events: queue.Queue, until: float, cost_of):
        """The next event, or None when ``until`` passes first."""
        try:
            return events.get(timeout=max(0.0, until - self.now()))
        except queue.Empty:
            return None


class FakeClock:
    """Dry-run time: it stands still except that each finished item advances it by the
    item's declared cost; an item whose cost would carry it past ``until`` is taken to
    have been cut off there."""

    fake = True

    def __init__(self):
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def wait(self, events: queue.Queue, until: float, cost_of):
        try:
            event = events.get(timeout=FAKE_REAL_TIMEOUT_S)
        except queue.Empty:
            self.t = max(self.t, until)
            return None
        if event.get("event") == "done":
            if self.t + cost_of(event["item"]) > until:
                self.t = max(self.t, until)
                return None
            self.t += cost_of(event["item"])
        return event


# ---- workers -------------------------------------------------------------------------


class _Forked:
    """The little of ``subprocess.Popen`` that :class:`Worker` uses, for a forked child."""

    def __init__(self, pid: int, stdout):
        self.pid, self.stdout, self.returncode = pid, stdout, None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self):
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def _fork_worker(plan_path: str, env: dict) -> _Forked:
    """The dry run's worker: a fork of this process (torch and the suites are imported
    already, which saves seconds a start on a CPU), else the same as the real one."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.setsid()
            os.dup2(write_end, 1)
            os.dup2(write_end, 2)
            os.close(read_end)
            os.close(write_end)
            sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
            os.environ.clear()
            os.environ.update(env)
            # OpenMP's thread pool does not survive a fork: if this process ever ran a
            # parallel torch op, the child's first one would hang. One thread runs inline.
            torch = sys.modules.get("torch")
            if torch is not None:
                torch.set_num_threads(1)
            launch = sys.modules.get("mmfast.kernels._launch")
            if launch is not None:  # read at import: follow this worker's setting
                launch.POISON_OUTPUTS = env.get("MMFAST_POISON_OUTPUTS", "0") not in ("", "0")
            from mmfast.bench import evidence_worker

            code = evidence_worker.main(plan_path)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)
    os.close(write_end)
    return _Forked(pid, os.fdopen(read_end, "rb"))


class Worker:
    """A child process running items; its events arrive on ``events``, the rest of its
    output goes to the log."""

    def __init__(self, items: list[plan.Item], settings: dict, env: dict, record: Record, tag: str,
                 fork: bool = False):
        fd, self.plan_path = tempfile.mkstemp(prefix="mmfast-evidence-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({**settings, "items": [{"id": i.id, "kind": i.kind, "params": i.params} for i in items]}, f)
        self.events: queue.Queue = queue.Queue()
        self.record, self.tag = record, tag
        self.ids = [i.id for i in items]
        if fork:
            self.proc = _fork_worker(self.plan_path, env)
        else:
            self.proc = subprocess.Popen(
                [sys.executable, str(BOOTSTRAP), "--worker", self.plan_path], cwd=ROOT, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace")
            # An event is one write of one line, but may follow output that did not end
            # its line (pytest's progress characters) on the same pipe.
            before, found, payload = line.partition(PREFIX)
            if found:
                try:
                    self.events.put(json.loads(payload))
                    if before.strip():
                        self.record.log(f"[{self.tag}] {before}\n")
                    continue
                except json.JSONDecodeError:
                    pass
            self.record.log(f"[{self.tag}] {line}")
        self.events.put({"event": "exit"})

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: compilers too
            except ProcessLookupError:
                pass
        self.close()

    def close(self):
        self.proc.wait()
        self._reader.join(timeout=10)
        try:
            os.unlink(self.plan_path)
        except OSError:
            pass
