"""docs/quickstart.md as a reader runs it: every block marked `test`, in order, in one shell,
from a folder laid out like a clone (its .venv and examples/), against `apoptosis up`."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.integration.services import embedded_service

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```(bash|python) test\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def script(markdown: str) -> str:
    """The marked blocks as one bash script; python blocks run with the venv's python."""
    parts = ["set -euo pipefail"]
    for language, body in BLOCK.findall(markdown):
        parts.append(body if language == "bash" else f"python - <<'PYTHON'\n{body}PYTHON\n")
    return "\n".join(parts)


def test_the_quickstart_blocks_are_found() -> None:
    blocks = BLOCK.findall((ROOT / "docs" / "quickstart.md").read_text())
    assert [language for language, _ in blocks] == ["bash"] * 4 + ["python", "bash"]


@pytest.mark.slow  # four pruning jobs, as a reader runs them
def test_the_quickstart_runs_as_written(tmp_path: Path) -> None:
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    with embedded_service(tmp_path) as (url, _):  # the blocks read var/api-key, as a reader
        done = subprocess.run(
            ["bash", "-c", script((ROOT / "docs" / "quickstart.md").read_text())],
            cwd=tmp_path,
            env={**os.environ, "APOPTOSIS_URL": url, "APOPTOSIS_API_KEY": ""},
            capture_output=True,
            text=True,
            timeout=600,
        )

    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    for artifact in ("model-hf.zip", "curl-model-hf.zip", "sdk/model-hf.zip", "local/model-hf.zip"):
        assert (tmp_path / "pruned" / artifact).stat().st_size > 10_000, artifact
    assert "intermediate size now" in done.stdout
    kept = re.search(r"MACs kept (\d\.\d+), accuracy (\d\.\d+)", done.stdout)
    assert kept is not None and float(kept.group(1)) <= 0.5
