"""The fault matrix: each fault is injected into real processes (API, workers, `apoptosis up`,
Redis, Postgres connections, S3, a disk) and each test proves the defined outcome: every job ends
succeeded, failed with a code, or cancelled; none runs twice (its attempts, and one artifact per
output format); no partial artifact or upload is visible; `/readyz` says which dependency is
down while it is, and is ready again once it is back, by itself.

Four deployments serve the module: `apoptosis up` (its own test), a SQLite one with two workers
(worker kills, API restarts, a full disk), a Postgres + Redis one (broker restarts, dropped
database connections) and an S3 one (the store going away). Settings make the reaper quick:
heartbeats every 0.5 s, a lease stale after 3 s (faults.py).
"""

import hashlib
import os
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.client import Client
from service.core.orm import Job
from service.jobs.states import JobState
from tests.integration.faults import (
    AWS_ENV,
    FINETUNING_SPEC,
    HEARTBEAT_SECONDS,
    LONG_SPEC,
    MEDIUM_SPEC,
    PROBE_WITHIN_S,
    QUICK_SPEC,
    STALE_AFTER_SECONDS,
    MotoS3,
    RedisServer,
    Stack,
    assert_whole_blobs,
    fake_worker_beats,
    fill,
    is_problem,
    kill_group,
    make_stack,
    read_events,
    readyz,
    terminate_backends,
    tmpfs,
)
from tests.integration.services import (
    apoptosis,
    bert_upload,
    free_port,
    postgres_database,
    stop,
    until,
    wait_healthy,
)

pytestmark = pytest.mark.slow  # real processes (conftest.py marks the folder slow as well)


