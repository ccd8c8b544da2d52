"""Running the real thing for integration tests: processes, ports, Postgres and Redis."""

import os
import re
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import torch
import transformers
from safetensors.torch import save_file

POSTGRES_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
REDIS_START = (
    "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save '' "
    "--appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log"
)


def until(condition: Callable[[], Any], seconds: float, what: str, every: float = 0.1) -> Any:
    """Poll `condition` until it returns something truthy (returned), or fail naming `what`."""
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {seconds:g} s: {what}"
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_listening(port: int, process: subprocess.Popen[Any], seconds: float = 30) -> None:
    """Until `process` accepts connections on 127.0.0.1:`port`; fails if it exits first."""

    def listening() -> bool:
        assert process.poll() is None, f"it exited ({process.returncode}) before binding {port}"
        return _answers(port)

    until(listening, seconds, f"a process listening on port {port}", every=0.05)


def ensure_server(port: int, start_command: str) -> None:
    """Start a local server the machine provides if it does not answer (CI starts none)."""
    if _answers(port):
        return
    subprocess.run(start_command, shell=True, check=False, capture_output=True)
    deadline = time.monotonic() + 30
    while not _answers(port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing answers on 127.0.0.1:{port} after: {start_command}")
        time.sleep(0.5)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty Postgres database for one test module, dropped afterwards."""
    import psycopg

    ensure_server(5432, POSTGRES_START)
    name = f"apoptosis_test_{uuid.uuid4().hex[:8]}"
    admin = "postgresql://postgres@127.0.0.1:5432/test"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# Two shared cores: one torch thread per process a test starts. A worker sets its own count (it
# would take both cores, overriding OMP_NUM_THREADS), and torch's threads spin-wait for each
# other, so beside another busy process every parallel step waits for a descheduled one.
ONE_THREAD_ENV = {"APOPTOSIS_WORKER_THREADS": "1", "OMP_NUM_THREADS": "1"}


def apoptosis(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`apoptosis ARGS` as a child process with one torch thread, `env` over the test's own."""
    command = [sys.executable, "-c", "from service.cli.main import main; main()", *args]
    with log.open("ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            command,
            env={**os.environ, **ONE_THREAD_ENV, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_healthy(
    url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited early:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the service did not become healthy:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


def bert_upload(
    directory: Path, *, hidden: int = 32, layers: int = 2, intermediate: int = 256
) -> tuple[Path, Path]:
    """A small BERT (FFN-heavy, so half its MACs can go) as an hf zip, and a tensors dataset."""
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=intermediate,
        max_position_embeddings=64,
    )
    config.num_labels = 3
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    model_dir = directory / "bert"
    model.save_pretrained(model_dir)
    archive = directory / "bert.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for file in model_dir.iterdir():
            bundle.write(file, file.name)
    generator = torch.Generator().manual_seed(0)
    data = directory / "data.safetensors"
    save_file(
        {
            "input_ids": torch.randint(0, 64, (256, 16), generator=generator),
            "labels": torch.randint(0, 3, (256,), generator=generator),
        },
        str(data),
    )
    return archive, data


@contextmanager
def embedded_service(work: Path, **env: str) -> Iterator[tuple[str, str]]:
    """`apoptosis up` on a free port with its home under `work` (extra `APOPTOSIS_…` settings
    in `env`): its URL and the API key it printed, until the block ends."""
    port = free_port()
    log = work / "up.log"
    home = str(work / "var")
    process = apoptosis(
        "up", "--port", str(port), "--home", home, env={"APOPTOSIS_API_KEY": "", **env}, log=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log)
        yield url, printed_key(log)
    finally:
        stop(process)


def printed_key(log: Path) -> str:
    """The API key `apoptosis up` printed into `log`."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = re.search(r"API key: (\S+)", log.read_text())
        if found:
            return found.group(1)
        time.sleep(0.2)
    raise AssertionError(f"`apoptosis up` printed no API key:\n{log.read_text()}")
