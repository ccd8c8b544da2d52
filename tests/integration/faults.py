"""Fault injection for the integration tests: a deployment of real processes that a test can
kill, restart and starve (API, workers, `apoptosis up`), its own Redis and S3 (moto) servers to
stop and start, Postgres backends to terminate, and a small tmpfs to fill.

What every fault test checks afterwards is here too: the job row (attempts), its artifact rows
per format, and a store holding only whole blobs.
"""

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
from httpx_sse import connect_sse
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from service.api.health import CHECK_SECONDS
from service.cli.migrate import upgrade
from service.client import Client
from service.core.db import make_engine
from service.core.orm import Artifact, Job, JobEvent, Model, utcnow
from service.jobs.states import TERMINAL
from service.tenants.auth import create_tenant
from service.workers import repository as workers
from tests.integration.services import apoptosis, free_port, stop, until, wait_healthy

HEARTBEAT_SECONDS = "0.5"
STALE_AFTER_SECONDS = "3"  # a killed worker's job is reaped within about 4 s
# /readyz cuts each check at CHECK_SECONDS, so a probe of a hung dependency answers in about
# that; one that waited for the dependency would wait out its client's timeouts (S3: three tries
# of 30 s) or forever. The slack is what a loaded 2-core machine needs, not part of the contract.
PROBE_WITHIN_S = CHECK_SECONDS + 7
# A wait for a job fails once nothing it can be waiting on has moved for this long: its own row
# (state, attempt, lease, progress) or the deployment's event log (every job's progress and
# transitions: a queued job waits on the others). The longest still stretch is a killed worker's
# lease going stale while its replacement boots (imports torch) on two loaded cores.
STALLED_AFTER_S = 60
# The whole wait, moving or not: far above what any job here takes on a loaded 2-core machine.
JOB_WAIT_S = 600
ADMIN_DATABASE = "postgresql://postgres@127.0.0.1:5432/test"
T = TypeVar("T")

# A job that spends a second or more in each stage a worker can die in: scoring (pruning),
# fine-tuning and export (hf, then onnx, which exports and checks against onnxruntime).
LONG_SPEC: dict[str, Any] = {
    "method": "oba",
    "granularity": "channel",
    "target": {"macs": 0.5},
    "schedule": {"steps": 12},
    "calibration": {"batches": 2, "batch_size": 16},
    "loss": "cross_entropy",
    "finetune": {"epochs": 40, "lr": 0.001},
    "outputs": ["hf", "onnx"],
}
# A job that takes a couple of seconds: long enough to be running when a fault hits.
MEDIUM_SPEC: dict[str, Any] = {
    **LONG_SPEC,
    "schedule": {"steps": 6},
    "finetune": {"epochs": 20, "lr": 0.001},
    "outputs": ["hf"],
}
QUICK_SPEC: dict[str, Any] = {
    "method": "oba",
    "granularity": "channel",
    "target": {"macs": 0.5},
    "schedule": {"steps": 2},
    "calibration": {"batches": 1, "batch_size": 16},
    "loss": "cross_entropy",
    "outputs": ["hf"],
}
# A quick job that fine-tunes for seconds, reporting progress many times a second.
FINETUNING_SPEC: dict[str, Any] = {**QUICK_SPEC, "finetune": {"epochs": 40, "lr": 0.001}}


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process and its group (no clean-up runs), and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def readyz(url: str, within: float = 30) -> tuple[int, dict[str, Any]]:
    """`/readyz`: its status and body (checks by name); fails if it takes over `within` s."""
    try:
        response = httpx.get(f"{url}/readyz", timeout=within)
    except httpx.TimeoutException:
        raise AssertionError(f"/readyz did not answer within {within:g} s") from None
    return response.status_code, dict(response.json())


def is_problem(response: httpx.Response) -> bool:
    """An RFC 9457 problem with a stable code."""
    return response.headers.get("content-type", "").startswith(
        "application/problem+json"
    ) and isinstance(response.json().get("code"), str)


