"""Byte-level factories for uploads: valid Hugging Face archives without torch."""

import io
import json
import zipfile


def safetensors_bytes(data: bytes, *, lie: int = 0) -> bytes:
    """One uint8 tensor holding `data`; `lie` shifts the end offset the header claims."""
    header = json.dumps(
        {"weight": {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data) + lie]}}
    ).encode()
    return len(header).to_bytes(8, "little") + header + data


def hf_archive(
    data: bytes,
    *,
    config: object | None = None,
    weights_name: str = "model.safetensors",
    weights: bytes | None = None,
) -> bytes:
    """A zip of config.json and safetensors weights, stored uncompressed."""
    config = {"architectures": ["BertModel"], "model_type": "bert"} if config is None else config
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as bundle:
        bundle.writestr("config.json", json.dumps(config))
        bundle.writestr(weights_name, safetensors_bytes(data) if weights is None else weights)
    return buffer.getvalue()


def hf_archive_of_size(total: int) -> bytes:
    """A valid archive of exactly `total` bytes (the tensor absorbs the difference)."""
    size = max(0, total - len(hf_archive(b"")))
    for _ in range(10):  # the header's digits grow with the size: converge in a few rounds
        archive = hf_archive(b"\1" * size)
        if len(archive) == total:
            return archive
        size += total - len(archive)
    raise AssertionError(f"cannot build an archive of exactly {total} bytes")
