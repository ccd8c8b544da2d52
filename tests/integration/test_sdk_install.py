"""`pip install apoptosis` as an SDK user runs it: a fresh virtual environment with the base
install only, which brings no server and no torch, and whose SDK and CLI drive a running
service. A server package that creeps back into the base dependencies, or into the SDK's or
the CLI's imports, fails here."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.services import bert_upload, embedded_service

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# What the server and the worker bring: none of it belongs to the SDK's install.
SERVER_AND_WORKER = {
    "fastapi",
    "uvicorn",
    "sqlalchemy",
    "alembic",
    "celery",
    "redis",
    "psycopg",
    "boto3",
    "torch",
    "transformers",
}
# The commands that run the service, and the extras each one names when they are missing.
SERVICE_COMMANDS = [
    (["up"], "server,worker"),
    (["worker"], "server,worker"),
    (["api"], "server"),
    (["migrate"], "server"),
    (["keys", "list"], "server"),
]
# The SDK's whole journey from the base install: upload, validation, a job followed over its
# event stream, the download. Small enough to finish in seconds.
SDK_SCRIPT = """
import json, sys
from pathlib import Path
from service.client import Client

url, key, archive, data, output = sys.argv[1:]
with Client(url, key) as client:
    result = client.prune(
        Path(archive),
        Path(data),
        target={"macs": 0.7},
        output=Path(output),
        schedule={"steps": 2},
        calibration={"batches": 1, "batch_size": 16},
        outputs=["safetensors"],
    )
    models = [model.id for model in client.models().items]
print(json.dumps({"job": result.job.id, "state": result.job.state, "model": result.model.id,
                  "models": models, "files": [str(file) for file in result.files]}))
"""


@pytest.fixture(scope="module")
def base_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `bin` folder of a fresh venv holding `pip install apoptosis`, built from a copy of
    this checkout: the build writes `build/` and an egg-info beside the sources it is given."""
    work = tmp_path_factory.mktemp("sdk-install")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    for package in ("service", "worker"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = [str(venv / "bin" / "pip"), "install", "--quiet", str(source)]
    subprocess.run(install, check=True, timeout=300, env=base_env())
    return venv / "bin"


def base_env(**extra: str) -> dict[str, str]:
    """The test's environment for the fresh venv, less what would let it import this checkout
    or the dev venv's packages instead of its own."""
    hidden = {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}
    return {**{k: v for k, v in os.environ.items() if k not in hidden}, **extra}


def run_in(
    bin_dir: Path, *command: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """A program of the fresh venv, run away from the checkout (`python -c` would otherwise
    import `service` from the current folder)."""
    return subprocess.run(
        [str(bin_dir / command[0]), *command[1:]],
        cwd=cwd,
        env=env or base_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_base_install_has_no_server_and_its_cli_says_which_extra_to_add(
    base_install: Path, tmp_path: Path
) -> None:
    listed = run_in(base_install, "pip", "list", "--format=json", cwd=tmp_path)
    installed = {package["name"].lower() for package in json.loads(listed.stdout)}
    assert "apoptosis" in installed
    assert sorted(installed & SERVER_AND_WORKER) == []

    for help_command in (["--help"], ["jobs", "--help"]):
        shown = run_in(base_install, "apoptosis", *help_command, cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
    for command, extras in SERVICE_COMMANDS:
        refused = run_in(base_install, "apoptosis", *command, cwd=tmp_path)
        needs = " and the ".join(extras.split(","))
        expected = f"error: apoptosis {command[0]} needs the {needs}: "
        expected += f"pip install 'apoptosis[{extras}]'\n"
        assert (refused.returncode, refused.stderr) == (2, expected), command


def test_sdk_and_cli_of_the_base_install_drive_a_running_service(
    base_install: Path, tmp_path: Path
) -> None:
    archive, data = bert_upload(tmp_path)
    with embedded_service(tmp_path) as (url, key):
        pruned = run_in(
            base_install,
            "python",
            "-c",
            SDK_SCRIPT,
            url,
            key,
            str(archive),
            str(data),
            str(tmp_path / "pruned"),
            cwd=tmp_path,
        )
        assert pruned.returncode == 0, pruned.stderr
        result = json.loads(pruned.stdout)
        listed = run_in(
            base_install,
            "apoptosis",
            "jobs",
            "list",
            "--json",
            cwd=tmp_path,
            env=base_env(APOPTOSIS_URL=url, APOPTOSIS_API_KEY=key),
        )
        assert listed.returncode == 0, listed.stderr

    assert result["state"] == "succeeded" and result["model"] in result["models"]
    assert [Path(file).name for file in result["files"]] == ["model-safetensors.zip"]
    assert result["job"] in [job["id"] for job in json.loads(listed.stdout)["items"]]
