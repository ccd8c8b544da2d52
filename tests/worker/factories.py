"""Model folders and datasets on disk for worker tests: built from configs, no downloads."""

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from service.jobs.results import JobResult
from service.jobs.schemas import JobSpec
from worker.pipeline.steps import JobFiles, execute

WORDS = ["good", "bad", "great", "awful", "movie", "film", "the", "a", "plot", "acting"]


def bert_folder(root: Path, *, intermediate: int = 256) -> Path:
    """A small FFN-heavy BERT classifier with a word-level tokenizer, saved as an upload."""
    config = transformers.BertConfig(
        vocab_size=len(WORDS) + 4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=intermediate,
        max_position_embeddings=64,
    )
    config.num_labels = 2
    torch.manual_seed(0)
    folder = root / "bert"
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    _save_word_tokenizer(folder)
    return folder


def sentence_transformers_folder(
    root: Path, *, pooling: dict[str, Any] | None = None, normalize: bool = True
) -> Path:
    """A small BERT without a task head laid out as sentence-transformers saves one: the model
    at the root, `modules.json`, `1_Pooling/config.json` and (with `normalize`) `2_Normalize`."""
    config = transformers.BertConfig(
        vocab_size=len(WORDS) + 4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    folder = root / "sentence-bert"
    transformers.BertModel(config).save_pretrained(folder)
    _save_word_tokenizer(folder)
    layout = {"Transformer": "", "Pooling": "1_Pooling"} | (
        {"Normalize": "2_Normalize"} if normalize else {}
    )
    modules = [
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (kind, path) in enumerate(layout.items())
    ]
    for path in layout.values():
        (folder / path).mkdir(exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    stated = pooling or {"pooling_mode_mean_tokens": True}
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32} | stated)
    )
    return folder


def _save_word_tokenizer(folder: Path) -> None:
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3} | {
        w: i + 4 for i, w in enumerate(WORDS)
    }
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    ).save_pretrained(folder)


def vit_folder(root: Path) -> Path:
    config = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
    )
    config.num_labels = 2
    torch.manual_seed(0)
    folder = root / "vit"
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "size": {"height": 16, "width": 16},
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.25, 0.25, 0.25],
            }
        )
    )
    return folder


def tensors_file(path: Path, rows: int = 64, seed: int = 0) -> Path:
    generator = torch.Generator().manual_seed(seed)
    save_file(
        {
            "input_ids": torch.randint(4, len(WORDS) + 4, (rows, 12), generator=generator),
            "labels": torch.randint(0, 2, (rows,), generator=generator),
        },
        str(path),
    )
    return path


def jsonl_file(path: Path, rows: int = 48, *, labels: bool = True) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(rows):
        words = rng.choice(WORDS, size=rng.integers(2, 8)).tolist()
        row: dict[str, Any] = {"text": " ".join(words)}
        lines.append(json.dumps(row | {"label": i % 2} if labels else row))
    path.write_text("\n".join(lines) + "\n")
    return path


def imagefolder_zip(path: Path, per_class: int = 12) -> Path:
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as bundle:
        for label, colour in enumerate(((200, 40, 40), (40, 40, 200))):
            for i in range(per_class):
                pixels = np.clip(rng.normal(colour, 30, (20, 24, 3)), 0, 255).astype(np.uint8)
                image_path = path.parent / f"img{label}{i}.png"
                Image.fromarray(pixels).save(image_path)
                bundle.write(image_path, f"class{label}/{i}.png")
                image_path.unlink()
    return path


def zip_folder(folder: Path, archive: Path) -> Path:
    """A model folder packed as an upload (files at the archive root, subfolders kept)."""
    with zipfile.ZipFile(archive, "w") as bundle:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                bundle.write(file, file.relative_to(folder).as_posix())
    return archive


