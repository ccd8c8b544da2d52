"""sentence-transformers folders: their pooling read safely at load, and a pruned folder that
`SentenceTransformer` loads, with the embeddings the engine distilled."""

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from sentence_transformers import SentenceTransformer

from tests.worker import factories
from worker.pipeline import export, losses, models
from worker.pipeline.steps import JobFiles, execute


def _unzip(archive: Path, into: Path) -> Path:
    with zipfile.ZipFile(archive) as bundle:
        bundle.extractall(into)
    return into


def test_a_plain_hf_folder_has_no_pooling(tmp_path: Path) -> None:
    assert models.load(factories.bert_folder(tmp_path), "hf", trusted=False).pooling is None


def test_the_pooling_is_read_from_modules_json(tmp_path: Path) -> None:
    folder = factories.sentence_transformers_folder(
        tmp_path, pooling={"pooling_mode": ["cls", "max"]}, normalize=False
    )

    assert models.sentence_pooling(folder) == models.Pooling(
        ("cls", "max"), False, Path("1_Pooling/config.json")
    )


def _modules(path: str) -> list[dict[str, Any]]:
    return [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": path, "type": "sentence_transformers.models.Pooling"},
    ]


@pytest.mark.parametrize(
    ("modules", "pooling", "code"),
    [
        ("[{not json", {}, "invalid_modules"),
        ({"0": "Transformer"}, {}, "invalid_modules"),
        ([{"type": "sentence_transformers.models.Pooling"}], {}, "invalid_modules"),
        (_modules("../outside"), {}, "invalid_modules"),
        (_modules("/etc"), {}, "invalid_modules"),
        (_modules("2_Missing"), {}, "invalid_modules"),
        (_modules("1_Pooling"), ["mean"], "invalid_pooling"),
        (_modules("1_Pooling"), {"pooling_mode": "median"}, "invalid_pooling"),
        (_modules("1_Pooling"), {"pooling_mode": {"mean": True}}, "invalid_pooling"),
    ],
)
def test_bad_sentence_transformers_files_are_rejected(
    tmp_path: Path, modules: Any, pooling: Any, code: str
) -> None:
    folder = tmp_path / "model"
    (folder / "1_Pooling").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "config.json").write_text(json.dumps({"pooling_mode": "cls"}))
    listing = modules if isinstance(modules, str) else json.dumps(modules)
    (folder / "modules.json").write_text(listing)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))

    with pytest.raises(models.ModelRejected) as rejected:
        models.sentence_pooling(folder)

    assert rejected.value.code == code


def test_a_pooling_config_linked_outside_the_folder_is_rejected(tmp_path: Path) -> None:
    folder = factories.sentence_transformers_folder(tmp_path)
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps({"pooling_mode": "mean"}))
    (folder / "1_Pooling" / "config.json").unlink()
    (folder / "1_Pooling" / "config.json").symlink_to(outside)

    with pytest.raises(models.ModelRejected, match="outside"):
        models.sentence_pooling(folder)


def test_a_pruned_sentence_transformers_folder_loads_as_one(tmp_path: Path) -> None:
    folder = factories.sentence_transformers_folder(tmp_path)
    (folder / "onnx").mkdir()  # an export of the unpruned model: must not come back
    (folder / "onnx" / "model.onnx").write_bytes(b"stale")
    data = factories.jsonl_file(tmp_path / "sentences.jsonl", labels=False)
    work = tmp_path / "work"
    work.mkdir()
    spec = factories.spec(method="oba_full", loss="distill", target={"macs": 0.5})

    result, exports = execute(
        spec, JobFiles(folder, "hf", data, "jsonl", None, work), torch.device("cpu"), False, print
    )

    assert result.macs_after <= spec.target.value * result.macs_before
    assert result.before.loss == pytest.approx(0.0, abs=1e-5)
    pruned = _unzip(exports[0].path, tmp_path / "pruned")
    assert (pruned / "1_Pooling" / "config.json").is_file()
    assert not (pruned / "onnx").exists()
    library = SentenceTransformer(str(pruned), device="cpu")
    assert transformers.AutoConfig.from_pretrained(pruned).intermediate_size < 256
    texts = ["good movie", "the plot a bad awful film", "acting"]
    embeddings = library.encode(texts, convert_to_tensor=True)
    assert embeddings.shape == (3, 32)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))  # Normalize is listed
    reloaded = models.load(pruned, "hf", trusted=False)
    batch = {k: v for k, v in library.preprocess(texts).items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        ours = losses.representations(reloaded.model(**batch), batch, reloaded.pooling)
    torch.testing.assert_close(ours["sentence"], embeddings, atol=1e-5, rtol=1e-5)


def test_the_pooling_config_states_the_saved_hidden_size(tmp_path: Path) -> None:
    folder = factories.sentence_transformers_folder(tmp_path)
    narrower = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2
        )
    )

    example = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3)}

    archive = export.export_hf(narrower.eval(), example, folder, tmp_path).path

    pooling = json.loads(
        (_unzip(archive, tmp_path / "out") / "1_Pooling" / "config.json").read_text()
    )
    assert pooling == {"word_embedding_dimension": 16, "pooling_mode_mean_tokens": True}
