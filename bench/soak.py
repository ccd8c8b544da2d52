"""Soak: many small pruning jobs through a distributed deployment, one worker killed halfway.

The production shape, all on 127.0.0.1: `apoptosis api` and `--workers` separate `apoptosis
worker` processes (Celery, solo pool, concurrency 1) on a fresh Postgres database (the machine's
server on 5432, dropped at the end) and a redis-server of our own on a free port (the machine's
Redis is untouched). Leases are short (heartbeat 1 s, stale after 5 s) so a killed worker's job
is recovered in seconds.

A tiny BERT and its dataset (`tests.integration.services.bert_upload`) are uploaded once; then
`--clients` threads, each with its own `service.client.Client`, take job numbers from a shared
counter until `--jobs` are done: submit (a new Idempotency-Key per job), then poll
`GET /v1/jobs/{id}` every `--poll` seconds until the job ends. Every request's wall time is
measured at the client. The job is the smallest that scores and prunes: channel OBA to 80 % of
the MACs in one step (`--steps`) on one batch of 8 rows, no fine-tuning, an hf export.

Once `--kill-at` jobs have finished, worker 0 is SIGKILLed while it runs a job (waiting up to
30 s for one) and a new worker is started in its place. Afterwards the database is checked:
every job succeeded exactly once (state, `attempt`, one claim per attempt, one `succeeded`
event, one artifact row per requested output) — `attempt` is 1 everywhere except the job the
kill interrupted, which must be 2. Peak RSS is VmHWM from /proc/<pid>/status of the API and of
each worker (and the peak summed RSS of each worker with its descendants), sampled every 0.5 s.

Run (the full soak: 200 jobs, 20 clients, 2 workers; a few minutes on 2 CPUs, as a warm worker
runs one of these jobs in ~0.2 s; `--steps 20` makes each job longer):

    .venv/bin/python -m bench.soak

A short check: `.venv/bin/python -m bench.soak --jobs 20 --clients 4`. Prints a markdown table;
exits 1 if any check failed (the working folder with every log is then kept and named).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from service.client import ApiError, Client
from service.core.db import make_engine
from service.core.orm import Artifact, Job, JobEvent, WorkerHeartbeat
from service.jobs.states import TERMINAL, JobState
from service.tenants.auth import create_tenant
from tests.integration.services import (
    POSTGRES_START,
    apoptosis,
    bert_upload,
    ensure_server,
    free_port,
    stop,
    wait_healthy,
)

T = TypeVar("T")
MIB = 1024 * 1024
HEARTBEAT_SECONDS = 1.0
STALE_AFTER_SECONDS = 5.0
KILL_WAIT_SECONDS = 30.0  # how long the kill waits for worker 0 to be running a job
OUTPUTS = ["hf"]


def job_spec(model_id: str, dataset_id: str, steps: int) -> dict[str, Any]:
    """The smallest job that still scores and prunes: one batch, no fine-tuning; `steps`
    prune-and-rescore rounds (1 by default: ~0.2 s on a warm worker)."""
    return {
        "model_id": model_id,
        "dataset_id": dataset_id,
        "method": "oba",
        "granularity": "channel",
        "target": {"macs": 0.8},
        "schedule": {"steps": steps},
        "calibration": {"batches": 1, "batch_size": 8},
        "loss": "cross_entropy",
        "outputs": OUTPUTS,
    }


# --- the deployment ------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    label: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def lease_owner(self) -> str:
        """The worker's id in the database (worker.runtime.lifecycle.WORKER_ID): host and pid; the
        worker command execs Celery, so the pid is the one we started."""
        return f"{socket.gethostname()}:{self.process.pid}"


@dataclass
class Deployment:
    folder: Path
    env: dict[str, str]
    engine: Engine
    url: str
    key: str
    api: subprocess.Popen[bytes]
    workers: list[WorkerProcess] = field(default_factory=list)

    def start_worker(self, label: str) -> WorkerProcess:
        log = self.folder / f"{label}.log"
        process = apoptosis(
            *("worker", "--queues", "cpu", "--name", f"{label}@%h"), env=self.env, log=log
        )
        worker = WorkerProcess(label, process, log)
        self.workers.append(worker)
        return worker


@contextmanager
def postgres_database(keep: bool) -> Iterator[str]:
    """A fresh database on the machine's Postgres, dropped afterwards unless `keep`."""
    import psycopg

    ensure_server(5432, POSTGRES_START)
    name = f"apoptosis_soak_{uuid.uuid4().hex[:8]}"
    admin = "postgresql://postgres@127.0.0.1:5432/test"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        if keep:
            print(f"database kept: {name}")
        else:
            with psycopg.connect(admin, autocommit=True) as connection:
                connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A redis-server of our own on a free port, no persistence; its URL."""
    port = free_port()
    with (folder / "redis.log").open("ab") as log:
        process = subprocess.Popen(
            [
                *("redis-server", "--bind", "127.0.0.1", "--port", str(port)),
                *("--save", "", "--appendonly", "no", "--dir", str(folder)),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_port(port, process)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(process)


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"redis-server did not answer on port {port} within {timeout:.0f} s")


def environment(folder: Path, database_url: str, broker_url: str, args: Any) -> dict[str, str]:
    return {
        "APOPTOSIS_DATABASE_URL": database_url,
        "APOPTOSIS_BROKER_URL": broker_url,
        "APOPTOSIS_STORE_URL": str(folder / "store"),
        "APOPTOSIS_HOME": str(folder / "home"),
        "APOPTOSIS_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
        "APOPTOSIS_STALE_AFTER_SECONDS": str(STALE_AFTER_SECONDS),
        # each client has at most one job active: the default (20) only binds above 20 clients
        "APOPTOSIS_MAX_ACTIVE_JOBS": str(max(20, args.clients)),
        # the workers share the machine's few CPUs: one torch thread each unless told otherwise
        "OMP_NUM_THREADS": str(args.worker_threads),
        "MKL_NUM_THREADS": str(args.worker_threads),
    }


def start_api(folder: Path, env: dict[str, str], engine: Engine) -> tuple[Any, str, str]:
    """Migrate, start the API, make a tenant; returns (process, url, key)."""
    if apoptosis("migrate", env=env, log=folder / "migrate.log").wait(120) != 0:
        raise RuntimeError(f"migrate failed:\n{(folder / 'migrate.log').read_text()[-3000:]}")
    port = free_port()
    api = apoptosis("api", "--port", str(port), env=env, log=folder / "api.log")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, api, folder / "api.log")
    with Session(engine) as session:
        _, key = create_tenant(session, "soak")
        session.commit()
    return api, url, key


def wait_for_workers(deployment: Deployment, timeout: float = 180) -> None:
    """Until every worker has beaten into worker_heartbeat (it runs `worker_ready`)."""
    deadline = time.monotonic() + timeout
    wanted = {w.lease_owner for w in deployment.workers}
    while time.monotonic() < deadline:
        for worker in deployment.workers:
            if worker.process.poll() is not None:
                raise RuntimeError(f"{worker.label} exited:\n{worker.log.read_text()[-3000:]}")
        with Session(deployment.engine) as session:
            names = set(session.scalars(select(WorkerHeartbeat.name)))
        if wanted <= names:
            return
        time.sleep(0.5)
    raise RuntimeError(f"workers not ready within {timeout:.0f} s: {wanted - names}")


def upload_inputs(deployment: Deployment, steps: int) -> dict[str, Any]:
    """Upload the tiny BERT and its dataset once; the spec every job uses."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # bert_upload's "Writing model shards"
    archive, data = bert_upload(deployment.folder)
    with Client(deployment.url, deployment.key) as client:
        model = client.wait_for_model(client.upload_model(archive, "hf", name="soak-bert").id)
        if model.state != "ready":
            raise RuntimeError(f"the model was rejected: {model.rejection_reason}")
        dataset = client.upload_dataset(data, "tensors", name="soak-data")
    return job_spec(model.id, dataset.id, steps)


