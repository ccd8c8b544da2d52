"""Hostile model uploads: refused with a 422 and a specific code, nothing stored, server fine."""

import io
import json
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.core.settings import Settings
from tests.service.factories import Caller, hf_archive, safetensors_bytes
from tests.service.support import leftover_files, problem


def _zip(
    entries: dict[str, bytes], *, compression: int = zipfile.ZIP_STORED, links: tuple[str, ...] = ()
) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as bundle:
        for name, data in entries.items():
            bundle.writestr(name, data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            bundle.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def _tar_with_symlink() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as bundle:
        config = json.dumps({"architectures": ["BertModel"]}).encode()
        info = tarfile.TarInfo("config.json")
        info.size = len(config)
        bundle.addfile(info, io.BytesIO(config))
        link = tarfile.TarInfo("model.safetensors")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/shadow"
        bundle.addfile(link)
    return buffer.getvalue()


def _damaged_zip(how: str) -> bytes:
    """A sound archive (config.json, then weights), damaged in the weights entry's bytes or in
    both of its headers (local and central), the way a hostile or broken client would send it."""
    weights = safetensors_bytes(bytes(range(256)) * 32)  # long enough to corrupt its body
    compression = zipfile.ZIP_DEFLATED if how == "corrupt deflate data" else zipfile.ZIP_STORED
    data = bytearray(
        _zip({"config.json": CONFIG, "model.safetensors": weights}, compression=compression)
    )
    local = data.rfind(b"PK\x03\x04")  # the weights entry's local header
    central = data.rfind(b"PK\x01\x02")  # and its central directory record
    if how == "bad CRC":
        data[local + 30 + len("model.safetensors") + 4000] ^= 0xFF  # in the tensor bytes
    elif how == "corrupt deflate data":
        start = local + 30 + len("model.safetensors")
        data[start : start + 16] = b"\xff" * 16
    elif how == "unsupported method":
        data[local + 8 : local + 10] = data[central + 10 : central + 12] = (99).to_bytes(
            2, "little"
        )
    elif how == "encrypted flag":
        data[local + 6] |= 1
        data[central + 8] |= 1
    return bytes(data)


VALID_WEIGHTS = safetensors_bytes(b"\0" * 64)
CONFIG = json.dumps({"architectures": ["BertModel"]}).encode()
HOSTILE: dict[str, tuple[Callable[[], bytes], str, str]] = {
    "path traversal": (
        lambda: _zip({"config.json": CONFIG, "../../evil.safetensors": VALID_WEIGHTS}),
        "hf",
        "path_traversal",
    ),
    "absolute path": (
        lambda: _zip({"config.json": CONFIG, "/tmp/evil.safetensors": VALID_WEIGHTS}),
        "hf",
        "path_traversal",
    ),
    "symlink in zip": (
        lambda: _zip({"config.json": CONFIG}, links=("model.safetensors",)),
        "hf",
        "link_in_archive",
    ),
    "symlink in tar": (_tar_with_symlink, "hf", "link_in_archive"),
    "zip bomb": (
        lambda: _zip(
            {"config.json": CONFIG, "model.safetensors": b"\0" * 20_000_000},
            compression=zipfile.ZIP_DEFLATED,
        ),
        "hf",
        "zip_bomb",
    ),
    "pickle that would run code": (
        lambda: b"\x80\x04cos\nsystem\n(S'touch /tmp/pwned'\ntR.",
        "torch_pickle",
        "unsafe_format",
    ),
    "pickled .bin weights": (
        lambda: hf_archive(
            b"", weights_name="pytorch_model.bin", weights=b"\x80\x04cos\nsystem\n."
        ),
        "hf",
        "unsafe_format",
    ),
    "truncated safetensors": (
        lambda: hf_archive(b"", weights=safetensors_bytes(b"x" * 100)[:-10]),
        "hf",
        "invalid_safetensors",
    ),
    "lying safetensors header": (
        lambda: hf_archive(b"", weights=safetensors_bytes(b"x" * 64, lie=1000)),
        "hf",
        "invalid_safetensors",
    ),
    "config naming no class": (
        lambda: hf_archive(b"x", config={"architectures": ["os.system('x')"]}),
        "hf",
        "invalid_config",
    ),
    "config naming a class outside transformers": (
        lambda: hf_archive(b"x", config={"architectures": ["EvilModel"]}),
        "hf",
        "unknown_architecture",
    ),
    "config whose class is code in the upload (auto_map)": (
        lambda: hf_archive(
            b"x",
            config={
                "architectures": ["BertModel"],
                "model_type": "bert",
                "auto_map": {"AutoModel": "modeling_evil.EvilModel"},
            },
        ),
        "hf",
        "remote_code",
    ),
    "config that is not JSON": (
        lambda: _zip({"config.json": b"{nope", "model.safetensors": VALID_WEIGHTS}),
        "hf",
        "invalid_config",
    ),
    "no config": (lambda: _zip({"model.safetensors": VALID_WEIGHTS}), "hf", "missing_config"),
    "a file of zeros (an empty tar to tarfile)": (lambda: bytes(4096), "hf", "invalid_archive"),
    "empty file": (lambda: b"", "hf", "empty_file"),
    "safetensors header nesting past recursion": (
        lambda: hf_archive(b"", weights=len(b"[" * 100_000).to_bytes(8, "little") + b"[" * 100_000),
        "hf",
        "invalid_safetensors",
    ),
    "zip with a bad CRC": (lambda: _damaged_zip("bad CRC"), "hf", "invalid_archive"),
    "zip with corrupt deflate data": (
        lambda: _damaged_zip("corrupt deflate data"),
        "hf",
        "invalid_archive",
    ),
    "zip with an unsupported method": (
        lambda: _damaged_zip("unsupported method"),
        "hf",
        "invalid_archive",
    ),
    "zip with the encrypted flag": (
        lambda: _damaged_zip("encrypted flag"),
        "hf",
        "invalid_archive",
    ),
    "wrong format for the content": (lambda: VALID_WEIGHTS, "hf", "invalid_archive"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_upload_is_refused_and_leaves_nothing(
    client: TestClient, alice: Caller, settings: Settings, case: str
) -> None:
    build, model_format, code = HOSTILE[case]

    response = client.post(
        "/v1/models",
        headers=alice.headers,
        data={"format": model_format},
        files={"file": ("upload.zip", build(), "application/octet-stream")},
    )

    problem(response, 422, code)
    assert leftover_files(settings) == []
    assert not Path("/tmp/pwned").exists()
    assert client.get("/healthz").status_code == 200
    assert client.get("/v1/models", headers=alice.headers).json()["items"] == []


def test_a_sound_archive_in_a_top_level_folder_is_accepted(
    client: TestClient, alice: Caller
) -> None:
    content = _zip({"bert/config.json": CONFIG, "bert/model.safetensors": VALID_WEIGHTS})

    response = client.post(
        "/v1/models",
        headers=alice.headers,
        data={"format": "hf"},
        files={"file": ("bert.zip", content, "application/zip")},
    )

    assert response.status_code == 201, response.text
