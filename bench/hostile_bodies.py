"""Hostile request bodies: the API's peak memory while it is sent bodies it should not hold.

The API runs as in `api_load.py` (uvicorn, one process, embedded settings in a temporary
folder, the default upload cap), with a tenant and its key. Its peak resident set size is
VmHWM from /proc/<pid>/status, reset before each case (`echo 5 > /proc/<pid>/clear_refs`,
Linux ≥ 4.0); growth = that peak − VmRSS just before the case.

1. Every operation of the OpenAPI document (path parameters: an id that does not exist) is sent
   a `--mib` body, as JSON (`application/json`, a string of `a`s) and as multipart (a `format`
   field and a file part of zeros), each without a key and with the tenant's key, each with a
   Content-Length and chunked. The client stops sending once the answer arrives (what the API
   does with bytes it never asked for is not its memory).
2. A chunked upload to POST /v1/models and /v1/datasets of `--fields` text fields of 64,000
   bytes each (under the old 64 KiB per-field cap), then a file part.

Target: growth < 100 MiB in every case. Prints markdown tables; run with the API's venv:

    .venv/bin/python -m bench.hostile_bodies
"""

from __future__ import annotations

import argparse
import os
import re
import select
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.api_load import Fixture, start_server, stop_server
from service.core.settings import Settings

MIB = 1024 * 1024
TARGET_MIB = 100.0
BOUNDARY = "hostile-bench-boundary"
FIELD_BYTES = 64_000
DEFAULT_UPLOAD_CAP: int = Settings.model_fields["max_upload_bytes"].default


@dataclass(frozen=True)
class Case:
    method: str
    path: str
    content_type: str  # "json" or "multipart"
    keyed: bool
    chunked: bool


@dataclass(frozen=True)
class Outcome:
    status: str  # the answer's status code, or how the connection ended without one
    growth_mib: float
    seconds: float


# --- memory --------------------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


def reset_peak(pid: int) -> int:
    """Reset the process's VmHWM to its current RSS; return that RSS in bytes."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status_kib(pid, "VmRSS") * 1024


def peak(pid: int) -> int:
    return _status_kib(pid, "VmHWM") * 1024


# --- bodies --------------------------------------------------------------------------------


def json_body(size: int) -> Iterator[bytes]:
    yield b'{"spec": "'
    yield from _filled(size, b"a")
    yield b'"}'


def multipart_body(size: int) -> Iterator[bytes]:
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="format"\r\n\r\nhf\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="m.zip"\r\n'
        "Content-Type: application/zip\r\n\r\n"
    ).encode()
    yield from _filled(size, b"\0")
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def many_fields_body(count: int) -> Iterator[bytes]:
    value = b"x" * FIELD_BYTES
    for number in range(count):
        head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="note{number}"\r\n\r\n'
        yield head.encode() + value + b"\r\n"
    yield from multipart_body(1024)


def _filled(size: int, byte: bytes) -> Iterator[bytes]:
    block = byte * MIB  # one buffer, sent again and again: never the body in memory
    for start in range(0, size, MIB):
        yield block if size - start >= MIB else block[: size - start]


# --- one request over a raw socket ---------------------------------------------------------


def send(fixture: Fixture, head: str, body: Iterator[bytes], chunked: bool) -> str:
    """Send `head` and `body` (framed chunked, or as is) until the API answers or hangs up;
    return the answer's status code, or how the connection ended."""
    host, port = fixture.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.setblocking(False)
        pending, answer, sent_all = memoryview(head.encode()), b"", False
        frames = _framed(body) if chunked else body
        while True:
            writers = [] if sent_all else [connection]
            readable, writable, _ = select.select([connection], writers, [], 60)
            if not readable and not writable:
                return "timeout"
            if readable:  # the answer (a status line is enough), or a hang-up
                try:
                    received = connection.recv(65536)
                except ConnectionResetError:
                    return "reset"
                answer += received
                if not received or b"\r\n" in answer:
                    return _status(answer) or ("closed" if not received else "malformed")
                continue
            if not pending:
                chunk = next(frames, None)
                if chunk is None:
                    sent_all = True
                    continue
                pending = memoryview(chunk)
            try:
                pending = pending[connection.send(pending) :]
            except (BrokenPipeError, ConnectionResetError):
                return "reset"


def _framed(body: Iterator[bytes]) -> Iterator[bytes]:
    for chunk in body:
        yield f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    yield b"0\r\n\r\n"


def _status(answer: bytes) -> str | None:
    match = re.match(rb"HTTP/1\.1 (\d{3})", answer)
    return match.group(1).decode() if match else None