@dataclass
class Stack:
    """A deployment of real processes over one database: the API on a fixed port (so it can be
    restarted where clients expect it), and any number of workers."""

    work: Path
    env: dict[str, str]
    database_url: str
    port: int = field(default_factory=free_port)
    key: str = ""
    api: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _engine: Engine | None = None
    _starts: int = 0
    _worker_logs: dict[int, Path] = field(default_factory=dict)  # by pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def home(self) -> Path:
        return Path(self.env["APOPTOSIS_HOME"])

    @property
    def api_log(self) -> Path:
        return self.work / "api.log"

    def client(self) -> Client:
        return Client(self.url, self.key, timeout=30)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.database_url)
        return self._engine

    # processes

    def start_api(self) -> None:
        self.api = apoptosis("api", "--port", str(self.port), env=self.env, log=self.api_log)
        wait_healthy(self.url, self.api, self.api_log)

    def kill_api(self) -> None:
        assert self.api is not None
        kill_group(self.api)

    def ensure_api(self) -> None:
        """Start the API again if it is not running (after a test killed it)."""
        if self.api is None or self.api.poll() is not None:
            self.start_api()

    def start_worker(self) -> subprocess.Popen[bytes]:
        self._starts += 1
        log = self.work / f"worker{self._starts}.log"
        worker = apoptosis(
            "worker", "--queues", "cpu", "--name", f"w{self._starts}@%h", env=self.env, log=log
        )
        self.workers.append(worker)
        self._worker_logs[worker.pid] = log
        return worker

    def wait_workers(self, count: int, seconds: float = 90) -> None:
        """Until `count` workers beat within the stale time (they are consuming)."""

        def beating() -> bool:
            cutoff = utcnow() - timedelta(seconds=float(STALE_AFTER_SECONDS))
            return self.read(lambda session: workers.alive_since(session, cutoff) >= count)

        until(beating, seconds, f"{count} workers beating", every=0.3)

    def restart_workers(self) -> None:
        """Stop every worker (SIGTERM: each forgets its heartbeat) and start as many new ones."""
        for worker in self.workers:
            stop(worker)
        count = len(self.workers)
        self.workers.clear()
        for _ in range(count):
            self.start_worker()
        self.wait_workers(count)

    def worker_log(self, worker: subprocess.Popen[bytes]) -> str:
        return self._worker_logs[worker.pid].read_text(errors="replace")

    def worker_of(self, job: Job) -> subprocess.Popen[bytes]:
        """The worker process holding the job's lease (its owner is `host:pid`)."""
        owner = job.lease_owner
        assert owner is not None, f"job {job.id} has no lease"
        pid = int(owner.rsplit(":", 1)[1])
        [worker] = [w for w in self.workers if w.pid == pid]
        return worker

    def close(self) -> None:
        """SIGTERM every process at once (workers finish warm shutdowns in parallel), then
        wait for each (SIGKILL after 20 s)."""
        processes = [p for p in [*self.workers, self.api] if p is not None and p.poll() is None]
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            stop(process)
        if self._engine is not None:
            self._engine.dispose()

    # the database, read directly: the source of truth the API reports from

    def read(self, query: Callable[[Session], T]) -> T:
        """`query` in a session of its own, tried again when the test's own connection was
        dropped under it (the Postgres test terminates every backend, ours included)."""
        for attempt in range(3):
            try:
                with Session(self.engine) as session:
                    return query(session)
            except DBAPIError:
                if attempt == 2:
                    raise
                time.sleep(0.1)
        raise AssertionError("unreachable")

    def job(self, job_id: str) -> Job:
        job = self.read(lambda session: session.get(Job, job_id))
        assert job is not None, f"no job {job_id}"
        return job

    def artifact_counts(self, job_id: str) -> Counter[str]:
        """How many artifact rows the job has, per output format."""
        query = select(Artifact.format).where(Artifact.job_id == job_id)
        return self.read(lambda session: Counter(session.scalars(query)))

    def event_ids(self, job_id: str) -> list[int]:
        query = select(JobEvent.id).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        return self.read(lambda session: list(session.scalars(query)))

    def model_count(self) -> int:
        query = select(func.count()).select_from(Model)
        return self.read(lambda session: int(session.scalar(query) or 0))

    def jobs_with_key(self, key: str) -> list[Job]:
        query = select(Job).where(Job.idempotency_key == key)
        return self.read(lambda session: list(session.scalars(query)))

    def wait_job(self, job_id: str, reached: Callable[[Job], bool], what: str, every: float) -> Job:
        """Poll the job row every `every` s until `reached(job)`. Fails once nothing the job
        can be waiting on has moved for STALLED_AFTER_S (a stuck job), or after JOB_WAIT_S in
        all: a job that is slow because the machine is loaded is not stuck."""
        last: tuple[object, ...] = ()
        moved = time.monotonic()

        def check() -> Job | None:
            nonlocal last, moved
            job, latest_event = self.read(
                lambda session: (
                    session.get(Job, job_id),
                    session.scalar(select(func.max(JobEvent.id))),
                )
            )
            assert job is not None, f"no job {job_id}"
            if reached(job):
                return job
            mark = (job.state, job.attempt, job.lease_owner, job.progress, latest_event)
            if mark != last:
                last, moved = mark, time.monotonic()
            assert time.monotonic() - moved < STALLED_AFTER_S, (
                f"{what}: nothing moved for {STALLED_AFTER_S} s (the job: {job.state}, attempt "
                f"{job.attempt}, {job.progress}; the last event: {latest_event})"
            )
            return None

        found: Job = until(check, JOB_WAIT_S, what, every=every)
        return found

    def wait_for_stage(self, job_id: str, stage: str) -> Job:
        """Poll the job row (every 20 ms) until its progress reports `stage`: the stage is
        running now. Fails if the job ends first."""

        def reached(job: Job) -> bool:
            assert job.state not in TERMINAL, f"job ended before {stage}: {job.state} {job.error}"
            return bool((job.progress or {}).get("stage") == stage)

        return self.wait_job(job_id, reached, f"job {job_id} in stage {stage}", every=0.02)

    def wait_terminal(self, job_id: str) -> Job:
        return self.wait_job(
            job_id, lambda job: job.state in TERMINAL, f"job {job_id} ending", every=0.2
        )


