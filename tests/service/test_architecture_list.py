"""The API's list of transformers model classes matches the worker's pinned transformers."""

import importlib.util
from pathlib import Path
from typing import Any

import transformers

from service.core.archives import TRANSFORMERS_RELEASE, known_architectures

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "refresh_architectures.py"


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("refresh_architectures", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_list_is_current_for_the_pinned_release() -> None:
    assert transformers.__version__ == TRANSFORMERS_RELEASE
    assert known_architectures() == frozenset(_script().model_classes())
    assert {
        "BertForSequenceClassification",
        "LlamaForCausalLM",
        "ResNetForImageClassification",
        "GPT2LMHeadModel",
        "ViTForImageClassification",
    } <= known_architectures()
