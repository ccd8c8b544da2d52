"""Hostile archives are refused and nothing lands outside the destination."""

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from service.core.archives import UnsafeArchive, extract


def _zip(path: Path, entries: dict[str, bytes], *, link: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for name, data in entries.items():
            bundle.writestr(name, data)
        if link is not None:
            info = zipfile.ZipInfo("link")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            bundle.writestr(info, link)
    return path


def _outside(tmp_path: Path) -> set[Path]:
    return {p for p in tmp_path.rglob("*") if "dest" not in p.parts}


def test_a_plain_zip_and_tar_extract(tmp_path: Path) -> None:
    extract(
        _zip(tmp_path / "a.zip", {"config.json": b"{}", "sub/w.bin": b"x" * 10}), tmp_path / "dest"
    )
    assert (tmp_path / "dest" / "sub" / "w.bin").read_bytes() == b"x" * 10
    with tarfile.open(tmp_path / "a.tar.gz", "w:gz") as bundle:
        info = tarfile.TarInfo("config.json")
        info.size = 2
        bundle.addfile(info, io.BytesIO(b"{}"))
    extract(tmp_path / "a.tar.gz", tmp_path / "dest2")
    assert (tmp_path / "dest2" / "config.json").read_bytes() == b"{}"


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("../evil.txt", "path_traversal"),
        ("a/../../evil.txt", "path_traversal"),
        ("/etc/evil.txt", "path_traversal"),
        ("C:/evil.txt", "path_traversal"),
        ("..\\evil.txt", "path_traversal"),
    ],
)
def test_traversal_and_absolute_paths_are_refused(tmp_path: Path, name: str, code: str) -> None:
    archive = _zip(tmp_path / "a.zip", {name: b"evil"})
    before = _outside(tmp_path)

    with pytest.raises(UnsafeArchive) as error:
        extract(archive, tmp_path / "dest")

    assert error.value.code == code
    assert _outside(tmp_path) == before
    assert not list((tmp_path / "dest").rglob("*evil*"))


def test_links_are_refused_in_zip_and_tar(tmp_path: Path) -> None:
    with pytest.raises(UnsafeArchive) as error:
        extract(_zip(tmp_path / "a.zip", {}, link="/etc/passwd"), tmp_path / "dest")
    assert error.value.code == "link_in_archive"

    with tarfile.open(tmp_path / "a.tar", "w") as bundle:
        info = tarfile.TarInfo("link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        bundle.addfile(info)
    with pytest.raises(UnsafeArchive) as error:
        extract(tmp_path / "a.tar", tmp_path / "dest2")
    assert error.value.code == "link_in_archive"


def test_a_zip_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "bomb.zip", {"zeros": b"\0" * (50 * 1024 * 1024)})
    assert archive.stat().st_size < 200_000

    with pytest.raises(UnsafeArchive) as error:
        extract(archive, tmp_path / "dest")

    assert error.value.code == "zip_bomb"
    assert not (tmp_path / "dest" / "zeros").exists()


def test_caps_on_size_and_count(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "a.zip", {f"f{i}": b"x" for i in range(5)})
    with pytest.raises(UnsafeArchive) as error:
        extract(archive, tmp_path / "d1", max_files=4)
    assert error.value.code == "too_many_files"
    with pytest.raises(UnsafeArchive) as error:
        extract(archive, tmp_path / "d2", max_total=4)
    assert error.value.code == "archive_too_large"


def test_not_an_archive_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"not an archive")
    with pytest.raises(UnsafeArchive) as error:
        extract(tmp_path / "x.bin", tmp_path / "dest")
    assert error.value.code == "invalid_archive"
