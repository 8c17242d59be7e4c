"""Running the plan: each (row, seed) in its own child process, supervised.

* Isolation: a crash or an out-of-memory in one run never takes the others down, and RecBole's global
  state (logging, seeds) starts clean in each child.
* Logs: everything a child prints goes to its ``run.log``; a failure is reported with the line of the log
  that says why (``error_line``) and kept in ``failed.json``.
* Timeouts (``--run_timeout``) and interrupts (Ctrl-C, SIGTERM): the child is stopped (terminate, then
  kill), never left running.
* Resumption: a run whose ``result.json`` carries the request's fingerprint is not run again.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

from recbole_vlm2rec.compare.files import log_tail, read_json, write_json_atomic
from recbole_vlm2rec.compare.plan import FAILED_FILE, LOG_FILE, PROG, REQUEST_FILE, RESULT_FILE, Plan, RunKey
from recbole_vlm2rec.compare.reports import METRIC_LABELS

STOP_GRACE_S = 15  # seconds a terminated child gets to exit before it is killed


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes} min {sec:02d} s"


def error_line(tail: Sequence[str]) -> str:
    """The line of a log tail that best says why the run failed (the exception line, else the last line)."""
    prefix = f"{PROG}: error:"
    for line in reversed(tail):
        stripped = line.strip()
        if stripped.startswith(prefix):
            return stripped[len(prefix):].strip()
    for line in reversed(tail):
        head = line.strip().split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) or head in ("Killed", "MemoryError"):
            return line.strip()
    return tail[-1].strip() if tail else "no output"


def _child_environment() -> Dict[str, str]:
    """This environment, unbuffered, with this package importable (a source checkout need not be installed)."""
    import recbole_vlm2rec

    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    root = str(Path(recbole_vlm2rec.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


class Supervisor:
    """Runs a plan's requests one after the other and keeps each run's record (result or failure)."""

    def __init__(self, plan: Plan, after_each_run: Optional[Callable[[], None]] = None):
        self.plan = plan
        self.after_each_run = after_each_run
        self.records: Dict[RunKey, dict] = {}   # (model, seed) -> result.json content or failure record
        self.started = time.monotonic()
        self._process: Optional[subprocess.Popen] = None

    def say(self, message: str) -> None:
        print(f"[{PROG} {format_seconds(time.monotonic() - self.started)}] {message}", flush=True)

    def execute(self) -> None:
        runs = self.plan.runs()
        for index, (model, seed) in enumerate(runs, start=1):
            self.run_one(model, seed, f"[{index}/{len(runs)}] {model} seed {seed}")
            if self.after_each_run is not None:
                self.after_each_run()

    def run_one(self, model: str, seed: int, label: str) -> None:
        run_dir = self.plan.run_dir(model, seed)
        request, reason = self.plan.request(model, seed, self.records)
        if request is None:
            self.say(f"{label}: not run: {reason}")
            self.records[(model, seed)] = {"status": "failed", "model": model, "seed": seed, "error": reason,
                                           "log": None}
            return
        if self._reuse(model, seed, request, label):
            return
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        write_json_atomic(run_dir / REQUEST_FILE, request)
        self.say(f"{label}: running (log: {run_dir / LOG_FILE})")
        returncode, timed_out, elapsed = self._launch(run_dir)
        result = read_json(run_dir / RESULT_FILE)
        if returncode == 0 and result is not None:
            self._record_success(model, seed, result, label, elapsed)
        else:
            self._record_failure(model, seed, returncode, timed_out, elapsed, label)

    def _reuse(self, model: str, seed: int, request: dict, label: str) -> bool:
        """Keep a result.json made with the same settings (True); say so when the settings changed."""
        result_file = self.plan.run_dir(model, seed) / RESULT_FILE
        previous = read_json(result_file)
        if previous is not None and previous.get("fingerprint") == request["fingerprint"]:
            previous["status"] = "ok"
            self.records[(model, seed)] = previous
            self.say(f"{label}: skipped, finished before ({result_file})")
            return True
        if previous is not None:
            self.say(f"{label}: settings changed since its result.json was written: running it again")
        return False

    def _launch(self, run_dir: Path) -> Tuple[Optional[int], bool, float]:
        """Run the child of ``run_dir``'s request to its end or its timeout: (exit code, timed out, seconds)."""
        command = [sys.executable, "-m", "recbole_vlm2rec.compare", "--child", str(run_dir / REQUEST_FILE)]
        begin = time.monotonic()
        timed_out = False
        with open(run_dir / LOG_FILE, "wb") as log:
            log.write(("$ " + " ".join(command) + "\n").encode())
            log.flush()
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                             env=_child_environment())
            try:
                returncode = self._process.wait(timeout=self.plan.run_timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                self.stop_child()
                returncode = self._process.returncode
            finally:
                if self._process.poll() is None:  # interrupted: never leave the child running
                    self.stop_child()
                self._process = None
        return returncode, timed_out, time.monotonic() - begin

    def _record_success(self, model: str, seed: int, result: dict, label: str, elapsed: float) -> None:
        result["status"] = "ok"
        self.records[(model, seed)] = result
        test = result.get("test_result") or {}
        scores = "  ".join(f"{METRIC_LABELS[m]} {test[m]:.4f}" for m in ("ndcg@10", "hit@10") if m in test)
        self.say(f"{label}: done in {format_seconds(elapsed)}: {scores}")

    def _record_failure(self, model: str, seed: int, returncode: Optional[int], timed_out: bool,
                        elapsed: float, label: str) -> None:
        run_dir = self.plan.run_dir(model, seed)
        log_path = run_dir / LOG_FILE
        tail = log_tail(log_path)
        if timed_out:
            error = f"stopped after --run_timeout={self.plan.run_timeout:g} s"
        elif returncode == 0:
            error = "the run ended without writing result.json"
        else:
            error = error_line(tail)
        failure = {"status": "failed", "model": model, "seed": seed, "returncode": returncode, "error": error,
                   "log": str(log_path), "log_tail": tail, "elapsed_s": elapsed}
        write_json_atomic(run_dir / FAILED_FILE, failure)
        self.records[(model, seed)] = failure
        self.say(f"{label}: FAILED after {format_seconds(elapsed)} (exit code {returncode}): {error}\n"
                 f"    log: {log_path}")
        print(f"{PROG}: {model} seed {seed} failed: {error} (log: {log_path})", file=sys.stderr, flush=True)

    def stop_child(self) -> None:
        """Stop the running child, if any: terminate, then kill if it has not exited in STOP_GRACE_S."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
