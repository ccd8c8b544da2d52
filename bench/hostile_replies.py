"""Hostile peers: a worker's peak memory while a webhook receiver or an MLflow tracking server
answers with a body it should not hold, and how long a trickling receiver holds a delivery.

The peer runs in a child process on loopback (its memory is not the worker's); the worker's
side runs in this process against a migrated SQLite database in a temporary folder, with the
peer's address allowed. Peak resident set size is VmHWM from /proc/self/status, reset before
each case (`echo 5 > /proc/self/clear_refs`); growth = that peak − VmRSS just before the case.

1. `webhook`: a job's two notifications delivered (`worker.chores.webhooks.deliver_due`) to a
   receiver that answers 500 with a `--mib` body.
2. `mlflow`: a finished job logged (`worker.pipeline.tracking.log_job`) to a tracking server that
   answers every call 200 with a `--mib` JSON body.
3. `trickle`: a receiver that sends a byte every 0.5 s; the seconds one delivery round took
   with `APOPTOSIS_WEBHOOK_TIMEOUT_SECONDS=2`.

Target: growth < 300 MiB. Run with the worker's venv:

    .venv/bin/python -m bench.hostile_replies --mib 200
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
TARGET_MIB = 300.0
CHUNK = b"0" * MIB


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field}")


def reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")
    return _kib("VmRSS") * 1024


def peer(port: multiprocessing.Queue[int], kind: str, size: int) -> None:
    """Answer every request: `flood` a `size`-byte body, or `trickle` a byte every 0.5 s."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(500 if kind != "mlflow" else 200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(size))
            self.end_headers()
            try:
                if kind == "trickle":
                    for _ in range(size):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.5)
                    return
                sent = 0
                while sent < size:
                    self.wfile.write(CHUNK[: size - sent])
                    sent += min(len(CHUNK), size - sent)
            except OSError:  # the worker hung up
                pass

        do_GET = do_POST = do_PUT = _any

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port.put(server.server_address[1])
    server.serve_forever()


def start_peer(kind: str, size: int) -> tuple[multiprocessing.Process, str]:
    ports: multiprocessing.Queue[int] = multiprocessing.Queue()
    process = multiprocessing.Process(target=peer, args=(ports, kind, size), daemon=True)
    process.start()
    return process, f"http://127.0.0.1:{ports.get(timeout=30)}"


def job_with_notifications(url: str) -> str:
    """A job naming `url`, queued then cancelled: two notifications in the outbox."""
    from service.core.db import get_sessionmaker
    from service.core.orm import Dataset, Job, Model, utcnow
    from service.jobs import repository as jobs
    from service.jobs.states import JobState
    from service.tenants.auth import create_tenant
    from service.webhooks import secret

    with get_sessionmaker()() as session:
        tenant, _ = create_tenant(session, f"bench-{time.time_ns()}")
        model = Model(tenant_id=tenant.id, name="m", format="hf", blob_key="k", sha256="s", size=1)
        data = Dataset(
            tenant_id=tenant.id, name="d", format="tensors", blob_key="k", sha256="s", size=1
        )
        session.add_all([model, data])
        session.flush()
        spec = {"model_id": model.id, "dataset_id": data.id, "notify_url": url}
        job = Job(tenant_id=tenant.id, model_id=model.id, dataset_id=data.id, spec=spec)
        jobs.add(session, job)
        secret.ensure(session, tenant.id)
        jobs.transition(session, job.id, JobState.CANCELLED, finished_at=utcnow())
        session.commit()
        return job.id


def last_errors(job_id: str) -> list[int]:
    from service.core.db import get_sessionmaker
    from service.webhooks import repository

    with get_sessionmaker()() as session:
        return [len(d.last_error or "") for d in repository.of_job(session, job_id)]


def delivery_round(kind: str, size: int) -> dict[str, Any]:
    """One delivery round of a job's two notifications to a `kind` peer."""
    from service.core.settings import get_settings
    from worker.chores import webhooks

    process, url = start_peer(kind, size)
    try:
        job_id = job_with_notifications(f"{url}/hook")
        before = reset_peak()
        started = time.perf_counter()
        webhooks.deliver_due(get_settings())
        seconds = time.perf_counter() - started
        growth = _kib("VmHWM") * 1024 - before
    finally:
        process.terminate()
    return {"growth": growth, "seconds": seconds, "kept": max(last_errors(job_id))}


def mlflow_case(size: int) -> dict[str, Any]:
    from service.jobs.results import JobResult, Metrics
    from service.jobs.schemas import JobSpec
    from worker.pipeline import tracking

    process, url = start_peer("mlflow", size)
    spec = JobSpec.model_validate(
        {
            "model_id": "m",
            "dataset_id": "d",
            "target": {"macs": 0.5},
            "mlflow": {"tracking_uri": url, "experiment": "bench"},
        }
    )
    result = JobResult(
        before=Metrics(loss=1.0),
        after_pruning=Metrics(loss=1.5),
        after_finetune=None,
        params_before=2,
        params_after=1,
        macs_before=2,
        macs_after=1,
        target_met=True,
        sparsity=None,
        example_inputs={},
        config_updates={},
        widths={},
        steps=[],
        evaluated_on="calibration",
        micro_batch_rows=1,
        exports={},
        seconds={},
    )
    try:
        before = reset_peak()
        started = time.perf_counter()
        logged = tracking.log_job(spec, result, [])
        seconds = time.perf_counter() - started
        growth = _kib("VmHWM") * 1024 - before
    finally:
        process.terminate()
    return {"growth": growth, "seconds": seconds, "kept": len(str(logged))}


def trickle_case() -> dict[str, Any]:
    from service.core.settings import get_settings

    os.environ["APOPTOSIS_WEBHOOK_TIMEOUT_SECONDS"] = "2"
    get_settings.cache_clear()
    try:
        return delivery_round("trickle", 120)
    finally:
        del os.environ["APOPTOSIS_WEBHOOK_TIMEOUT_SECONDS"]
        get_settings.cache_clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=200, help="size of the hostile replies")
    parser.add_argument("--skip-trickle", action="store_true")
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="hostile-replies-")
    os.environ["APOPTOSIS_HOME"] = home
    os.environ["APOPTOSIS_WEBHOOK_ALLOW"] = '["127.0.0.1"]'
    from service.cli import migrate
    from service.core.settings import get_settings

    migrate.upgrade(get_settings().resolved_database_url())
    # imported before the first case, so that no case counts the imports' memory

    cases = {
        f"webhook receiver answers 500 + {args.mib} MiB": lambda: delivery_round(
            "webhook", args.mib * MIB
        ),
        f"tracking server answers 200 + {args.mib} MiB": lambda: mlflow_case(args.mib * MIB),
    }
    if not args.skip_trickle:
        cases["receiver trickles 1 B / 0.5 s (deadline 2 s)"] = trickle_case
    print("| case | peak RSS growth | seconds | error text kept |")
    print("|---|---:|---:|---:|")
    for name, run in cases.items():
        measured = run()
        growth = measured["growth"] / MIB
        verdict = "" if growth < TARGET_MIB else " (over target)"
        print(
            f"| {name} | {growth:.1f} MiB{verdict} | {measured['seconds']:.1f} | "
            f"{measured['kept']} chars |"
        )


if __name__ == "__main__":
    main()
