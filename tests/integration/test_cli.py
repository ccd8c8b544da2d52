"""The CLI against a running embedded service: every command, `--json` parsed back, the exit
status of a failed job, and user errors as one line, never a traceback."""

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from tests.integration.services import bert_upload, embedded_service


@dataclass(frozen=True)
class Cli:
    env: dict[str, str]
    work: Path

    def run(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-c", "from service.cli.main import main; main()", *args]
        return subprocess.run(
            command,
            env={**os.environ, **self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=300,
        )

    def json(self, *args: str) -> Any:
        done = self.run(*args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    work = tmp_path_factory.mktemp("cli")
    with embedded_service(work) as (url, key):
        yield Cli({"APOPTOSIS_URL": url, "APOPTOSIS_API_KEY": key}, work)


def test_every_command_with_json_output(cli: Cli) -> None:
    archive, data = bert_upload(cli.work)

    model = cli.json("models", "upload", str(archive))  # the format from the file: hf
    dataset = cli.json("datasets", "upload", str(data))
    assert (model["format"], model["state"], dataset["format"]) == ("hf", "ready", "tensors")
    assert [m["id"] for m in cli.json("models", "list")["items"]] == [model["id"]]
    assert cli.json("models", "show", model["id"])["summary"]["params"] > 0
    assert [d["id"] for d in cli.json("datasets", "list")["items"]] == [dataset["id"]]
    assert cli.json("datasets", "show", dataset["id"])["size"] == data.stat().st_size

    job = cli.json(
        "jobs", "submit", model["id"], dataset["id"], "--target", "macs=0.7", "--steps", "2",
        "--batches", "1", "--batch-size", "16", "--outputs", "hf,safetensors", "--wait",
    )  # fmt: skip
    assert job["state"] == "succeeded", job["error"]
    assert job["spec"]["target"]["macs"] == 0.7 and job["spec"]["outputs"] == ["hf", "safetensors"]
    assert [j["id"] for j in cli.json("jobs", "list", "--state", "succeeded")["items"]] == [
        job["id"]
    ]
    assert cli.json("jobs", "show", job["id"])["result"]["macs_after"] > 0
    assert cli.json("jobs", "report", job["id"])["state"] == "succeeded"
    for command in ("show", "report"):  # for people: the before / after table of `prune`
        shown = cli.run("jobs", command, job["id"]).stdout
        assert shown.startswith(f"job {job['id']}: succeeded\n"), shown
        assert "target macs 0.7" in shown and "macs kept 0." in shown, shown
        assert "after pruning" in shown and "MACs" in shown and "{" not in shown, shown
    lines = cli.run("jobs", "events", job["id"], "--json").stdout.splitlines()
    assert json.loads(lines[-1]) == {"event": "state", "data": {"state": "succeeded"}}
    assert cli.run("jobs", "logs", job["id"]).stdout.splitlines()[0] == 'state: {"state": "queued"}'
    files = cli.json("jobs", "download", job["id"], "--output", str(cli.work / "out"))
    assert sorted(Path(f).name for f in files) == ["model-hf.zip", "model-safetensors.zip"]
    assert cli.json("jobs", "deliveries", job["id"]) == {"items": [], "next_cursor": None}
    watched = cli.json("jobs", "watch", job["id"])
    assert watched["state"] == "succeeded"

    cancel = cli.run("jobs", "cancel", job["id"])
    assert cancel.returncode == 2 and "invalid_state_transition" in cancel.stderr
    in_use = cli.run("models", "delete", model["id"])
    assert in_use.returncode == 2 and "model_in_use" in in_use.stderr
    assert cli.json("jobs", "delete", job["id"]) == {"deleted": job["id"]}
    assert cli.json("datasets", "delete", dataset["id"]) == {"deleted": dataset["id"]}
    assert cli.json("models", "delete", model["id"]) == {"deleted": model["id"]}
    assert cli.json("models", "list")["items"] == []


def test_a_waited_for_job_that_fails_exits_1_with_its_error_code(cli: Cli) -> None:
    archive, _ = bert_upload(cli.work / "failing")
    unlabelled = cli.work / "unlabelled.safetensors"
    save_file({"input_ids": torch.randint(0, 64, (32, 16))}, str(unlabelled))
    model = cli.json("models", "upload", str(archive))
    dataset = cli.json("datasets", "upload", str(unlabelled))

    done = cli.run("jobs", "submit", model["id"], dataset["id"], "--steps", "1", "--wait")

    assert done.returncode == 1
    assert "missing_labels" in done.stderr and "Traceback" not in done.stderr
    assert ": failed\n" in done.stdout and "error missing_labels: " in done.stdout


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (("models", "list"), {"APOPTOSIS_API_KEY": ""}, "no API key"),
        (("models", "list"), {"APOPTOSIS_URL": "http://127.0.0.1:9"}, "cannot reach the API"),
        (("models", "list"), {"APOPTOSIS_API_KEY": "apo_wrong"}, "invalid_api_key"),
        (("models", "show", "nope"), {}, "model_not_found"),
        (("jobs", "submit", "m", "d", "--target", "macs=half"), {}, "--target wants a number"),
        (("jobs", "submit", "m", "d", "--steps", "0"), {}, "schedule.steps"),
        (("jobs", "submit", "m", "d", "--max-memory", "2XB"), {}, "--max-memory wants a size"),
        (("jobs", "submit", "m", "d", "--target", "macs=0.5,0.3"), {}, "--targets macs=0.75"),
        (("jobs", "submit", "m", "d", "--target", "macs=0.5,macs=0.3"), {}, "names macs twice"),
        (("jobs", "submit", "m", "d", "--max-memory", "1KiB"), {}, "calibration.max_memory"),
        (("jobs", "submit", "m", "d"), {}, "model_not_found"),
        (("models", "upload", "NOTES"), {}, "notes.txt: cannot tell the model format"),
        (("datasets", "upload", "NOTES"), {}, "notes.txt: cannot tell the dataset format"),
        (("datasets", "upload", "JSONL", "--format", "tensors"), {}, "texts.jsonl"),
        (("prune", "NOTES", "--data", "NOTES"), {}, "notes.txt: cannot tell the model format"),
    ],
)
def test_a_user_error_is_one_line_and_never_a_traceback(
    cli: Cli, args: tuple[str, ...], env: dict[str, str], says: str
) -> None:
    notes = cli.work / "notes.txt"
    notes.write_text("not a model\n")
    texts = cli.work / "texts.jsonl"
    texts.write_text('{"text": "hello"}\n')
    given = [{"NOTES": str(notes), "JSONL": str(texts)}.get(a, a) for a in args]

    done = cli.run(*given, env=env)

    assert done.returncode == 2, done.stdout
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    assert says in done.stderr
    assert "upload-" not in done.stderr  # never the server's spool name


def test_debug_shows_the_traceback(cli: Cli) -> None:
    done = cli.run("--debug", "models", "show", "nope")

    assert done.returncode != 0 and "Traceback" in done.stderr and "ApiError" in done.stderr
