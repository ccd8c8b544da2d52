"""Uploaded archives (zip, tar.gz), checked without trusting them: pure Python, no torch, so the
API can refuse a hostile upload at once and the worker re-checks while it extracts.

Refused: absolute paths, `..`, links and special files, more than MAX_FILES entries, more than
MAX_TOTAL_BYTES unpacked, entries whose compression ratio marks a zip bomb, and entries larger
than their header says.
"""

import json
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path, PurePosixPath
from typing import IO

from service.core.errors import CodedError

MAX_FILES = 2_000
MAX_TOTAL_BYTES = 20 * 1024**3
MAX_RATIO = 200  # a model's weights compress ~1.1×; text ~10×; bombs reach 1000×
COPY_CHUNK = 1 << 20
ENCRYPTED = 0x1  # the general-purpose flag bit of an encrypted zip entry
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
ARCHITECTURES = Path(__file__).with_name("transformers_architectures.txt")
TRANSFORMERS_RELEASE = "5.23.0"  # the worker's pin; refresh the list with it
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,200}")


class UnsafeArchive(CodedError, ValueError):
    """The archive is malformed or hostile; `code` says why."""


@dataclass(frozen=True)
class Entry:
    path: PurePosixPath
    size: int
    is_dir: bool
    open: Callable[[], IO[bytes]]


def _safe_name(name: str) -> PurePosixPath:
    if name.startswith(("/", "\\")) or name[1:2] == ":":
        raise UnsafeArchive("path_traversal", f"archive entry {name!r} has an absolute path")
    path = PurePosixPath(name)
    if ".." in path.parts or "\\" in name:
        raise UnsafeArchive("path_traversal", f"archive entry {name!r} leaves the archive")
    return path


@contextmanager
def entries(
    archive: Path, *, max_total: int = MAX_TOTAL_BYTES, max_files: int = MAX_FILES
) -> Iterator[list[Entry]]:
    """The checked entries of a zip, tar or gzip-compressed tar archive.

    The kind is read from magic bytes, not by letting tarfile try every decompressor on the
    whole upload (a gigabyte of zeros is a valid empty tar and takes a minute to find so).
    """
    kind = _kind(archive)
    if kind == "zip" and zipfile.is_zipfile(archive):
        try:
            with zipfile.ZipFile(archive) as bundle:
                yield _zip_entries(bundle, max_total, max_files)
        except (zipfile.BadZipFile, zlib.error, EOFError) as error:  # a CRC, a deflate stream
            raise UnsafeArchive(
                "invalid_archive", f"the zip archive is damaged: {error}"
            ) from error
    elif kind in ("tar", "gz"):
        try:
            with tarfile.open(archive, "r:gz" if kind == "gz" else "r:") as bundle:
                yield _tar_entries(bundle, max_total, max_files)
        except (tarfile.TarError, EOFError, zlib.error) as error:
            raise UnsafeArchive(
                "invalid_archive", f"the tar archive is damaged: {error}"
            ) from error
    else:
        raise UnsafeArchive("invalid_archive", "the upload is neither a zip nor a tar archive")


def _kind(archive: Path) -> str | None:
    with archive.open("rb") as stream:
        head = stream.read(512)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "gz"
    if head[257:262] == b"ustar":
        return "tar"
    return None


def _zip_entries(bundle: zipfile.ZipFile, max_total: int, max_files: int) -> list[Entry]:
    infos = bundle.infolist()
    _check_counts(len(infos), sum(i.file_size for i in infos), max_total, max_files)
    out = []
    for info in infos:
        path = _safe_name(info.filename)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UnsafeArchive("link_in_archive", f"archive entry {info.filename!r} is a link")
        if info.flag_bits & ENCRYPTED:
            raise UnsafeArchive(
                "invalid_archive", f"archive entry {info.filename!r} is encrypted; zip it plainly"
            )
        if info.compress_type not in ZIP_METHODS:
            raise UnsafeArchive(
                "invalid_archive",
                f"archive entry {info.filename!r} uses compression method {info.compress_type}; "
                "use stored or deflate",
            )
        if info.compress_size and info.file_size / info.compress_size > MAX_RATIO:
            raise UnsafeArchive(
                "zip_bomb",
                f"archive entry {info.filename!r} expands "
                f"{info.file_size // info.compress_size}× (a zip bomb?)",
            )
        out.append(Entry(path, info.file_size, info.is_dir(), partial(bundle.open, info)))
    return out


def _tar_entries(bundle: tarfile.TarFile, max_total: int, max_files: int) -> list[Entry]:
    members = bundle.getmembers()
    _check_counts(len(members), sum(m.size for m in members), max_total, max_files)
    out = []
    for member in members:
        path = _safe_name(member.name)
        if not (member.isdir() or member.isfile()):
            raise UnsafeArchive(
                "link_in_archive", f"archive entry {member.name!r} is a link or special file"
            )
        out.append(Entry(path, member.size, member.isdir(), partial(_tar_open, bundle, member)))
    return out


