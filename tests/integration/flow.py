"""The user's journey, as one function both deployment shapes must pass."""

import zipfile
from pathlib import Path

import torch
import transformers

from service.client import Client
from worker.engine import measure


def prune_bert_to_half_the_macs(client: Client, archive: Path, data: Path, work: Path) -> None:
    model = client.wait_for_model(client.upload_model(archive, "hf", name="bert").id)
    assert model.state == "ready", model.rejection_reason
    dataset = client.upload_dataset(data, "tensors")
    job = client.submit_job(
        {
            "model_id": model.id,
            "dataset_id": dataset.id,
            "method": "oba",
            "granularity": "channel",
            "target": {"macs": 0.5},
            "schedule": {"steps": 3},
            "calibration": {"batches": 2, "batch_size": 16},
            "loss": "cross_entropy",
            "outputs": ["hf"],
        }
    )

    events = list(client.events(job.id))

    states = [data["state"] for kind, data in events if kind == "state"]
    assert states[-1] == "succeeded", client.job(job.id).error
    assert any(kind == "progress" and data.get("stage") == "pruning" for kind, data in events)
    finished = client.job(job.id)
    assert finished.state == "succeeded" and finished.result is not None
    [artifact] = client.artifacts(job.id)
    assert artifact.format == "hf"
    downloaded = client.download(artifact, work / "download")
    unpacked = work / "pruned"
    with zipfile.ZipFile(downloaded) as bundle:
        bundle.extractall(unpacked)
    pruned = transformers.AutoModelForSequenceClassification.from_pretrained(unpacked).eval()
    inputs = {"input_ids": torch.zeros(1, 16, dtype=torch.long)}
    assert measure(pruned, inputs).macs <= 0.5 * model.summary["macs"]
    with torch.no_grad():
        assert pruned(**inputs).logits.shape == (1, 3)
