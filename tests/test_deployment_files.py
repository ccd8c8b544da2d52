"""The deployment files: docker-compose.yml as docker-compose itself reads it, and the facts the
architecture rests on (the worker gets a GPU, the API waits for migrations, the API image
carries no torch, the worker image has the CUDA build of the torch pyproject.toml pins)."""

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[1]
API_DOCKERFILE = ROOT / "docker" / "api.Dockerfile"
WORKER_DOCKERFILE = ROOT / "docker" / "worker.Dockerfile"
APP_SERVICES = ["migrate", "api", "worker", "cpu-worker"]


def docker_compose(*arguments: str) -> str:
    if shutil.which("docker-compose") is None:
        if os.environ.get("CI"):  # CI installs it (.ci/run): never skipped there
            pytest.fail("the docker-compose binary is not installed; CI installs it (.ci/run)")
        pytest.skip(
            "the docker-compose binary is not installed (Debian: apt install docker-compose)"
        )
    result = subprocess.run(
        ["docker-compose", "-f", "docker-compose.yml", *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    """The services after interpolation and anchor merging: what `docker-compose up` would run."""
    config: dict[str, Any] = yaml.safe_load(docker_compose("config"))
    return config["services"]


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines()]
    pairs = [line.split(None, 1) for line in lines if line and not line.startswith("#")]
    return [(pair[0].upper(), pair[1] if len(pair) > 1 else "") for pair in pairs]


def arguments(dockerfile: Path, instruction: str) -> list[str]:
    return [args for name, args in instructions(dockerfile) if name == instruction]


def project_install(dockerfile: Path) -> tuple[int, list[str]]:
    """The index among RUN instructions of the one that installs this project, and the
    requirements that brings: the dependencies plus those of each extra it names."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pattern = re.compile(r'pip install (?:-e )?"?\.(?:\[([\w,-]+)\])?"?(?:\s|$)')
    ((index, extras),) = [
        (index, match[1] or "")
        for index, run in enumerate(arguments(dockerfile, "RUN"))
        if (match := pattern.search(run))
    ]
    requirements = list(project["dependencies"])
    for extra in filter(None, extras.split(",")):
        requirements += extra_requirements(project, extra, dockerfile.name)
    return index, requirements


def extra_requirements(project: dict[str, Any], extra: str, installer: str) -> list[str]:
    """What an extra brings, with the extras it names of this project itself (`worker`
    includes `apoptosis[server]`) expanded, as pip resolves them."""
    optional: dict[str, list[str]] = project["optional-dependencies"]
    # pip only warns about an unknown extra; here it is a mistake.
    assert extra in optional, f"{installer} installs an extra that does not exist: {extra}"
    requirements = []
    for requirement in optional[extra]:
        own = re.fullmatch(rf"{project['name']}\[([\w,-]+)\]", requirement)
        if own is None:
            requirements.append(requirement)
            continue
        for named in own[1].split(","):
            requirements += extra_requirements(project, named, installer)
    return requirements


def test_compose_file_is_valid() -> None:
    assert docker_compose("config", "-q") == ""


def test_worker_reserves_one_gpu(services: dict[str, Any]) -> None:
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in services["cpu-worker"]


def test_api_and_workers_start_after_migrations(services: dict[str, Any]) -> None:
    assert services["migrate"]["command"] == ["apoptosis", "migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in services["postgres"]
    for name in ["api", "worker", "cpu-worker"]:
        depends_on = services[name]["depends_on"]
        assert depends_on["migrate"]["condition"] == "service_completed_successfully", name
        assert depends_on["create-bucket"]["condition"] == "service_completed_successfully", name


def test_app_services_share_the_production_settings(services: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        environment = services[name]["environment"]
        assert environment["APOPTOSIS_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert environment["APOPTOSIS_BROKER_URL"] == "redis://redis:6379/0", name
        assert environment["APOPTOSIS_STORE_URL"].startswith("s3://"), name
        assert environment["AWS_ACCESS_KEY_ID"] and environment["AWS_SECRET_ACCESS_KEY"], name


def test_store_bucket_is_the_one_created(services: dict[str, Any]) -> None:
    store_url = urlsplit(services["api"]["environment"]["APOPTOSIS_STORE_URL"])
    assert store_url.query == "endpoint_url=http://minio:9000"
    assert (
        f"mc mb --ignore-existing local/{store_url.netloc}"
        in services["create-bucket"]["command"][0]
    )


def test_jobs_go_to_the_queue_the_gpu_worker_consumes(services: dict[str, Any]) -> None:
    assert services["api"]["environment"]["APOPTOSIS_JOB_QUEUE"] == "gpu"
    (command,) = arguments(WORKER_DOCKERFILE, "CMD")
    assert json.loads(command) == ["apoptosis", "worker", "--queues", "gpu"]
    # Model validation is sent to `cpu`: something must consume it.
    assert services["cpu-worker"]["command"] == ["apoptosis", "worker", "--queues", "cpu"]


def test_api_image_installs_no_torch() -> None:
    runs = arguments(API_DOCKERFILE, "RUN")
    assert not [run for run in runs if "torch" in run]
    assert not [args for args in arguments(API_DOCKERFILE, "COPY") if "worker" in args]
    _, requirements = project_install(API_DOCKERFILE)
    assert not [r for r in requirements if "torch" in r.lower()]


@pytest.mark.parametrize("dockerfile", [API_DOCKERFILE, WORKER_DOCKERFILE])
def test_images_install_the_server(dockerfile: Path) -> None:
    """The base install is the SDK and the CLI's client: both images run the server's code
    (the worker keeps its jobs through the service's database, queue and store)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    server = extra_requirements(project, "server", "pyproject.toml")
    _, requirements = project_install(dockerfile)
    assert not set(server) - set(requirements)


def test_api_image_serves_as_a_user_with_a_healthcheck() -> None:
    (base,) = arguments(API_DOCKERFILE, "FROM")
    assert base.startswith("python:3.11-slim")
    assert arguments(API_DOCKERFILE, "USER") == ["apoptosis"]
    assert "http://127.0.0.1:8000/healthz" in arguments(API_DOCKERFILE, "HEALTHCHECK")[0]
    (command,) = arguments(API_DOCKERFILE, "CMD")
    assert json.loads(command) == ["apoptosis", "api", "--host", "0.0.0.0", "--port", "8000"]


def test_worker_image_installs_the_pinned_cuda_torch_first() -> None:
    index, requirements = project_install(WORKER_DOCKERFILE)
    (pin,) = [requirement for requirement in requirements if requirement.startswith("torch==")]
    runs = arguments(WORKER_DOCKERFILE, "RUN")
    (torch_install,) = [run for run in runs if "download.pytorch.org" in run]
    assert (
        f'"{pin}" --index-url "https://download.pytorch.org/whl/${{TORCH_CUDA}}"' in torch_install
    )
    # Installed first, the CUDA build already satisfies the pin: pip keeps it.
    assert runs.index(torch_install) < index
    assert arguments(WORKER_DOCKERFILE, "USER") == ["apoptosis"]