def spec(**overrides: Any) -> JobSpec:
    """A small job's spec (two steps, two batches), validated as the worker validates it."""
    base: dict[str, Any] = {
        "model_id": "model",
        "dataset_id": "data",
        "method": "oba",
        "granularity": "channel",
        "target": {"macs": 0.5},
        "schedule": {"steps": 2, "kind": "exponential"},
        "calibration": {"batches": 2, "batch_size": 16},
        "loss": "cross_entropy",
        "finetune": None,
        "evaluation": None,
        "preprocess": None,
        "outputs": ["hf"],
    }
    if "targets" in overrides:  # a family: its last target is the target
        del base["target"]
    return JobSpec.model_validate(base | overrides)


def architecture_folder(root: Path, name: str) -> tuple[Path, str]:
    """Each architecture family of the issue, FFN-heavy where it has an FFN (so a config-
    describable prune can halve its MACs), saved as an upload; and its data kind."""
    torch.manual_seed(0)
    folder = root / name
    if name == "gpt2":
        transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=len(WORDS) + 4,
                n_positions=32,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_inner=256,
            )
        ).save_pretrained(folder)
        return folder, "lm"
    if name == "llama":
        transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=len(WORDS) + 4,
                hidden_size=32,
                intermediate_size=256,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=32,
            )
        ).save_pretrained(folder)
        return folder, "lm"
    if name == "resnet":
        config: Any = transformers.ResNetConfig(
            num_channels=3,
            embedding_size=16,
            hidden_sizes=[16, 32],
            depths=[1, 1],
            layer_type="basic",
        )
        config.num_labels = 2
        transformers.ResNetForImageClassification(config).save_pretrained(folder)
        return folder, "image"
    if name == "convnext":
        config = transformers.ConvNextConfig(
            num_channels=3,
            hidden_sizes=[16, 32],
            depths=[1, 1],
            num_stages=2,
            patch_size=2,
            image_size=16,
        )
        config.num_labels = 2
        transformers.ConvNextForImageClassification(config).save_pretrained(folder)
        return folder, "image"
    if name == "vit":
        return vit_folder(root), "image"
    return bert_folder(root), "text"


def image_tensors_file(path: Path, rows: int = 32) -> Path:
    generator = torch.Generator().manual_seed(0)
    save_file(
        {
            "pixel_values": torch.randn(rows, 3, 16, 16, generator=generator),
            "labels": torch.randint(0, 2, (rows,), generator=generator),
        },
        str(path),
    )
    return path


def lm_tensors_file(path: Path, rows: int = 32) -> Path:
    generator = torch.Generator().manual_seed(0)
    save_file(
        {"input_ids": torch.randint(4, len(WORDS) + 4, (rows, 12), generator=generator)}, str(path)
    )
    return path


def run_bert_job(tmp_path: Path, job: JobSpec) -> JobResult:
    """The pipeline's result for `job` on the small BERT and its tensors dataset, on the CPU;
    what it writes goes under `tmp_path / "work"`."""
    work = tmp_path / "work"
    work.mkdir(parents=True, exist_ok=True)
    files = JobFiles(
        bert_folder(tmp_path),
        "hf",
        tensors_file(tmp_path / "data.safetensors"),
        "tensors",
        None,
        work,
    )
    result, _ = execute(job, files, torch.device("cpu"), False, lambda _: None)
    return result


def job_result(**fields: Any) -> JobResult:
    """A small succeeded job's result (MACs halved, one step, no outputs), `fields` changed."""
    measured = {"loss": 2.0}
    return JobResult.model_validate(
        {
            "before": measured,
            "after_pruning": measured | {"loss": 2.5},
            "after_finetune": None,
            "params_before": 10,
            "params_after": 6,
            "macs_before": 100,
            "macs_after": 50,
            "target_met": True,
            "sparsity": None,
            "example_inputs": {"input_ids": [1, 8]},
            "config_updates": {},
            "widths": {},
            "steps": [{"step": 1, "macs": 50, "params": 6, "loss": 2.5, "seconds_scoring": 0.1}],
            "evaluated_on": "calibration",
            "micro_batch_rows": 8,
            "exports": {},
            "seconds": {"prune": 1.0},
        }
        | fields
    )