def request_head(fixture: Fixture, case: Case, length: int) -> str:
    content_type = (
        "application/json"
        if case.content_type == "json"
        else f"multipart/form-data; boundary={BOUNDARY}"
    )
    lines = [f"{case.method} {case.path} HTTP/1.1", "Host: 127.0.0.1"]
    lines.append(f"Content-Type: {content_type}")
    if case.keyed:
        lines.append(f"Authorization: Bearer {fixture.key}")
    lines.append("Transfer-Encoding: chunked" if case.chunked else f"Content-Length: {length}")
    return "\r\n".join(lines) + "\r\n\r\n"


def measure(fixture: Fixture, case: Case, body: Iterator[bytes], length: int) -> Outcome:
    before = reset_peak(fixture.server.pid)
    started = time.perf_counter()
    status = send(fixture, request_head(fixture, case, length), body, case.chunked)
    seconds = time.perf_counter() - started
    return Outcome(status, (peak(fixture.server.pid) - before) / MIB, seconds)


# --- the cases -----------------------------------------------------------------------------


def operations(fixture: Fixture) -> list[tuple[str, str]]:
    document = httpx.get(f"{fixture.url}/openapi.json", timeout=10).json()
    return [
        (method.upper(), re.sub(r"\{[^}]+\}", "0" * 32, path))
        for path, methods in document["paths"].items()
        for method in methods
    ]


def every_route(fixture: Fixture, size: int) -> list[tuple[Case, Outcome]]:
    results = []
    for method, path in operations(fixture):
        for content_type in ("json", "multipart"):
            for keyed in (False, True):
                for chunked in (False, True):
                    case = Case(method, path, content_type, keyed, chunked)
                    if content_type == "json":
                        body, length = json_body(size), size + len(b'{"spec": ""}')
                    else:
                        body, length = multipart_body(size), _length(multipart_body(0)) + size
                    results.append((case, measure(fixture, case, body, length)))
    return results


def many_fields(fixture: Fixture, count: int) -> list[tuple[Case, Outcome]]:
    cases = [Case("POST", path, "multipart", True, True) for path in ("/v1/models", "/v1/datasets")]
    return [(case, measure(fixture, case, many_fields_body(count), 0)) for case in cases]


def _length(body: Iterator[bytes]) -> int:
    return sum(len(chunk) for chunk in body)


# --- report --------------------------------------------------------------------------------

COLUMNS = [(keyed, chunked) for keyed in (False, True) for chunked in (False, True)]


def route_table(results: list[tuple[Case, Outcome]]) -> str:
    """One row per operation and content type; cells: status, RSS growth (MiB)."""
    cells: dict[tuple[str, str, str], dict[tuple[bool, bool], Outcome]] = {}
    for case, outcome in results:
        row = (case.method, case.path, case.content_type)
        cells.setdefault(row, {})[(case.keyed, case.chunked)] = outcome
    headers = ["operation", "body"] + [
        f"{'key' if keyed else 'no key'}, {'chunked' if chunked else 'length'}"
        for keyed, chunked in COLUMNS
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for (method, path, content_type), outcomes in cells.items():
        shown = [f"{o.status}, {o.growth_mib:+.1f}" for o in (outcomes[c] for c in COLUMNS)]
        lines.append(f"| {method} {path} | {content_type} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def fields_table(results: list[tuple[Case, Outcome]], count: int) -> str:
    lines = ["| upload | status | RSS growth | time |", "|---|---|---|---|"]
    for case, outcome in results:
        lines.append(
            f"| POST {case.path}, {count} fields × {FIELD_BYTES} B, chunked | {outcome.status} "
            f"| {outcome.growth_mib:+.1f} MiB | {outcome.seconds:.2f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=200, help="size of each hostile body")
    parser.add_argument("--fields", type=int, default=3000, help="text fields in one upload")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="apoptosis-hostile-"))
    try:
        fixture = start_server(folder, max_upload_bytes=DEFAULT_UPLOAD_CAP)
        try:
            routes = every_route(fixture, args.mib * MIB)
            fields = many_fields(fixture, args.fields)
        finally:
            stop_server(fixture.server)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    worst = max(outcome.growth_mib for _, outcome in routes + fields)
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"Hostile bodies: {args.mib} MiB each; {os.cpu_count()} CPUs, load average {load}\n")
    print("The API's answer and its peak RSS growth (MiB), per operation and body:\n")
    print(route_table(routes))
    print()
    print(fields_table(fields, args.fields))
    verdict = "met" if worst < TARGET_MIB else "MISSED"
    print(f"\nLargest growth: {worst:.1f} MiB (target < {TARGET_MIB:.0f} MiB: {verdict})")


if __name__ == "__main__":
    main()
