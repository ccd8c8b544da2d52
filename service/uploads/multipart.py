"""Streaming multipart uploads: the file part goes to a temporary file chunk by chunk, counted as
it arrives, and the request fails with 413 the moment it passes the cap. The other parts are
held in memory, so their number and their bytes in all are capped too, and checked part by part."""

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import (
    DEFAULT_MAX_HEADER_COUNT,
    DEFAULT_MAX_HEADER_SIZE,
    MAX_BOUNDARY_LENGTH,
    MultipartParser,
    parse_options_header,
)

from service.core.problems import ProblemError

MAX_FIELDS = 8  # parts besides the file; only 'format' and 'name' mean anything
MAX_FIELDS_BYTES = 64 * 1024  # their values, all together
# One part's framing: its boundary line (CRLF "--" boundary CRLF) and its header block, as the
# parser caps them (so many header lines of so many bytes, then a blank line).
_PART_OVERHEAD = (
    MAX_BOUNDARY_LENGTH + 6 + DEFAULT_MAX_HEADER_COUNT * (DEFAULT_MAX_HEADER_SIZE + 2) + 2
)
# The most a well-formed form adds to its file: its fields, their parts', the file part's and
# the closing boundary's overhead. The body limit caps an upload's body at the file cap plus this.
FORM_ALLOWANCE = MAX_FIELDS_BYTES + (MAX_FIELDS + 2) * _PART_OVERHEAD
SPOOL_IDLE_SECONDS = 15 * 60  # an upload that sent nothing for this long is abandoned


@dataclass
class Upload:
    path: Path  # temporary file holding the file part; the caller deletes it
    filename: str
    size: int
    fields: dict[str, str] = field(default_factory=dict)


class _Receiver:
    def __init__(self, spool_dir: Path, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.fields: dict[str, str] = {}
        self.field_count = 0
        self.fields_bytes = 0
        self.size = 0
        self.filename = ""
        # closed by receive_upload, which owns the file's whole life
        self.file = tempfile.NamedTemporaryFile(  # noqa: SIM115
            dir=spool_dir, prefix="upload-", delete=False
        )
        self._headers: dict[bytes, bytes] = {}
        self._header_field = b""
        self._header_value = b""
        self._part_name = ""
        self._is_file = False
        self._value = bytearray()

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._append("_header_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._append("_header_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _append(self, attribute: str, data: bytes) -> None:
        setattr(self, attribute, getattr(self, attribute) + data)

    def _part_begin(self) -> None:
        self._headers, self._value = {}, bytearray()

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._part_name = options.get(b"name", b"").decode()
        self._is_file = b"filename" in options and self._part_name == "file"
        if self._is_file:
            if self.filename:
                raise ProblemError(422, "multiple_files", "send exactly one 'file' part")
            self.filename = options[b"filename"].decode(errors="replace") or "upload"
            return
        self.field_count += 1
        if self.field_count > MAX_FIELDS:
            raise ProblemError(
                413,
                "too_many_fields",
                f"the form has more than {MAX_FIELDS} fields; send 'file', 'format' and 'name'",
            )

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._is_file:
            self.size += len(chunk)
            if self.size > self.max_bytes:
                raise upload_too_large(self.max_bytes)
            self.file.write(chunk)
        else:
            self.fields_bytes += len(chunk)
            if self.fields_bytes > MAX_FIELDS_BYTES:
                raise ProblemError(
                    413,
                    "field_too_large",
                    f"form field {self._part_name!r} takes the fields past {MAX_FIELDS_BYTES} "
                    "bytes in all; send only 'format' and 'name' besides the file",
                )
            self._value += chunk

    def _part_end(self) -> None:
        if not self._is_file and self._part_name:
            self.fields[self._part_name] = self._value.decode(errors="replace")


def upload_too_large(max_bytes: int) -> ProblemError:
    """The 413 for an upload over `max_bytes`, from the parser or from the body limit."""
    return ProblemError(
        413, "upload_too_large", f"the upload exceeds the limit of {max_bytes} bytes"
    )


async def receive_upload(request: Request, spool_dir: Path, max_bytes: int) -> Upload:
    """Parse a multipart/form-data request with a `file` part and small text fields. A declared
    length over `max_bytes` + `FORM_ALLOWANCE` never gets here: the body limit refuses it."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise ProblemError(415, "unsupported_media_type", "send the upload as multipart/form-data")
    spool_dir.mkdir(parents=True, exist_ok=True)
    receiver = _Receiver(spool_dir, max_bytes)
    try:
        try:
            parser = MultipartParser(options[b"boundary"], receiver.callbacks())  # type: ignore[arg-type]
            async for chunk in request.stream():
                parser.write(chunk)
            parser.finalize()
        except (FormParserError, UnicodeDecodeError) as error:
            # The parser's own limits (boundary length, header size, header syntax) and part
            # names that are not UTF-8: the client's body is wrong, not the server.
            raise ProblemError(
                400, "malformed_upload", f"the multipart body is malformed: {error}"
            ) from error
    except BaseException:
        receiver.file.close()
        Path(receiver.file.name).unlink(missing_ok=True)
        raise
    receiver.file.close()
    path = Path(receiver.file.name)
    if not receiver.filename:
        path.unlink(missing_ok=True)
        raise ProblemError(422, "missing_file", "the form has no 'file' part")
    return Upload(path, receiver.filename, receiver.size, receiver.fields)


def sweep_spool(spool_dir: Path, idle_seconds: float = SPOOL_IDLE_SECONDS) -> int:
    """Remove spool files no upload has written to for `idle_seconds`: what uploads cut by a
    crash left behind (a live upload writes its file as the bytes arrive). Returns how many."""
    cutoff = time.time() - idle_seconds
    swept = 0
    for path in spool_dir.glob("upload-*"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                swept += 1
        except FileNotFoundError:  # another process finished or swept it meanwhile
            continue
    return swept


def openapi_form(formats: tuple[str, ...]) -> dict[str, Any]:
    """OpenAPI description of the multipart form this module parses by hand."""
    schema = {
        "type": "object",
        "required": ["file", "format"],
        "properties": {
            "file": {"type": "string", "format": "binary"},
            "format": {"type": "string", "enum": list(formats)},
            "name": {"type": "string", "maxLength": 200},
        },
    }
    example = {"file": "(the file's bytes)", "format": formats[0], "name": "my upload"}
    form = {"schema": schema, "example": example}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": form}}}
