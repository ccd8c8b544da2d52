"""A Hugging Face upload must carry the weights of the model its config describes: what is missing
would be random, and a config alone must not make the worker allocate what it asks for."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.worker import factories
from worker.pipeline import models
from worker.pipeline.models import ModelRejected


def _refuse_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    def allocate(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were loaded: the model was allocated")

    monkeypatch.setattr(transformers.BertModel, "from_pretrained", allocate)


def test_a_config_without_its_weights_is_refused_before_anything_is_allocated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 925-byte attack: a config asking for a 192M-parameter vocabulary, and no weights to
    speak of."""
    folder = tmp_path / "huge"
    folder.mkdir()
    config = transformers.BertConfig(
        vocab_size=3_000_000, hidden_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    config.architectures = ["BertModel"]
    config.save_pretrained(folder)
    save_file({"tiny": torch.zeros(4)}, str(folder / "model.safetensors"))
    _refuse_allocation(monkeypatch)

    with pytest.raises(ModelRejected) as raised:
        models.load_hf(folder, trusted=False)

    assert raised.value.code == "missing_weights"
    assert "192," in str(raised.value)  # the parameter count the config describes


def test_a_config_over_the_parameter_cap_is_refused_before_anything_is_allocated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = factories.sentence_transformers_folder(tmp_path)  # a BertModel with its weights
    monkeypatch.setattr(models, "MAX_PARAMS", 1000)
    _refuse_allocation(monkeypatch)

    with pytest.raises(ModelRejected) as raised:
        models.load_hf(folder, trusted=False)

    assert raised.value.code == "model_too_large"


def test_a_head_the_weights_do_not_hold_is_refused(tmp_path: Path) -> None:
    """A base model's weights under a classifier's config: the classifier would be random."""
    folder = factories.sentence_transformers_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["BertForSequenceClassification"]
    (folder / "config.json").write_text(json.dumps(config))

    with pytest.raises(ModelRejected) as raised:
        models.load_hf(folder, trusted=False)

    assert raised.value.code == "missing_weights"


def test_a_renamed_tensor_is_missing_even_when_the_sizes_add_up(tmp_path: Path) -> None:
    folder = factories.bert_folder(tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    name = next(n for n in tensors if n.endswith("query.weight"))
    tensors[name.replace("query", "kwery")] = tensors.pop(name)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})

    with pytest.raises(ModelRejected) as raised:
        models.load_hf(folder, trusted=False)

    assert raised.value.code == "missing_weights"
    assert name in str(raised.value)


def test_complete_weights_load_as_saved(tmp_path: Path) -> None:
    """Every tensor the model holds is the saved one: a freshly initialised model of the same
    class would pass a type check, not this."""
    folder = factories.bert_folder(tmp_path)
    saved = load_file(str(folder / "model.safetensors"))

    loaded = models.load_hf(folder, trusted=False)

    state = loaded.model.state_dict()
    assert type(loaded.model) is transformers.BertForSequenceClassification
    assert set(saved) == set(state)
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
