"""Tiny Hugging Face models built from configs with random weights (no downloads)."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn


def bert(hidden: int = 32, intermediate: int = 48, layers: int = 2) -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=intermediate,
        max_position_embeddings=32,
    )
    config.num_labels = 3
    return transformers.BertForSequenceClassification(config)


def grouped_query_lm(family: str, layers: int = 2) -> nn.Module:
    """A causal LM of a transformers family with q/k/v/o projections and a stated head_dim:
    4 query heads reading 2 key/value heads of 8 channels, hidden 32, FFN 48."""
    config = transformers.AutoConfig.for_model(
        family,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def vit() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
    )
    config.num_labels = 3
    return transformers.ViTForImageClassification(config)


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=48
    )
    return transformers.GPT2LMHeadModel(config)


def llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config)


def resnet() -> nn.Module:
    config = transformers.ResNetConfig(
        num_channels=3,
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="basic",
    )
    config.num_labels = 3
    return transformers.ResNetForImageClassification(config)


def convnext() -> nn.Module:
    config = transformers.ConvNextConfig(
        num_channels=3,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        num_stages=2,
        patch_size=2,
        image_size=16,
    )
    config.num_labels = 3
    return transformers.ConvNextForImageClassification(config)


def text_batches(count: int, seed: int, labels: int = 3) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, 64, (4, 12), generator=generator),
            "labels": torch.randint(0, labels, (4,), generator=generator),
        }
        for _ in range(count)
    ]


def lm_batches(count: int, seed: int) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(seed)
    # no key/value cache: its concatenations are not part of the model's structure
    return [
        {"input_ids": torch.randint(0, 64, (4, 12), generator=generator), "use_cache": False}
        for _ in range(count)
    ]


def image_batches(count: int, seed: int) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.randn(4, 3, 16, 16, generator=generator),
            "labels": torch.randint(0, 3, (4,), generator=generator),
        }
        for _ in range(count)
    ]


def classification_loss(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return F.cross_entropy(model(**inputs).logits, batch["labels"])


def causal_lm_loss(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    # (batch, tokens, vocab): predict token t+1 from tokens ≤ t
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1)
    )


Case = tuple[
    Callable[[], nn.Module],
    Callable[[int, int], list[dict[str, Any]]],
    Callable[[nn.Module, Any], Tensor],
]
CASES: dict[str, Case] = {
    "bert": (bert, text_batches, classification_loss),
    "vit": (vit, image_batches, classification_loss),
    "gpt2": (gpt2, lm_batches, causal_lm_loss),
    "llama": (llama, lm_batches, causal_lm_loss),
    "resnet": (resnet, image_batches, classification_loss),
    "convnext": (convnext, image_batches, classification_loss),
}


def inputs_of(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k != "labels"}


def assert_reloads_identically(
    model: nn.Module, directory: Path, inputs: dict[str, Any], rebuilt: nn.Module | None = None
) -> None:
    """`save_pretrained` → `AutoModelForCausalLM.from_pretrained` gives the pruned module's
    logits (and so does a plan-rebuilt copy, when given)."""
    model.save_pretrained(directory)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    # float32 logits: the reload may pick another attention kernel (eager / sdpa) than
    # from_config did, which moves the last bits; a wrong shape or weight moves them by ≫ 1e-5
    with torch.no_grad():
        expected = model(**inputs).logits
        torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=0, atol=1e-5)
        if rebuilt is not None:
            torch.testing.assert_close(rebuilt(**inputs).logits, expected, rtol=0, atol=1e-5)
