"""`apoptosis up` supervises its worker: a killed worker is started again, the worker never
outlives `up` (not even a SIGKILLed one), and a second `up` on the same home refuses to start."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.integration.services import (
    ONE_THREAD_ENV,
    apoptosis,
    free_port,
    stop,
    until,
    wait_healthy,
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return False


def _ready(url: str) -> bool:
    # how fast /readyz answers is not this test's concern: wide for a loaded 2-core machine
    response = httpx.get(f"{url}/readyz", timeout=30)
    return response.status_code == 200 and response.json()["checks"]["workers"] is True


def _worker_pid(home: Path) -> int:
    pid_file = home / "worker.pid"
    until(pid_file.exists, 30, "the worker's pid file")
    return int(pid_file.read_text())


def test_up_restarts_its_worker_and_takes_it_down_with_it(tmp_path: Path) -> None:
    home, log, port = tmp_path / "var", tmp_path / "up.log", free_port()
    up = apoptosis("up", "--port", str(port), "--home", str(home), env={}, log=log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, up, log)
        first = _worker_pid(home)
        until(lambda: _ready(url), 60, "/readyz seeing the worker's heartbeat")

        os.kill(first, signal.SIGKILL)
        until(lambda: _worker_pid(home) != first, 30, "a new worker after the kill")
        second = _worker_pid(home)
        assert _alive(second)

        again = apoptosis("up", "--port", str(free_port()), "--home", str(home), env={}, log=log)
        assert again.wait(timeout=60) == 2  # the same home is taken: no second worker
        assert "another `apoptosis up` is running" in log.read_text()

        os.kill(up.pid, signal.SIGKILL)  # `up` alone (not its group) dies, with no clean-up
        up.wait()
        until(lambda: not _alive(second), 30, "the worker ending with `up`")
    finally:
        stop(up)


def test_up_runs_its_worker_from_a_project_folder_with_its_own_worker_module(
    tmp_path: Path,
) -> None:
    """A user's project with a `worker.py` and a `service/` package of its own: the console
    script and its worker import ours, not theirs (the worker used to stop at "'worker' is not
    a package" and start again forever)."""
    project = tmp_path / "project"
    (project / "service").mkdir(parents=True)
    mistake = 'raise SystemExit("the project\'s own module was imported")\n'
    (project / "worker.py").write_text(mistake)
    (project / "service" / "__init__.py").write_text(mistake)
    home, log, port = tmp_path / "var", tmp_path / "up.log", free_port()
    script = Path(sys.executable).parent / "apoptosis"
    with log.open("ab") as out:
        up = subprocess.Popen(
            [str(script), "up", "--port", str(port), "--home", str(home)],
            cwd=project,
            env={**os.environ, **ONE_THREAD_ENV, "APOPTOSIS_API_KEY": ""},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, up, log)
        until(lambda: _ready(url), 60, "/readyz seeing the worker's heartbeat")
        assert "own module was imported" not in log.read_text()
    finally:
        stop(up)