@dataclass
class Deployment:
    """A running stack with a validated model and a dataset to submit jobs on."""

    stack: Stack
    client: Client
    model_id: str
    dataset_id: str
    store: Path | None = None  # the local store's folder
    full_disk: bool = False  # the store is a small tmpfs a test may fill

    def spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        """`spec` on this deployment's model and dataset."""
        return {**spec, "model_id": self.model_id, "dataset_id": self.dataset_id}

    def submit(self, spec: dict[str, Any], key: str | None = None) -> str:
        return self.client.submit_job(self.spec(spec), key).id


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny BERT (hf zip) and its tensors dataset every deployment prunes."""
    return bert_upload(tmp_path_factory.mktemp("bert"))


def _deploy(stack: Stack, bert: tuple[Path, Path], **extra: Any) -> Deployment:
    archive, data = bert
    client = stack.client()
    try:
        model = client.wait_for_model(client.upload_model(archive, "hf").id)
        assert model.state == "ready", model.rejection_reason
        dataset = client.upload_dataset(data, "tensors")
    except BaseException:
        client.close()
        raise
    return Deployment(stack, client, model.id, dataset.id, **extra)


def _assert_once(stack: Stack, job_id: str, outputs: list[str], attempts: int = 1) -> Job:
    """The job succeeded in `attempts` claims and published one artifact per output format."""
    job = stack.job(job_id)
    assert job.state == JobState.SUCCEEDED, (job.state, job.error)
    assert job.attempt == attempts, f"job {job_id} was claimed {job.attempt} times"
    assert stack.artifact_counts(job_id) == Counter(outputs)
    return job


# 1. `apoptosis up` killed as a whole


def test_up_killed_as_a_group_and_restarted_finishes_both_jobs_once(
    tmp_path: Path, bert: tuple[Path, Path]
) -> None:
    """SIGKILL to `up`'s whole process group (API and worker at once, no clean-up) while one job
    runs and another waits; `up` started again on the same home finishes both, each once: the
    running one re-queued by the reaper (attempt 2), the queued one still queued (attempt 1)."""
    home, log, port = tmp_path / "var", tmp_path / "up.log", free_port()
    env = {
        "APOPTOSIS_HEARTBEAT_SECONDS": HEARTBEAT_SECONDS,
        "APOPTOSIS_STALE_AFTER_SECONDS": STALE_AFTER_SECONDS,
        "APOPTOSIS_API_KEY": "",
    }
    url = f"http://127.0.0.1:{port}"

    def start_up() -> subprocess.Popen[bytes]:
        process = apoptosis("up", "--port", str(port), "--home", str(home), env=env, log=log)
        wait_healthy(url, process, log)
        return process

    up = start_up()
    stack = Stack(tmp_path, {"APOPTOSIS_HOME": str(home)}, f"sqlite:///{home / 'apoptosis.db'}")
    try:
        stack.port, stack.key = port, (home / "api-key").read_text().strip()
        deployment = _deploy(stack, bert)
        with deployment.client:
            running = deployment.submit(MEDIUM_SPEC)
            queued = deployment.submit(QUICK_SPEC)
        stack.wait_for_stage(running, "pruning")
        assert stack.job(queued).state == JobState.QUEUED

        kill_group(up)
        assert stack.job(running).state == JobState.RUNNING  # nothing ran to tidy up
        up = start_up()

        for job_id in (running, queued):
            stack.wait_terminal(job_id)
        _assert_once(stack, running, ["hf"], attempts=2)
        _assert_once(stack, queued, ["hf"], attempts=1)
        assert_whole_blobs(home / "store")
    finally:
        stop(up)
        stack.close()


# The SQLite deployment: two workers (killed ones are replaced), a store on a small tmpfs


@pytest.fixture(scope="module")
def lite(tmp_path_factory: pytest.TempPathFactory, bert: tuple[Path, Path]) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp("lite")
    store = work / "store"
    with tmpfs(store, "64m") as mounted:
        env = {"APOPTOSIS_HOME": str(work / "home"), "APOPTOSIS_STORE_URL": str(store)}
        stack = make_stack(work, env, f"sqlite:///{work / 'apoptosis.db'}", workers=2)
        try:
            deployment = _deploy(stack, bert, store=store, full_disk=mounted)
            yield deployment
            deployment.client.close()
        finally:
            stack.close()


# 2. a worker killed in each stage of a job


@pytest.mark.parametrize(
    "stage", ["pruning", "finetuning", "exporting"], ids=["scoring", "finetuning", "export"]
)
def test_worker_killed_mid_stage_is_reaped_and_the_job_succeeds_once(
    lite: Deployment, stage: str
) -> None:
    """SIGKILL the worker running a job while it scores (pruning steps), fine-tunes or exports:
    nothing of the attempt is published, the reaper re-queues the stale job, another worker
    runs it, and it succeeds on attempt 2 with one artifact per format, all blobs whole."""
    stack = lite.stack
    job_id = lite.submit(LONG_SPEC)
    seen = stack.wait_for_stage(job_id, stage)

    victim = stack.worker_of(seen)
    kill_group(victim)
    stack.workers.remove(victim)
    stack.start_worker()  # a replacement boots while the lease goes stale

    killed = stack.job(job_id)
    assert killed.state == JobState.RUNNING
    assert killed.progress["stage"] == stage, f"the kill landed after {stage}: {killed.progress}"
    assert stack.artifact_counts(job_id) == Counter()
    assert lite.client.artifacts(job_id) == []

    stack.wait_terminal(job_id)
    _assert_once(stack, job_id, LONG_SPEC["outputs"], attempts=2)
    assert len(lite.client.artifacts(job_id)) == len(LONG_SPEC["outputs"])
    assert lite.store is not None
    assert_whole_blobs(lite.store)


# 5. the API restarted under an upload and under an event stream

BOUNDARY = "fault-boundary"


def test_api_killed_during_an_upload_leaves_no_model_and_its_spool_is_swept(
    lite: Deployment,
) -> None:
    """The API dies (SIGKILL) while a client streams a model upload: the client gets a
    connection error, no model row appears, and the spool file the upload left is removed by
    the restarted API once it is idle past the sweep's limit."""
    stack = lite.stack
    spool = stack.home / "tmp"
    before = set(spool.glob("upload-*"))
    models = stack.model_count()
    killed = threading.Event()
    outcome: list[object] = []
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="format"\r\n\r\nhf\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="cut.zip"\r\n'
        "Content-Type: application/zip\r\n\r\n"
    ).encode()

    def body() -> Iterator[bytes]:
        yield head + b"PK" + b"\0" * (256 * 1024)
        killed.wait(30)
        for _ in range(40):
            yield b"\0" * (256 * 1024)
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    def upload() -> None:
        headers = {
            "Authorization": f"Bearer {stack.key}",
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        }
        try:
            with httpx.Client(timeout=30) as http:
                outcome.append(http.post(f"{stack.url}/v1/models", content=body(), headers=headers))
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=upload)
    thread.start()
    try:
        [partial] = until(
            lambda: [p for p in spool.glob("upload-*") if p not in before and p.stat().st_size],
            30,
            "the upload's spool file",
        )
        stack.kill_api()
    finally:
        killed.set()
        thread.join(60)

    try:
        [result] = outcome
        assert isinstance(result, httpx.TransportError), result
        assert stack.model_count() == models
        assert partial.exists()  # a crash runs no clean-up: the sweep at start removes it
        idle = time.time() - 16 * 60  # past SPOOL_IDLE_SECONDS: no upload writes to it any more
        os.utime(partial, (idle, idle))
    finally:
        stack.ensure_api()
    assert not partial.exists()