def _tar_open(bundle: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    stream = bundle.extractfile(member)
    if stream is None:
        raise UnsafeArchive("invalid_archive", f"cannot read {member.name!r}")
    return stream


def _check_counts(files: int, total: int, max_total: int, max_files: int) -> None:
    if files > max_files:
        raise UnsafeArchive(
            "too_many_files", f"the archive holds {files} entries (max {max_files})"
        )
    if total > max_total:
        raise UnsafeArchive(
            "archive_too_large", f"the archive unpacks to {total} bytes (max {max_total})"
        )


def extract(
    archive: Path,
    destination: Path,
    *,
    max_total: int = MAX_TOTAL_BYTES,
    max_files: int = MAX_FILES,
) -> None:
    """Extract `archive` into `destination`; nothing is written outside it."""
    destination.mkdir(parents=True, exist_ok=True)
    with entries(archive, max_total=max_total, max_files=max_files) as listing:
        for entry in listing:
            target = destination / entry.path
            if entry.is_dir:
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with entry.open() as source, target.open("wb") as out:
                _copy_limited(source, out, entry)


def _copy_limited(source: IO[bytes], out: IO[bytes], entry: Entry) -> None:
    """Copy at most the declared size: a header that lies about it cannot flood the disk."""
    written = 0
    while chunk := source.read(COPY_CHUNK):
        written += len(chunk)
        if written > entry.size:
            raise UnsafeArchive("zip_bomb", f"{entry.path} is larger than its header says")
        out.write(chunk)


def check_integrity(archive: Path) -> None:
    """Read every entry through, so that a zip's CRCs and a gzip's checksum are verified now
    (`invalid_archive`), not when a worker extracts the upload."""
    with entries(archive) as listing:
        for entry in listing:
            if entry.is_dir:
                continue
            with entry.open() as stream:
                while stream.read(COPY_CHUNK):
                    pass


def check_hf_upload(archive: Path, *, trusted: bool) -> None:
    """A Hugging Face model directory, as far as it can be checked without loading it:
    a sound archive, a config.json naming an architecture, weights in safetensors whose headers
    are consistent (pickled .bin weights only in trusted mode)."""
    with entries(archive) as listing:
        files = {e.path: e for e in listing if not e.is_dir}
        roots = {p.parts[0] for p in files if len(p.parts) > 1}
        base = (
            PurePosixPath(next(iter(roots)))
            if len(roots) == 1 and not any(len(p.parts) == 1 for p in files)
            else PurePosixPath()
        )
        config = files.get(base / "config.json")
        if config is None:
            raise UnsafeArchive("missing_config", "the archive has no config.json at its root")
        _check_config(config)
        weights = [e for p, e in files.items() if p.suffix == ".safetensors"]
        pickled = [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        if pickled and not trusted and not weights:
            raise UnsafeArchive(
                "unsafe_format",
                "pickled weights (.bin) run code when loaded; "
                "save with safe_serialization=True (safetensors)",
            )
        if not weights and not pickled:
            raise UnsafeArchive("missing_weights", "the archive holds no .safetensors weights")
        for entry in weights:
            check_safetensors(entry)
    check_integrity(archive)


def _check_config(entry: Entry) -> None:
    if entry.size > 10 * 1024 * 1024:
        raise UnsafeArchive("invalid_config", "config.json is implausibly large")
    with entry.open() as stream:
        try:
            config = json.loads(stream.read(entry.size + 1))
        except (ValueError, RecursionError) as error:  # RecursionError: nesting beyond Python's
            raise UnsafeArchive(
                "invalid_config", f"config.json is not valid JSON: {error}"
            ) from error
    if isinstance(config, dict) and "auto_map" in config:
        raise UnsafeArchive(
            "remote_code",
            "config.json declares auto_map: the model's class is code inside the upload, which "
            "is never run, so the model pruned would not be yours. Upload a model whose "
            "architectures[0] is a transformers class",
        )
    names = config.get("architectures") if isinstance(config, dict) else None
    if not (
        isinstance(names, list)
        and names
        and isinstance(names[0], str)
        and _IDENTIFIER.fullmatch(names[0])
    ):
        raise UnsafeArchive("invalid_config", "config.json names no architectures[0] class")
    if names[0] not in known_architectures():
        raise UnsafeArchive(
            "unknown_architecture",
            f"{names[0]!r} is not a model class of transformers "
            f"{TRANSFORMERS_RELEASE}; remote code is never run",
        )


@lru_cache
def known_architectures() -> frozenset[str]:
    """Model classes of the pinned transformers release (scripts/refresh_architectures.py)."""
    return frozenset(ARCHITECTURES.read_text().split())


def check_safetensors(entry: Entry) -> None:
    """The header is JSON whose tensors tile the data section exactly: a truncated file or a
    header that lies about offsets is refused before anything is loaded."""
    with entry.open() as stream:
        prefix = stream.read(8)
        if len(prefix) < 8:
            raise UnsafeArchive("invalid_safetensors", f"{entry.path} is truncated")
        header_size = int.from_bytes(prefix, "little")
        if header_size > min(MAX_SAFETENSORS_HEADER, entry.size - 8):
            raise UnsafeArchive("invalid_safetensors", f"{entry.path} has an impossible header")
        try:
            header = json.loads(stream.read(header_size))
        except (ValueError, RecursionError) as error:  # RecursionError: nesting beyond Python's
            raise UnsafeArchive(
                "invalid_safetensors", f"{entry.path} has a header that is not JSON"
            ) from error
    if not isinstance(header, dict):
        raise UnsafeArchive("invalid_safetensors", f"{entry.path} has a malformed header")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise UnsafeArchive("invalid_safetensors", f"{entry.path}: bad offsets for {name!r}")
        spans.append((offsets[0], offsets[1]))
    position = 0
    for start, end in sorted(spans):
        if start != position:
            raise UnsafeArchive(
                "invalid_safetensors", f"{entry.path}: tensors overlap or leave gaps in the data"
            )
        position = end
    if position != entry.size - 8 - header_size:
        raise UnsafeArchive(
            "invalid_safetensors",
            f"{entry.path}: the header describes {position} bytes of data, the "
            f"file holds {entry.size - 8 - header_size} (truncated or lying)",
        )