def make_stack(work: Path, env: dict[str, str], database_url: str, *, workers: int) -> Stack:
    """Migrate, make a tenant, start the API and `workers` workers (waited for)."""
    work.mkdir(parents=True, exist_ok=True)
    env = {
        "APOPTOSIS_HEARTBEAT_SECONDS": HEARTBEAT_SECONDS,
        "APOPTOSIS_STALE_AFTER_SECONDS": STALE_AFTER_SECONDS,
        "APOPTOSIS_DATABASE_URL": database_url,
        **env,
    }
    upgrade(database_url)
    stack = Stack(work, env, database_url)
    with Session(stack.engine) as session:
        _, stack.key = create_tenant(session, "faults")
        session.commit()
    try:
        for _ in range(workers):  # they boot (torch) while the API starts
            stack.start_worker()
        stack.start_api()
        if workers:
            stack.wait_workers(workers)
    except BaseException:
        stack.close()
        raise
    return stack


@contextmanager
def fake_worker_beats(database_url: str, seconds: float = 0.5) -> Iterator[None]:
    """A worker heartbeat row kept fresh, for deployments whose tests need no worker but a
    `/readyz` that can say ready."""
    engine = make_engine(database_url)
    stopping = threading.Event()

    def beat() -> None:
        while not stopping.is_set():
            with Session(engine) as session:
                workers.beat(session, "fake-worker", "cpu")
                session.commit()
            stopping.wait(seconds)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stopping.set()
        thread.join()
        engine.dispose()


# event streams