def test_event_stream_resumes_across_an_api_restart_without_duplicates_or_gaps(
    lite: Deployment,
) -> None:
    """The API dies while a client follows a running job's events; the client reconnects to
    the restarted API with Last-Event-ID and receives every later event once: the two reads
    together are exactly the job's event log."""
    stack = lite.stack
    job_id = lite.submit(LONG_SPEC)
    at_kill: list[str] = []

    def kill_after_three(received: int) -> None:
        if received == 3:
            at_kill.append(stack.job(job_id).state)
            stack.kill_api()

    try:
        first, cut = read_events(stack.url, stack.key, job_id, on_event=kill_after_three)
    finally:
        stack.ensure_api()
    assert at_kill and at_kill[0] not in (JobState.SUCCEEDED, JobState.FAILED), at_kill
    assert isinstance(cut, httpx.TransportError), "the stream should break with the API"

    rest, cut = read_events(stack.url, stack.key, job_id, last_event_id=str(first[-1][0]))
    assert cut is None
    assert rest, "the job went on after the restart: events must follow"

    ids = [event_id for event_id, _ in first + rest]
    assert len(ids) == len(set(ids)), "duplicates"
    assert ids == stack.event_ids(job_id), "the stream differs from the event log (a gap)"
    assert rest[-1][1] == "state"
    _assert_once(stack, job_id, LONG_SPEC["outputs"])


# 6b. the store's disk full


@dataclass
class DiskFull:
    upload: httpx.Response | Exception
    models_added: int
    blobs_added: set[Path]
    store_tmp: list[Path]
    job: Job
    upload_after_freeing: int


