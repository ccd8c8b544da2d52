"""The embedded worker, supervised by `apoptosis up`: restarted when it dies, and never outliving
`up` (Linux's parent-death signal ends it even when `up` is SIGKILLed). The standard library
serves: a process, a thread that watches it, and `prctl`."""

import contextlib
import ctypes
import logging
import signal
import subprocess
import threading
from pathlib import Path

log = logging.getLogger("apoptosis.up")
PR_SET_PDEATHSIG = 1
RESTART_BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0)  # then every 10 s while it keeps dying


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the thread that started it (the supervisor's,
    alive as long as `up`) is gone. Linux only; elsewhere the worker is only restarted."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class WorkerSupervisor:
    def __init__(self, command: list[str], env: dict[str, str], pid_file: Path) -> None:
        self.command, self.env, self.pid_file = command, env, pid_file
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.pid_file.unlink(missing_ok=True)

    def _spawn(self) -> None:
        # Started from the watching thread: the parent-death signal follows that thread.
        self.process = subprocess.Popen(self.command, env=self.env, preexec_fn=_die_with_parent)
        self.pid_file.write_text(f"{self.process.pid}\n")

    def _watch(self) -> None:
        self._spawn()
        failures = 0
        while not self._stopping.wait(0.5):
            assert self.process is not None
            code = self.process.poll()
            if code is None:
                continue
            if self._stopping.is_set():
                return
            delay = RESTART_BACKOFF_SECONDS[min(failures, len(RESTART_BACKOFF_SECONDS) - 1)]
            log.warning("the worker exited with %s; starting it again in %.0f s", code, delay)
            if self._stopping.wait(delay):
                return
            self._spawn()
            self.restarts += 1
            failures += 1