def read_events(
    url: str,
    key: str,
    job_id: str,
    last_event_id: str | None = None,
    *,
    on_event: Callable[[int], None] = lambda _: None,
) -> tuple[list[tuple[int, str]], Exception | None]:
    """Read the job's SSE stream to its end: [(event id, kind)], and the transport error that
    cut it (None when it ended cleanly). `on_event(n)` runs after the n-th event."""
    received: list[tuple[int, str]] = []
    headers = {"Authorization": f"Bearer {key}"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        try:
            with connect_sse(http, "GET", f"/v1/jobs/{job_id}/events") as source:
                assert source.response.status_code == 200, source.response.read()
                for event in source.iter_sse():
                    received.append((int(event.id or 0), event.event))
                    on_event(len(received))
        except httpx.TransportError as error:
            return received, error
    return received, None


# Redis of our own


@dataclass
class RedisServer:
    """A redis-server on a free port, append-only with every write synced (the production
    configuration's persistence, docker-compose.yml), that a test can kill and start again."""

    folder: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    "/usr/bin/redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    "--dir",
                    str(self.folder),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        import redis

        def answers() -> bool:
            try:
                with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1) as r:
                    return bool(r.ping())
            except redis.RedisError:
                return False

        until(answers, 20, f"redis on port {self.port}")

    def consumer_idle(self) -> bool:
        """A worker waits in BRPOP and no message is queued: it has nothing to acknowledge
        (one message at a time: it asks for the next only once it acked the last) and nothing
        to take."""
        import redis

        with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5) as r:
            waiting = any(
                client["cmd"] == "brpop" and "b" in client["flags"] for client in r.client_list()
            )
            queued = sum(r.llen(key) for key in r.scan_iter(_type="list"))  # kombu's queues
            return waiting and queued == 0

    def kill(self) -> None:
        if self.process is not None:
            kill_group(self.process)
            self.process = None

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP for the block, then SIGCONT: connections stay open and connects succeed
        (the kernel accepts them), but nothing answers, as with a hung server."""
        with freeze(self.process):
            yield


@contextmanager
def freeze(process: subprocess.Popen[bytes] | None) -> Iterator[None]:
    assert process is not None and process.poll() is None
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


# S3 of our own: moto's server as a process, so that stopping it drops every connection


@dataclass
class MotoS3:
    log: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        server = Path(sys.executable).parent / "moto_server"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(server), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def answers() -> bool:
            try:
                return httpx.get(f"{self.endpoint}/moto-api/", timeout=1).status_code < 500
            except httpx.HTTPError:
                return False

        until(answers, 30, f"moto on port {self.port}", every=0.2)

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP for the block, then SIGCONT: a store that hangs instead of refusing."""
        with freeze(self.process):
            yield

    def stop(self) -> None:
        """SIGKILL: the store is gone at once, its open connections with it."""
        if self.process is not None:
            kill_group(self.process)
            self.process = None


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "NO_PROXY": "127.0.0.1",
    "no_proxy": "127.0.0.1",
}


# Postgres


def terminate_backends(database_url: str) -> int:
    """`pg_terminate_backend` every connection to the database (the server keeps running);
    returns how many there were."""
    import psycopg

    name = database_url.rsplit("/", 1)[1]
    with psycopg.connect(ADMIN_DATABASE, autocommit=True) as connection:
        row = connection.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchone()
    return int(row[0]) if row else 0


def postgres_ping(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    finally:
        engine.dispose()


# disks


@contextmanager
def tmpfs(directory: Path, size: str) -> Iterator[bool]:
    """`directory` as a tmpfs of `size` (yields True), or a plain folder where mounting is not
    permitted (yields False). Unmounted afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True, check=False)


def fill(path: Path) -> int:
    """Write `path` until its filesystem is full (ENOSPC); returns the bytes written."""
    written = 0
    block = b"\0" * (64 * 1024)
    with path.open("wb", buffering=0) as file:
        with contextlib.suppress(OSError):
            while True:
                written += file.write(block)
        with contextlib.suppress(OSError):  # the last partial block
            while file.write(b"\0" * 512):
                written += 512
    return written


def assert_whole_blobs(root: Path) -> None:
    """Every blob a key names holds exactly the bytes its key says (no partial blob is
    visible); files outside the key space (`tmp/`) are invisible to readers by design."""
    for path in (root / "sha256").rglob("*"):
        if path.is_file():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, path