# --- memory --------------------------------------------------------------------------------


def proc_status_kib(pid: int, field_name: str) -> int:
    """A `kB` field of /proc/<pid>/status; 0 for a process that is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for line in text.splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    return 0


def parent_pids() -> dict[int, int]:
    """pid → parent pid of every process (/proc/<pid>/stat; the name may hold parentheses)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def descendants(pid: int, parents: dict[int, int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


@dataclass
class Peak:
    label: str
    pid: int
    hwm_kib: int = 0  # VmHWM of the process itself
    tree_kib: int = 0  # the largest sum of VmRSS over the process and its descendants
    descendant_pids: set[int] = field(default_factory=set)


class MemorySampler:
    """Samples the watched processes (and their descendants) every `interval` seconds."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peaks: list[Peak] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def watch(self, label: str, pid: int) -> None:
        with self._lock:
            self.peaks.append(Peak(label, pid))
        self.sample()

    def sample(self) -> None:
        parents = parent_pids()
        with self._lock:
            for peak in self.peaks:
                if peak.pid not in parents:
                    continue  # gone: its last sample stands
                tree = descendants(peak.pid, parents)
                peak.descendant_pids |= tree
                peak.hwm_kib = max(peak.hwm_kib, proc_status_kib(peak.pid, "VmHWM"))
                rss = sum(proc_status_kib(pid, "VmRSS") for pid in {peak.pid, *tree})
                peak.tree_kib = max(peak.tree_kib, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- the clients ---------------------------------------------------------------------------


@dataclass
class Requests:
    """Every request's wall time at the client, by kind; failures counted apart."""

    seconds: dict[str, list[float]] = field(default_factory=lambda: {"submit": [], "poll": []})
    throttled: int = 0  # 429 answers (retried)
    failures: Counter[str] = field(default_factory=Counter)  # other errors (retried)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def timed(self, kind: str, call: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return call()
        finally:
            elapsed = time.perf_counter() - started
            with self.lock:
                self.seconds[kind].append(elapsed)

    def failed(self, kind: str, error: Exception) -> None:
        with self.lock:
            if isinstance(error, ApiError) and error.status == 429:
                self.throttled += 1
            else:
                self.failures[f"{kind}: {str(error)[:80]}"] += 1


@dataclass(frozen=True)
class Outcome:
    """One job as its client saw it."""

    index: int
    job_id: str
    state: str
    finished_at: float  # time.monotonic() when the client saw it end


@dataclass
class Soak:
    """What the client threads share."""

    url: str
    key: str
    spec: dict[str, Any]
    run_id: str
    jobs: int
    clients: int
    poll: float
    deadline: float
    requests: Requests = field(default_factory=Requests)
    outcomes: list[Outcome] = field(default_factory=list)
    started: float = 0.0  # time.monotonic() at the first submit
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    _numbers: Iterator[int] = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def next_index(self) -> int | None:
        with self._lock:
            index = next(self._numbers)
        return index if index < self.jobs else None

    def finished(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)


def retrying(soak: Soak, kind: str, call: Callable[[], T]) -> T:
    """The call, timed; a 429 or an error is counted and retried after a second."""
    while True:
        try:
            return soak.requests.timed(kind, call)
        except (ApiError, httpx.HTTPError) as error:
            soak.requests.failed(kind, error)
            if time.monotonic() > soak.deadline:
                raise
            time.sleep(1.0)


def run_one(soak: Soak, client: Client, index: int) -> Outcome:
    key = f"soak-{soak.run_id}-{index}"
    job = retrying(soak, "submit", lambda: client.submit_job(soak.spec, idempotency_key=key))
    job_id, state = job.id, job.state
    while state not in TERMINAL and time.monotonic() < soak.deadline:
        time.sleep(soak.poll)
        state = retrying(soak, "poll", lambda: client.job(job_id)).state
    return Outcome(index, job_id, state, time.monotonic())


def client_loop(soak: Soak) -> None:
    with Client(soak.url, soak.key) as client:
        while (index := soak.next_index()) is not None:
            soak.record(run_one(soak, client, index))


# --- the kill ------------------------------------------------------------------------------


@dataclass
class Kill:
    label: str
    replacement: str
    at: datetime
    finished_before: int
    interrupted_job: str | None


def running_job_of(engine: Engine, owner: str) -> str | None:
    with Session(engine) as session:
        query = select(Job.id).where(Job.lease_owner == owner, Job.state == JobState.RUNNING)
        return session.scalars(query).first()


def kill_and_replace(deployment: Deployment, sampler: MemorySampler, soak: Soak) -> Kill:
    """SIGKILL worker 0 (the whole process group) while it runs a job; start a new one."""
    victim = deployment.workers[0]
    deadline = time.monotonic() + KILL_WAIT_SECONDS
    job_id = running_job_of(deployment.engine, victim.lease_owner)
    while job_id is None and time.monotonic() < deadline:
        time.sleep(0.05)
        job_id = running_job_of(deployment.engine, victim.lease_owner)
    sampler.sample()  # its last memory sample
    finished = soak.finished()
    os.killpg(victim.process.pid, signal.SIGKILL)
    at = datetime.now(UTC)
    victim.process.wait()
    replacement = deployment.start_worker(f"{victim.label}-restarted")
    sampler.watch(replacement.label, replacement.process.pid)
    return Kill(victim.label, replacement.label, at, finished, job_id)


def drive(deployment: Deployment, sampler: MemorySampler, soak: Soak, kill_at: int) -> Kill | None:
    """Run the clients to the end; kill worker 0 once `kill_at` jobs have finished."""
    threads = [
        threading.Thread(target=client_loop, args=(soak,), name=f"client-{n}", daemon=True)
        for n in range(soak.clients)
    ]
    soak.started, soak.started_at = time.monotonic(), datetime.now(UTC)
    for thread in threads:
        thread.start()
    kill = None
    while any(thread.is_alive() for thread in threads):
        if kill is None and 0 < kill_at <= soak.finished():
            kill = kill_and_replace(deployment, sampler, soak)
        time.sleep(0.1)
    return kill


# --- checks against the database -----------------------------------------------------------


@dataclass(frozen=True)
class JobRecord:
    id: str
    state: str
    attempt: int
    artifact_formats: list[str]
    claims: int  # `running` state events: one per claim
    successes: int  # `succeeded` state events
    running_at: list[datetime]  # when each claim happened
    succeeded_at: datetime | None


def job_records(engine: Engine, run_id: str) -> list[JobRecord]:
    with Session(engine) as session:
        jobs = session.scalars(select(Job).where(Job.idempotency_key.like(f"soak-{run_id}-%")))
        records = {job.id: job for job in jobs}
        ids = list(records)
        formats: dict[str, list[str]] = {job_id: [] for job_id in ids}
        for job_id, fmt in session.execute(
            select(Artifact.job_id, Artifact.format).where(Artifact.job_id.in_(ids))
        ):
            formats[job_id].append(fmt)
        states: dict[str, list[tuple[str, datetime]]] = {job_id: [] for job_id in ids}
        events = select(JobEvent.job_id, JobEvent.data, JobEvent.created_at).where(
            JobEvent.job_id.in_(ids), JobEvent.kind == "state"
        )
        for job_id, data, created in session.execute(events.order_by(JobEvent.id)):
            states[job_id].append((data.get("state"), created))
    return [
        JobRecord(
            id=job_id,
            state=job.state,
            attempt=job.attempt,
            artifact_formats=sorted(formats[job_id]),
            claims=sum(state == JobState.RUNNING for state, _ in states[job_id]),
            successes=sum(state == JobState.SUCCEEDED for state, _ in states[job_id]),
            running_at=[at for state, at in states[job_id] if state == JobState.RUNNING],
            succeeded_at=next(
                (at for state, at in states[job_id] if state == JobState.SUCCEEDED), None
            ),
        )
        for job_id, job in records.items()
    ]


def interrupted(record: JobRecord, kill: Kill | None) -> bool:
    """Whether the kill cut this job's run short: it ran on the killed worker then, and had not
    succeeded before the kill landed (a job can finish between the look-up and the signal)."""
    if kill is None or record.id != kill.interrupted_job:
        return False
    return record.succeeded_at is None or record.succeeded_at > kill.at


def problems(records: list[JobRecord], soak: Soak, kill: Kill | None) -> list[str]:
    """Every way the run fell short of 'each job succeeded exactly once'."""
    found = []
    if len(records) != soak.jobs:
        found.append(f"{len(records)} job rows for {soak.jobs} submitted jobs")
    if len(soak.outcomes) != soak.jobs:
        found.append(f"the clients saw {len(soak.outcomes)} of {soak.jobs} jobs end")
    seen = {outcome.job_id: outcome.state for outcome in soak.outcomes}
    for record in records:
        expected_attempt = 2 if interrupted(record, kill) else 1
        checks = {
            "state": (record.state, JobState.SUCCEEDED),
            "state seen by its client": (seen.get(record.id), JobState.SUCCEEDED),
            "attempt": (record.attempt, expected_attempt),
            "claims (running events)": (record.claims, record.attempt),
            "succeeded events": (record.successes, 1),
            "artifact formats": (record.artifact_formats, sorted(OUTPUTS)),
        }
        found += [
            f"job {record.id}: {name} is {actual!r}, expected {wanted!r}"
            for name, (actual, wanted) in checks.items()
            if actual != wanted
        ]
    return found


# --- logs ----------------------------------------------------------------------------------

LOG_PATTERNS = {
    "tracebacks": re.compile(r"^Traceback"),
    "ERROR lines": re.compile(r"\bERROR\b"),
    "reaper re-queues": re.compile(r"its worker went silent; queued again"),
    "lease lost": re.compile(r"lease lost"),
}


def log_counts(folder: Path) -> dict[str, Counter[str]]:
    """For each log: how many lines match each pattern."""
    counts: dict[str, Counter[str]] = {}
    for log in sorted(folder.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()
        counts[log.stem] = Counter(
            name for line in lines for name, pattern in LOG_PATTERNS.items() if pattern.search(line)
        )
    return counts


# --- report --------------------------------------------------------------------------------


def quantile_ms(values: list[float], q: int) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{1000 * values[0]:.1f} ms"
    return f"{1000 * statistics.quantiles(values, n=100, method='inclusive')[q - 1]:.1f} ms"


def latency_rows(requests: Requests) -> list[tuple[str, str]]:
    rows = []
    every = [s for values in requests.seconds.values() for s in values]
    for kind, values in [*requests.seconds.items(), ("all", every)]:
        rows.append(
            (
                f"API latency, {kind} ({len(values)} requests): p50 / p99",
                f"{quantile_ms(values, 50)} / {quantile_ms(values, 99)}",
            )
        )
    failures = sum(requests.failures.values())
    rows.append(
        ("429 answers (retried) / other request errors", f"{requests.throttled} / {failures}")
    )
    return rows


def kill_rows(kill: Kill | None, records: list[JobRecord], soak: Soak) -> list[tuple[str, str]]:
    if kill is None:
        return [("worker killed", "no (the kill point was never reached)")]
    rows = [
        (
            "worker killed (SIGKILL) / restarted as",
            f"{kill.label} after {kill.finished_before} jobs finished / {kill.replacement}",
        )
    ]
    record = next((r for r in records if r.id == kill.interrupted_job), None)
    if record is None:
        return [*rows, ("job interrupted by the kill", "none (worker 0 was idle)")]
    if not interrupted(record, kill):
        return [*rows, ("job interrupted by the kill", f"none ({record.id} ended first)")]
    later = [at for at in record.running_at if at > kill.at]
    reclaimed = f"{(later[0] - kill.at).total_seconds():.1f} s" if later else "never"
    ended = next((o.finished_at for o in soak.outcomes if o.job_id == record.id), None)
    rows += [
        (
            "job interrupted by the kill: id, state, attempt",
            f"{record.id}, {record.state}, {record.attempt}",
        ),
        ("… claimed again after the kill", reclaimed),
    ]
    if ended is not None:
        since_kill = ended - soak.started - (kill.at - soak.started_at).total_seconds()
        rows.append(("… seen finished by its client after the kill", f"{since_kill:.1f} s"))
    return rows


def result_rows(records: list[JobRecord], soak: Soak) -> list[tuple[str, str]]:
    def histogram(values: list[Any]) -> str:
        return ", ".join(f"{k}: {n}" for k, n in sorted(Counter(values).items())) or "–"

    ends = [o.finished_at for o in soak.outcomes]
    wall = (max(ends) - soak.started) if ends else 0.0
    rate = len(ends) / wall * 60 if wall else 0.0
    return [
        ("jobs submitted / job rows in the database", f"{soak.jobs} / {len(records)}"),
        ("final states (database)", histogram([r.state for r in records])),
        ("final states (clients)", histogram([o.state for o in soak.outcomes])),
        ("attempt (database)", histogram([r.attempt for r in records])),
        ("claims per job (running events)", histogram([r.claims for r in records])),
        ("succeeded events per job", histogram([r.successes for r in records])),
        ("artifact rows per job", histogram([len(r.artifact_formats) for r in records])),
        ("wall time (first submit → last job seen ended)", f"{wall:.1f} s"),
        ("throughput", f"{rate:.1f} jobs/min"),
    ]


def memory_rows(peaks: list[Peak]) -> list[tuple[str, str]]:
    rows = []
    for peak in peaks:
        extra = f", {len(peak.descendant_pids)} descendants" if peak.descendant_pids else ""
        rows.append(
            (
                f"peak RSS, {peak.label} (pid {peak.pid}): VmHWM / process tree",
                f"{peak.hwm_kib / 1024:.0f} / {peak.tree_kib / 1024:.0f} MiB{extra}",
            )
        )
    return rows


def log_rows(counts: dict[str, Counter[str]]) -> list[tuple[str, str]]:
    return [
        (f"log {name}", ", ".join(f"{k}: {n}" for k, n in sorted(found.items())))
        for name, found in counts.items()
        if found
    ]


def table(rows: list[tuple[str, str]]) -> str:
    lines = ["| measure | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="pruning jobs in all")
    parser.add_argument("--clients", type=int, default=20, help="concurrent client threads")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument(
        "--kill-at",
        type=int,
        default=None,
        help="finished jobs before worker 0 is killed (default: half the jobs; 0: no kill)",
    )
    parser.add_argument("--steps", type=int, default=1, help="pruning steps per job (longer)")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between job reads")
    parser.add_argument("--worker-threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the jobs")
    parser.add_argument(
        "--keep", action="store_true", help="keep the working folder, its logs and the database"
    )
    args = parser.parse_args()
    if args.kill_at is None:
        args.kill_at = args.jobs // 2
    return args


def run(folder: Path, database_url: str, broker_url: str, args: argparse.Namespace) -> bool:
    """Deploy, soak, check, print; True if every check passed."""
    env = environment(folder, database_url, broker_url, args)
    engine = make_engine(database_url)
    api, url, key = start_api(folder, env, engine)
    deployment = Deployment(folder, env, engine, url, key, api)
    try:
        with MemorySampler() as sampler:
            sampler.watch("API", api.pid)
            for n in range(args.workers):
                worker = deployment.start_worker(f"worker{n}")
                sampler.watch(worker.label, worker.process.pid)
            wait_for_workers(deployment)
            spec = upload_inputs(deployment, args.steps)
            deadline = time.monotonic() + args.timeout
            run_id = uuid.uuid4().hex[:8]
            soak = Soak(url, key, spec, run_id, args.jobs, args.clients, args.poll, deadline)
            kill = drive(deployment, sampler, soak, args.kill_at)
            sampler.sample()
        records = job_records(engine, run_id)
    finally:
        for worker in deployment.workers:
            stop(worker.process)
        stop(api)
        engine.dispose()
    found = problems(records, soak, kill)
    rows = [
        *result_rows(records, soak),
        ("every job succeeded exactly once", "yes" if not found else f"NO ({len(found)} problems)"),
        *kill_rows(kill, records, soak),
        *latency_rows(soak.requests),
        *memory_rows(sampler.peaks),
        *log_rows(log_counts(folder)),
    ]
    print(
        f"\nSoak: {args.jobs} jobs, {args.clients} clients, {args.workers} workers "
        f"(Postgres + Redis), {os.cpu_count()} CPUs shared by everything\n"
    )
    print(table(rows))
    for problem in found[:50]:
        print(f"- {problem}")
    for failure, count in soak.requests.failures.most_common(10):
        print(f"- request error ×{count}: {failure}")
    return not found


def main() -> None:
    args = parse_args()
    folder = Path(tempfile.mkdtemp(prefix="apoptosis-soak-"))
    passed = False
    try:
        with redis_server(folder) as broker_url, postgres_database(args.keep) as database_url:
            passed = run(folder, database_url, broker_url, args)
    finally:
        if passed and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"\nworking folder and logs kept in {folder}")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