def _blobs(store: Path) -> set[Path]:
    return {p for p in (store / "sha256").rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def disk_full(lite: Deployment, bert: tuple[Path, Path]) -> DiskFull:
    """The lite store's tmpfs filled to the last byte; an upload and a job's export meet it;
    then the filler is removed."""
    if not lite.full_disk:
        pytest.skip("mount -t tmpfs is not permitted here: no disk to fill")
    assert lite.store is not None
    stack, archive = lite.stack, bert[0]
    filler = lite.store / "filler"
    models, blobs = stack.model_count(), _blobs(lite.store)
    fill(filler)
    try:
        headers = {"Authorization": f"Bearer {stack.key}"}
        upload: httpx.Response | Exception
        try:
            upload = httpx.post(
                f"{stack.url}/v1/models",
                headers=headers,
                data={"format": "hf"},
                files={"file": ("full.zip", archive.read_bytes())},
                timeout=60,
            )
        except httpx.TransportError as error:
            upload = error
        job = stack.wait_terminal(lite.submit(QUICK_SPEC))
        observed = DiskFull(
            upload,
            stack.model_count() - models,
            _blobs(lite.store) - blobs,
            list((lite.store / "tmp").glob("*")),
            job,
            0,
        )
    finally:
        filler.unlink()
    again = httpx.post(
        f"{stack.url}/v1/models",
        headers=headers,
        data={"format": "hf"},
        files={"file": ("again.zip", archive.read_bytes())},
        timeout=60,
    )
    observed.upload_after_freeing = again.status_code
    return observed


def test_upload_to_a_full_disk_is_a_problem_and_leaves_nothing(disk_full: DiskFull) -> None:
    """An upload whose store write hits ENOSPC is answered (no dropped connection) with an
    error problem+json; no model row, blob or temporary file remains; once space is freed
    uploads work again."""
    response = disk_full.upload
    assert isinstance(response, httpx.Response), f"the connection dropped: {response!r}"
    assert response.status_code >= 400 and is_problem(response), response.text
    assert disk_full.models_added == 0
    assert disk_full.blobs_added == set()
    assert disk_full.store_tmp == []
    assert disk_full.upload_after_freeing == 201


def test_upload_to_a_full_disk_says_insufficient_storage(disk_full: DiskFull) -> None:
    """A full store is the operator's problem, not a server bug: 507 with a code."""
    assert isinstance(disk_full.upload, httpx.Response)
    assert disk_full.upload.status_code == 507, disk_full.upload.text
    assert disk_full.upload.json()["code"] == "insufficient_storage"


def test_export_to_a_full_disk_fails_the_job_and_publishes_nothing(disk_full: DiskFull) -> None:
    """A job whose export meets a full store ends failed, with an error code, on its first
    attempt (not stuck, not retried forever), with no artifact and no temporary file."""
    job = disk_full.job
    assert job.state == JobState.FAILED and job.error and job.error.get("code"), job.error
    assert job.attempt == 1
    assert disk_full.blobs_added == set() and disk_full.store_tmp == []


def test_export_to_a_full_disk_names_the_cause(disk_full: DiskFull) -> None:
    """The job's error code says the store is full, so its user knows a retry may work."""
    assert disk_full.job.error is not None
    assert disk_full.job.error["code"] == "store_full", disk_full.job.error


# The Postgres + Redis deployment (Redis of our own, restartable)


@dataclass
class Distributed(Deployment):
    redis: RedisServer | None = None


@pytest.fixture(scope="module")
def distributed(
    tmp_path_factory: pytest.TempPathFactory, bert: tuple[Path, Path]
) -> Iterator[Distributed]:
    work = tmp_path_factory.mktemp("distributed")
    redis = RedisServer(work / "redis")
    redis.start()
    try:
        with postgres_database() as database_url:
            env = {
                "APOPTOSIS_HOME": str(work / "home"),
                "APOPTOSIS_BROKER_URL": redis.url,
                "APOPTOSIS_STORE_URL": str(work / "store"),
            }
            stack = make_stack(work, env, database_url, workers=1)
            try:
                base = _deploy(stack, bert, store=work / "store")
                yield Distributed(**vars(base), redis=redis)
                base.client.close()
            finally:
                stack.close()
    finally:
        redis.kill()


# 3. Redis restarted


@dataclass
class RedisRestarted:
    ready_down: dict[str, Any]  # /readyz's body once it answered 503
    refused: httpx.Response  # a job submitted while Redis was down
    upload: httpx.Response  # a model uploaded while Redis was down
    retried_id: str  # the job the submission's retry (same Idempotency-Key) answered with
    jobs: list[str]  # running, queued, submitted during the outage


@pytest.fixture(scope="module")
def redis_restarted(distributed: Distributed, bert: tuple[Path, Path]) -> RedisRestarted:
    """Redis killed (SIGKILL; append-only, fsync always) while one job runs and one waits; a job
    submitted and a model uploaded while it is down; Redis started again on its files."""
    stack, redis = distributed.stack, distributed.redis
    assert redis is not None
    running = distributed.submit(MEDIUM_SPEC)
    queued = distributed.submit(QUICK_SPEC)
    stack.wait_for_stage(running, "pruning")
    assert stack.job(queued).state == JobState.QUEUED

    redis.kill()
    try:
        _, ready_down = until(lambda: (r := readyz(stack.url))[0] == 503 and r, 20, "a 503")
        headers = {"Authorization": f"Bearer {stack.key}"}
        spec = distributed.spec(QUICK_SPEC)
        refused = httpx.post(
            f"{stack.url}/v1/jobs",
            json=spec,
            headers={**headers, "Idempotency-Key": "redis-down"},
            timeout=60,
        )
        upload = httpx.post(
            f"{stack.url}/v1/models",
            headers=headers,
            data={"format": "hf", "name": "redis-down"},
            files={"file": ("down.zip", bert[0].read_bytes())},
            timeout=60,
        )
    finally:
        redis.start()
    until(lambda: readyz(stack.url)[0] == 200, 30, "readyz ready after Redis is back")
    retried = distributed.client.submit_job(spec, "redis-down").id
    jobs = [running, queued, retried]
    for job_id in jobs:
        stack.wait_terminal(job_id)
    return RedisRestarted(ready_down, refused, upload, retried, jobs)


def test_redis_down_is_named_by_readyz_which_recovers(redis_restarted: RedisRestarted) -> None:
    """While Redis is down /readyz answers 503 with only `broker` failing (the worker's
    heartbeat, in the database, still counts); it is ready again by itself once Redis is back
    (the fixture waits for that)."""
    checks = redis_restarted.ready_down["checks"]
    assert checks["broker"] is False and checks["database"] and checks["store"], checks


def test_redis_restart_with_jobs_queued_and_running_finishes_each_once(
    distributed: Distributed, redis_restarted: RedisRestarted
) -> None:
    """The running job, the queued one (its message kept by Redis's append-only file) and the
    one submitted during the outage (answered 503 broker_unavailable with its id, then sent by
    its retry with the same Idempotency-Key) all succeed, each on one attempt, once."""
    refused = redis_restarted.refused
    assert refused.status_code == 503 and is_problem(refused), refused.text
    assert refused.json()["code"] == "broker_unavailable"
    assert redis_restarted.retried_id == refused.json()["job_id"]
    stack = distributed.stack
    for job_id in redis_restarted.jobs:
        _assert_once(stack, job_id, ["hf"])
    assert [job.id for job in stack.jobs_with_key("redis-down")] == [redis_restarted.retried_id]
    assert distributed.store is not None
    assert_whole_blobs(distributed.store)


def test_upload_while_redis_is_down_is_answered_with_a_problem(
    redis_restarted: RedisRestarted,
) -> None:
    """A model upload while the broker is down gets an error problem+json, not a dropped
    connection or a traceback page."""
    upload = redis_restarted.upload
    assert upload.status_code == 201 or is_problem(upload), upload.text


def test_upload_while_redis_is_down_is_not_a_server_error(
    redis_restarted: RedisRestarted,
) -> None:
    """The upload is saved before its validation is queued: the answer says so (201 and the
    reaper queues it later, or 503 broker_unavailable naming the model), never a 500."""
    upload = redis_restarted.upload
    assert upload.status_code == 201, upload.text


def test_a_hung_redis_is_reported_within_seconds_not_waited_for(
    distributed: Distributed,
) -> None:
    """Redis stops answering without closing a connection (SIGSTOP: a hung server, or a
    partition): /readyz still answers within seconds, 503 naming the broker; a submission is
    answered 503 broker_unavailable (its job saved) instead of hanging. Redis running again
    (SIGCONT): /readyz is ready by itself and the retried submission's job succeeds once."""
    stack, redis = distributed.stack, distributed.redis
    assert redis is not None
    headers = {"Authorization": f"Bearer {stack.key}", "Idempotency-Key": "redis-hung"}
    spec = distributed.spec(QUICK_SPEC)
    # Hung while the worker waits for work; hung while it acknowledges a job is the next test.
    until(redis.consumer_idle, 60, "the worker waiting in BRPOP, nothing queued")
    with redis.frozen():
        status, body = readyz(stack.url, within=PROBE_WITHIN_S)
        assert status == 503 and body["checks"]["broker"] is False, body
        assert body["checks"]["database"] is True and body["checks"]["store"] is True, body
        try:
            # A send tries twice, each try bounded by the broker's 3 s socket timeouts
            # (queue.PUBLISH_RETRY_POLICY); an unbounded one hangs. 30 s leaves room for a
            # loaded 2-core machine.
            refused = httpx.post(f"{stack.url}/v1/jobs", json=spec, headers=headers, timeout=30)
        except httpx.TimeoutException:
            raise AssertionError("the submission hung with the broker") from None
        assert refused.status_code == 503 and is_problem(refused), refused.text
        assert refused.json()["code"] == "broker_unavailable"
        saved = refused.json()["job_id"]
    until(lambda: readyz(stack.url)[0] == 200, 30, "readyz ready after Redis resumes")
    assert distributed.client.submit_job(spec, "redis-hung").id == saved
    stack.wait_terminal(saved)
    _assert_once(stack, saved, QUICK_SPEC["outputs"])


# Celery's report of an ack that raised: the one outside sign that the worker tried to ack while
# Redis hung (a fix that reports it otherwise changes the wait for it below).
FAILED_ACK = "Couldn't ack"


def test_a_redis_hung_while_the_worker_acknowledges_a_job_does_not_stop_the_worker(
    distributed: Distributed,
) -> None:
    """Redis hangs while a job runs: the job ends (Postgres answers) and the worker's
    acknowledgement of its message times out (the broker's socket timeout). Once Redis answers
    again, the worker takes the next job and it succeeds once."""
    stack, redis = distributed.stack, distributed.redis
    assert redis is not None
    [worker] = stack.workers
    try:
        running = distributed.submit(MEDIUM_SPEC)
        stack.wait_job(running, lambda job: job.state == JobState.RUNNING, "a claim", every=0.05)
        failed_acks = stack.worker_log(worker).count(FAILED_ACK)  # Redis's restart left some
        with redis.frozen():
            stack.wait_terminal(running)
            # The ack gives up after the broker's 3 s socket timeout; 30 s is for a loaded machine.
            until(
                lambda: stack.worker_log(worker).count(FAILED_ACK) > failed_acks,
                30,
                "the worker giving up its acknowledgement",
            )
        _assert_once(stack, running, MEDIUM_SPEC["outputs"])
        following = distributed.submit(QUICK_SPEC)
        stack.wait_terminal(following)
        _assert_once(stack, following, QUICK_SPEC["outputs"])
    finally:
        stack.restart_workers()  # whatever this left behind, the next test gets a fresh worker


# 4. Postgres connections dropped


@dataclass
class Dropped:
    terminated: int
    states: list[str]  # the running job's, at each round
    ready: list[int]  # /readyz's status, at each round
    tries: dict[str, list[object]]  # per Idempotency-Key: each answer's status (or error)
    ready_after: bool
    running: Job
    submitted: list[Job]


@pytest.fixture(scope="module")
def dropped(distributed: Distributed) -> Dropped:
    """Every backend of the database terminated (pg_terminate_backend), ten rounds over about
    three seconds, while a job fine-tunes (it reports progress many times a second) and
    clients submit jobs, retrying a 5xx with the same Idempotency-Key."""
    stack = distributed.stack
    running = distributed.submit(FINETUNING_SPEC)
    stack.wait_for_stage(running, "finetuning")
    storming = threading.Event()
    storming.set()
    tries: dict[str, list[object]] = {}

    def submit_during_the_storm() -> None:
        headers = {"Authorization": f"Bearer {stack.key}"}
        with httpx.Client(base_url=stack.url, headers=headers, timeout=60) as http:
            while storming.is_set() and len(tries) < 8:
                key = f"pg-drop-{len(tries)}"
                tries[key] = []
                for _ in range(6):
                    try:
                        response = http.post(
                            "/v1/jobs",
                            json=distributed.spec(QUICK_SPEC),
                            headers={"Idempotency-Key": key},
                        )
                    except httpx.TransportError as error:
                        tries[key].append(type(error).__name__)
                        continue
                    problem = not response.is_success and is_problem(response)
                    tries[key].append(response.status_code if problem else response.text)
                    if response.is_success:
                        tries[key][-1] = response.status_code
                        break
                    time.sleep(0.1)
                time.sleep(0.25)

    submitter = threading.Thread(target=submit_during_the_storm)
    submitter.start()
    terminated, states, ready = 0, [], []
    try:
        for _ in range(10):
            terminated += terminate_backends(stack.database_url)
            states.append(stack.job(running).state)
            ready.append(readyz(stack.url)[0])
            time.sleep(0.2)
    finally:
        storming.clear()
        submitter.join(120)
    try:
        # by itself, at once (the reconnect is the next query); 30 s for a loaded machine
        until(lambda: readyz(stack.url)[0] == 200, 30, "readyz ready after the drops")
        ready_after = True
    except AssertionError:
        ready_after = False
    submitted = []
    for key in tries:
        submitted += stack.jobs_with_key(key)
    return Dropped(
        terminated,
        states,
        ready,
        tries,
        ready_after,
        stack.wait_terminal(running),
        [stack.wait_terminal(job.id) for job in submitted],
    )


def test_dropped_postgres_connections_leave_no_job_stuck(
    distributed: Distributed, dropped: Dropped
) -> None:
    """While every database connection is dropped again and again: a submission fails at most
    once, as a 5xx problem+json, and its retry with the same Idempotency-Key is accepted (no
    5xx loop, one job per key); /readyz keeps answering (200 or 503, never a 500) and is ready
    right after; every job ends in a defined state, was claimed once, and published at most one
    artifact per format (all of them when it succeeded)."""
    assert dropped.terminated > 0 and JobState.RUNNING in dropped.states, dropped.states
    assert set(dropped.ready) <= {200, 503}, dropped.ready
    assert dropped.ready_after
    assert dropped.tries, "nothing was submitted during the storm"
    for key, answers in dropped.tries.items():
        assert answers[-1] == 202, (key, answers)
        assert len(answers) <= 2, f"{key}: a 5xx loop {answers}"
        assert [job.id for job in distributed.stack.jobs_with_key(key)] == [
            job.id for job in dropped.submitted if job.idempotency_key == key
        ]
    assert len(dropped.submitted) == len(dropped.tries)
    for job, outputs in [(dropped.running, FINETUNING_SPEC["outputs"])] + [
        (job, QUICK_SPEC["outputs"]) for job in dropped.submitted
    ]:
        assert job.state == JobState.SUCCEEDED or (job.error and job.error.get("code")), job.error
        assert job.attempt == 1
        counts = distributed.stack.artifact_counts(job.id)
        expected = Counter(outputs) if job.state == JobState.SUCCEEDED else Counter()
        assert counts == expected, (job.state, counts)
    assert distributed.store is not None
    assert_whole_blobs(distributed.store)


def test_a_job_running_through_dropped_postgres_connections_succeeds(dropped: Dropped) -> None:
    """A dropped database connection is transient: the job it hit still succeeds."""
    for job in [dropped.running, *dropped.submitted]:
        assert job.state == JobState.SUCCEEDED, job.error


# 6a. the S3 store unreachable


@dataclass
class StoreDown:
    ready_before: tuple[int, dict[str, Any]]
    ready_down: tuple[int, dict[str, Any]]
    upload_down: httpx.Response | Exception
    models_added_down: int
    spool_left: list[Path]
    upload_after: int
    bucket_keys: list[str]
    ready_hung: list[tuple[int, dict[str, Any]]]  # two probes while S3 hangs (SIGSTOP)
    hung_probe_seconds: float  # the slower of the two
    ready_after_hang: bool


@pytest.fixture(scope="module")
def store_down(
    tmp_path_factory: pytest.TempPathFactory, bert: tuple[Path, Path]
) -> Iterator[StoreDown]:
    """An API on an S3 store (moto, a process of its own) that is killed and started again."""
    import boto3  # type: ignore[import-untyped]

    work = tmp_path_factory.mktemp("s3")
    moto = MotoS3(work / "moto.log")
    moto.start()
    s3 = boto3.client(
        "s3",
        endpoint_url=moto.endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    s3.create_bucket(Bucket="faults")
    database_url = f"sqlite:///{work / 'apoptosis.db'}"
    env = {
        **AWS_ENV,
        "AWS_CONFIG_FILE": str(work / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(work / "aws-credentials"),
        "APOPTOSIS_HOME": str(work / "home"),
        "APOPTOSIS_STORE_URL": f"s3://faults?endpoint_url={moto.endpoint}",
    }
    archive = bert[0]
    try:
        stack = make_stack(work, env, database_url, workers=0)
        with fake_worker_beats(database_url):
            client = stack.client()
            try:
                ready_before = readyz(stack.url)
                client.upload_model(archive, "hf")
                models = stack.model_count()

                moto.stop()
                ready_down = readyz(stack.url)
                upload_down: httpx.Response | Exception
                try:
                    upload_down = httpx.post(
                        f"{stack.url}/v1/models",
                        headers={"Authorization": f"Bearer {stack.key}"},
                        data={"format": "hf"},
                        files={"file": ("down.zip", archive.read_bytes())},
                        timeout=120,
                    )
                except httpx.TransportError as error:
                    upload_down = error
                models_added = stack.model_count() - models
                spool = list((stack.home / "tmp").glob("upload-*"))

                moto.start()
                s3.create_bucket(Bucket="faults")  # moto keeps nothing across a restart
                until(lambda: readyz(stack.url)[0] == 200, 60, "readyz ready, S3 back")
                upload_after = client.upload_model(archive, "hf", name="after")
                keys = [o["Key"] for o in s3.list_objects_v2(Bucket="faults").get("Contents", [])]
                for key in keys:  # whole blobs only: each holds the bytes its key names
                    content = s3.get_object(Bucket="faults", Key=key)["Body"].read()
                    assert key.endswith(hashlib.sha256(content).hexdigest()), key

                hung, slowest = [], 0.0
                with moto.frozen():
                    for _ in range(2):
                        started = time.monotonic()
                        hung.append(readyz(stack.url, within=60))
                        slowest = max(slowest, time.monotonic() - started)
                until(lambda: readyz(stack.url)[0] == 200, 90, "readyz ready, S3 resumed")
                yield StoreDown(
                    ready_before,
                    ready_down,
                    upload_down,
                    models_added,
                    spool,
                    201 if upload_after.id else 0,
                    keys,
                    hung,
                    slowest,
                    True,
                )
            finally:
                client.close()
                stack.close()
    finally:
        moto.stop()


def test_readyz_names_the_store_while_s3_is_down_and_recovers(store_down: StoreDown) -> None:
    """/readyz: ready with S3 up; 503 with only `store` failing while it is down; ready again
    by itself once S3 answers (no restart of the API)."""
    assert store_down.ready_before[0] == 200, store_down.ready_before
    status, body = store_down.ready_down
    assert status == 503 and body["status"] == "not_ready", body
    assert body["checks"] == {"database": True, "broker": True, "store": False, "workers": True}


def test_upload_while_s3_is_down_leaves_nothing_and_works_once_back(
    store_down: StoreDown,
) -> None:
    """An upload while S3 is down gets an error problem+json (not a dropped connection), no
    model row and no spool file remain, and once S3 is back uploads succeed, storing only
    whole, content-addressed objects (no `tmp/` leftovers)."""
    response = store_down.upload_down
    assert isinstance(response, httpx.Response), f"the connection dropped: {response!r}"
    assert response.status_code >= 500 and is_problem(response), response.text
    assert store_down.models_added_down == 0
    assert store_down.spool_left == []
    assert store_down.upload_after == 201
    assert store_down.bucket_keys and all(k.startswith("sha256/") for k in store_down.bucket_keys)


def test_readyz_answers_within_seconds_while_s3_hangs(store_down: StoreDown) -> None:
    """S3 that accepts connections but never answers (SIGSTOP) does not hang /readyz: each
    probe answers 503 naming the store within seconds (a second probe does not start a second
    hung check), and readiness comes back by itself when S3 resumes."""
    for status, body in store_down.ready_hung:
        assert status == 503 and body["checks"]["store"] is False, body
        assert body["checks"]["database"] and body["checks"]["broker"], body
    assert store_down.hung_probe_seconds < PROBE_WITHIN_S
    assert store_down.ready_after_hang


def test_upload_while_s3_is_down_is_a_503(store_down: StoreDown) -> None:
    """An unreachable store is a dependency outage: 503 with a stable code, like the broker's."""
    assert isinstance(store_down.upload_down, httpx.Response)
    assert store_down.upload_down.status_code == 503, store_down.upload_down.text
    assert store_down.upload_down.json()["code"] == "store_unavailable"
    assert store_down.upload_down.headers["retry-after"] == "30"
