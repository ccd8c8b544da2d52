"""Safe extraction of uploaded archives (zip, tar.gz): nothing lands outside the destination.

Refused: absolute paths, `..`, links and special files, more than MAX_FILES entries, more than
MAX_TOTAL_BYTES unpacked, and entries whose compression ratio marks a zip bomb.
"""

import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

MAX_FILES = 2_000
MAX_TOTAL_BYTES = 20 * 1024**3
MAX_RATIO = 200  # a model's weights compress ~1.1×; text ~10×; bombs reach 1000×
COPY_CHUNK = 1 << 20


class UnsafeArchive(ValueError):
    """The archive is malformed or hostile; `code` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _safe_name(name: str) -> PurePosixPath:
    if name.startswith(("/", "\\")) or name[1:2] == ":":
        raise UnsafeArchive("path_traversal", f"archive entry {name!r} has an absolute path")
    path = PurePosixPath(name)
    if ".." in path.parts or "\\" in name:
        raise UnsafeArchive("path_traversal", f"archive entry {name!r} leaves the archive")
    return path


def extract(
    archive: Path,
    destination: Path,
    *,
    max_total: int = MAX_TOTAL_BYTES,
    max_files: int = MAX_FILES,
) -> None:
    """Extract `archive` (zip or tar, any compression tarfile reads) into `destination`."""
    destination.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, destination, max_total, max_files)
    elif tarfile.is_tarfile(archive):
        _extract_tar(archive, destination, max_total, max_files)
    else:
        raise UnsafeArchive("invalid_archive", "the upload is neither a zip nor a tar archive")


def _extract_zip(archive: Path, destination: Path, max_total: int, max_files: int) -> None:
    with zipfile.ZipFile(archive) as bundle:
        entries = bundle.infolist()
        _check_counts(len(entries), sum(e.file_size for e in entries), max_total, max_files)
        for entry in entries:
            target = destination / _safe_name(entry.filename)
            if stat.S_ISLNK(entry.external_attr >> 16):
                raise UnsafeArchive(
                    "link_in_archive", f"archive entry {entry.filename!r} is a link"
                )
            if entry.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if entry.compress_size and entry.file_size / entry.compress_size > MAX_RATIO:
                raise UnsafeArchive(
                    "zip_bomb",
                    f"archive entry {entry.filename!r} expands "
                    f"{entry.file_size // entry.compress_size}× (a zip bomb?)",
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            _copy_limited(bundle.open(entry), target, entry.file_size)


def _extract_tar(archive: Path, destination: Path, max_total: int, max_files: int) -> None:
    with tarfile.open(archive) as bundle:
        members = bundle.getmembers()
        _check_counts(len(members), sum(m.size for m in members), max_total, max_files)
        for member in members:
            target = destination / _safe_name(member.name)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                source = bundle.extractfile(member)
                if source is None:
                    raise UnsafeArchive("invalid_archive", f"cannot read {member.name!r}")
                target.parent.mkdir(parents=True, exist_ok=True)
                _copy_limited(source, target, member.size)
            else:
                raise UnsafeArchive(
                    "link_in_archive", f"archive entry {member.name!r} is a link or special file"
                )


def _check_counts(files: int, total: int, max_total: int, max_files: int) -> None:
    if files > max_files:
        raise UnsafeArchive(
            "too_many_files", f"the archive holds {files} entries (max {max_files})"
        )
    if total > max_total:
        raise UnsafeArchive(
            "archive_too_large", f"the archive unpacks to {total} bytes (max {max_total})"
        )


def _copy_limited(source: object, target: Path, declared: int) -> None:
    """Copy at most the declared size: a header that lies about it cannot flood the disk."""
    written = 0
    with source as stream, target.open("wb") as out:  # type: ignore[attr-defined]
        while chunk := stream.read(COPY_CHUNK):
            written += len(chunk)
            if written > declared:
                raise UnsafeArchive("zip_bomb", f"{target.name} is larger than its header says")
            out.write(chunk)
