"""One tiny model per Hugging Face family, in the proportions of the real ones (FFN about 4×
hidden for encoders and ViTs, 2.75× for Llama-style decoders), with the data its job needs:
the list `tests/worker/test_families.py` prunes and `docs/families.md` is generated from."""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import save_file
from torch import nn

from tests.worker import factories

VOCAB = len(factories.WORDS) + 4
HIDDEN = 64  # wide enough that attention products are cheap beside the FFNs
LLAMA_FFN = 176  # 2.75 × HIDDEN


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    data: Callable[[Path], Path]
    loss: str
    # The least fraction of its MACs a job with an hf output reaches: 0.5 or less for a family
    # that prunes to half; above it for one refused at half (1.0: the config states no width),
    # whose onnx, pt2 and safetensors outputs (per-layer widths) must reach half instead.
    reaches: float = 0.5
    method: str = "oba"
    slow: bool = False  # over 5 s


def lm_inputs(seed: int) -> dict[str, Any]:
    """Four rows of 12 token ids for a zoo causal LM, without a key/value cache (as jobs run
    causal LMs): its concatenations are not part of the model's structure."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (4, 12), generator=generator)
    return {"input_ids": ids, "use_cache": False}


def _random_tensors(
    path: Path,
    ids: dict[str, int],
    floats: dict[str, tuple[int, ...]] | None = None,
    classes: int = 0,
    rows: int = 32,
) -> Path:
    """Token ids (`ids`: name → length), normal floats (`floats`: name → row shape) and, with
    `classes`, labels, saved as a tensors dataset."""
    generator = torch.Generator().manual_seed(0)
    columns = {k: torch.randint(4, VOCAB, (rows, n), generator=generator) for k, n in ids.items()}
    for name, shape in (floats or {}).items():
        columns[name] = torch.randn(rows, *shape, generator=generator)
    if classes:
        columns["labels"] = torch.randint(0, classes, (rows,), generator=generator)
    save_file(columns, str(path))
    return path


# Token ids for an encoder-decoder whose forward cannot build its decoder inputs (T5, Marian)
_seq2seq_tensors_file = partial(_random_tensors, ids={"input_ids": 12, "decoder_input_ids": 8})
# Log-mel features (8 bins, 16 frames) and decoder token ids, as Whisper reads them
_speech_tensors_file = partial(
    _random_tensors, ids={"decoder_input_ids": 8}, floats={"input_features": (8, 16)}
)
# 32 × 32 images: EfficientNet's 5 × 5 kernels need more than 16 × 16 pixels
_large_image_tensors_file = partial(
    _random_tensors, ids={}, floats={"pixel_values": (3, 32, 32)}, classes=2, rows=16
)


def _classifier(config: Any) -> Any:
    config.num_labels = 2
    return config


def _built(
    config_class: Any, model_class: Any, fields: dict[str, Any], *, classifier: bool = False
) -> Callable[[], nn.Module]:
    """A builder of `model_class` on `config_class(**fields)` (two labels for a classifier)."""

    def build() -> nn.Module:
        config = config_class(**fields)
        return model_class(_classifier(config) if classifier else config)

    return build


# Two layers, four heads: what each kind of family shares, completed or overridden per family
_DECODER = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 32,
}
_ENCODER = _DECODER | {"intermediate_size": 4 * HIDDEN}
_GPTJ = {"vocab_size": VOCAB, "n_embd": HIDDEN, "n_inner": 4 * HIDDEN, "n_layer": 2, "n_head": 4}
_SEQ2SEQ = {
    "vocab_size": VOCAB,
    "d_model": HIDDEN,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 4 * HIDDEN,
    "decoder_ffn_dim": 4 * HIDDEN,
}
_VIT = {
    "image_size": 16,
    "patch_size": 4,
    "hidden_size": HIDDEN,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


def _decoder(config_class: Any, model_class: Any, **fields: Any) -> Callable[[], nn.Module]:
    """A causal LM, `fields` completing or overriding its config."""
    return _built(config_class, model_class, _DECODER | fields)


def _bert_like(config_class: Any, model_class: Any, **fields: Any) -> Callable[[], nn.Module]:
    return _built(config_class, model_class, _ENCODER | fields, classifier=True)


def _seq2seq(config_class: Any, model_class: Any, **fields: Any) -> Callable[[], nn.Module]:
    """BART-style encoder-decoders: two layers a stack, each stack with its own FFN width."""
    return _built(config_class, model_class, _SEQ2SEQ | fields)


def _vit_like(config_class: Any, model_class: Any, **fields: Any) -> Callable[[], nn.Module]:
    return _built(config_class, model_class, _VIT | fields, classifier=True)


def _cnn(config_class: Any, model_class: Any, **fields: Any) -> Callable[[], nn.Module]:
    return _built(config_class, model_class, fields, classifier=True)


def _gptj_like(config_class: Any, model_class: Any) -> Callable[[], nn.Module]:
    return _built(config_class, model_class, _GPTJ | {"rotary_dim": 8, "n_positions": 32})


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=HIDDEN, n_layer=2, n_head=4, n_inner=4 * HIDDEN
    )
    return transformers.GPT2LMHeadModel(config)


def _distilbert() -> nn.Module:
    config = transformers.DistilBertConfig(
        vocab_size=VOCAB,
        dim=HIDDEN,
        hidden_dim=4 * HIDDEN,
        n_layers=2,
        n_heads=4,
        max_position_embeddings=32,
    )
    return transformers.DistilBertForSequenceClassification(_classifier(config))


def _modernbert() -> nn.Module:
    config: Any = transformers.ModernBertConfig(  # type: ignore[call-arg]
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
        global_attn_every_n_layers=1,
        local_attention=16,
    )
    return transformers.ModernBertForSequenceClassification(_classifier(config))


def _t5(gated: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config: Any = transformers.T5Config(  # type: ignore[call-arg]
            vocab_size=VOCAB,
            d_model=HIDDEN,
            d_kv=16,
            d_ff=4 * HIDDEN,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            feed_forward_proj="gated-gelu" if gated else "relu",
        )
        return transformers.T5ForConditionalGeneration(config)

    return build


def _swin() -> nn.Module:
    config = transformers.SwinConfig(
        image_size=16,
        patch_size=2,
        embed_dim=HIDDEN // 2,
        depths=[1, 1],
        num_heads=[2, 4],
        window_size=2,
        mlp_ratio=4.0,
    )
    return transformers.SwinForImageClassification(_classifier(config))


LM, TEXT, IMAGE = factories.lm_tensors_file, factories.tensors_file, factories.image_tensors_file
T = transformers
_LLAMA_FFN = {"intermediate_size": LLAMA_FFN}
_GQA = _LLAMA_FFN | {"num_key_value_heads": 2}
_MOE = {"num_key_value_heads": 2, "num_experts_per_tok": 2}
_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

FAMILIES: dict[str, Family] = {
    # decoders
    "codegen": Family(_gptj_like(T.CodeGenConfig, T.CodeGenForCausalLM), LM, "causal_lm"),
    "falcon": Family(
        _decoder(T.FalconConfig, T.FalconForCausalLM, ffn_hidden_size=4 * HIDDEN), LM, "causal_lm"
    ),
    "gemma": Family(
        _decoder(
            T.GemmaConfig, T.GemmaForCausalLM, **_LLAMA_FFN, num_key_value_heads=1, head_dim=16
        ),
        LM,
        "causal_lm",
    ),
    "gpt2": Family(_gpt2, LM, "causal_lm"),
    "gpt_neox": Family(
        _decoder(T.GPTNeoXConfig, T.GPTNeoXForCausalLM, intermediate_size=4 * HIDDEN),
        LM,
        "causal_lm",
    ),
    "gptj": Family(_gptj_like(T.GPTJConfig, T.GPTJForCausalLM), LM, "causal_lm"),
    "llama": Family(_decoder(T.LlamaConfig, T.LlamaForCausalLM, **_GQA), LM, "causal_lm"),
    "mistral": Family(_decoder(T.MistralConfig, T.MistralForCausalLM, **_GQA), LM, "causal_lm"),
    "opt": Family(
        _decoder(T.OPTConfig, T.OPTForCausalLM, ffn_dim=4 * HIDDEN, word_embed_proj_dim=HIDDEN),
        LM,
        "causal_lm",
    ),
    "phi": Family(
        _decoder(
            T.PhiConfig, T.PhiForCausalLM, intermediate_size=4 * HIDDEN, partial_rotary_factor=0.5
        ),
        LM,
        "causal_lm",
    ),
    "phi3": Family(
        _decoder(T.Phi3Config, T.Phi3ForCausalLM, **_LLAMA_FFN, **_IDS),
        LM,
        "causal_lm",
    ),
    "qwen2": Family(_decoder(T.Qwen2Config, T.Qwen2ForCausalLM, **_GQA), LM, "causal_lm"),
    "qwen3": Family(
        _decoder(T.Qwen3Config, T.Qwen3ForCausalLM, **_GQA, head_dim=16), LM, "causal_lm"
    ),
    "stablelm": Family(
        _decoder(
            T.StableLmConfig,
            T.StableLmForCausalLM,
            **_LLAMA_FFN,
            num_key_value_heads=4,
            partial_rotary_factor=0.25,
        ),
        LM,
        "causal_lm",
    ),
    "starcoder2": Family(
        _decoder(
            T.Starcoder2Config,
            T.Starcoder2ForCausalLM,
            intermediate_size=4 * HIDDEN,
            num_key_value_heads=2,
        ),
        LM,
        "causal_lm",
    ),
    # the class fixes the FFN at 4 × hidden_size and derives the head size: with hf the hidden
    # size moves with every head's size and the FFN, per-layer outputs prune the FFN alone
    "bloom": Family(_decoder(T.BloomConfig, T.BloomForCausalLM), LM, "causal_lm"),
    # mixtures of experts
    "mixtral": Family(
        _decoder(T.MixtralConfig, T.MixtralForCausalLM, **_LLAMA_FFN, **_MOE, num_local_experts=4),
        LM,
        "causal_lm",
    ),
    "olmoe": Family(
        _decoder(
            T.OlmoeConfig,
            T.OlmoeForCausalLM,
            intermediate_size=HIDDEN,
            num_experts=4,
            **_MOE,
            **_IDS,
        ),
        LM,
        "causal_lm",
    ),
    "qwen2_moe": Family(
        _decoder(
            T.Qwen2MoeConfig,
            T.Qwen2MoeForCausalLM,
            **_LLAMA_FFN,
            **_MOE,
            moe_intermediate_size=HIDDEN,
            shared_expert_intermediate_size=2 * HIDDEN,
            num_experts=4,
        ),
        LM,
        "causal_lm",
    ),
    "qwen3_moe": Family(
        _decoder(
            T.Qwen3MoeConfig,
            T.Qwen3MoeForCausalLM,
            **_LLAMA_FFN,
            **_MOE,
            head_dim=16,
            moe_intermediate_size=HIDDEN,
            num_experts=4,
        ),
        LM,
        "causal_lm",
    ),
    # encoders
    "albert": Family(
        _bert_like(T.AlbertConfig, T.AlbertForSequenceClassification, embedding_size=32),
        TEXT,
        "cross_entropy",
    ),
    "bert": Family(
        _bert_like(T.BertConfig, T.BertForSequenceClassification), TEXT, "cross_entropy"
    ),
    "distilbert": Family(_distilbert, TEXT, "cross_entropy"),
    "modernbert": Family(_modernbert, TEXT, "cross_entropy"),
    "roberta": Family(
        _bert_like(T.RobertaConfig, T.RobertaForSequenceClassification, pad_token_id=1),
        TEXT,
        "cross_entropy",
    ),
    # encoder-decoders
    "bart": Family(
        _seq2seq(T.BartConfig, T.BartForConditionalGeneration, max_position_embeddings=32),
        LM,
        "distill",
        method="oba_full",
        slow=True,
    ),
    "flan_t5": Family(_t5(gated=True), _seq2seq_tensors_file, "distill"),
    "marian": Family(
        _seq2seq(
            T.MarianConfig,
            T.MarianMTModel,
            max_position_embeddings=32,
            decoder_start_token_id=0,
            pad_token_id=0,
        ),
        _seq2seq_tensors_file,
        "distill",
        reaches=0.55,
    ),
    "mbart": Family(
        _seq2seq(T.MBartConfig, T.MBartForConditionalGeneration, max_position_embeddings=32),
        LM,
        "distill",
    ),
    "t5": Family(_t5(gated=False), _seq2seq_tensors_file, "distill"),
    "whisper": Family(
        _seq2seq(
            T.WhisperConfig,
            T.WhisperForConditionalGeneration,
            num_mel_bins=8,
            max_source_positions=8,
            max_target_positions=32,
            decoder_start_token_id=0,
            pad_token_id=0,
        ),
        _speech_tensors_file,
        "distill",
    ),
    # vision
    "dinov2": Family(
        _vit_like(T.Dinov2Config, T.Dinov2ForImageClassification, mlp_ratio=4),
        IMAGE,
        "cross_entropy",
    ),
    "swin": Family(_swin, IMAGE, "cross_entropy"),
    "vit": Family(
        _vit_like(T.ViTConfig, T.ViTForImageClassification, intermediate_size=4 * HIDDEN),
        IMAGE,
        "cross_entropy",
    ),
    "resnet": Family(
        _cnn(
            T.ResNetConfig,
            T.ResNetForImageClassification,
            embedding_size=16,
            hidden_sizes=[16, 32],
            depths=[1, 1],
            layer_type="basic",
        ),
        IMAGE,
        "cross_entropy",
    ),
    "convnext": Family(
        _cnn(
            T.ConvNextConfig,
            T.ConvNextForImageClassification,
            hidden_sizes=[16, 32],
            depths=[1, 1],
            num_stages=2,
            patch_size=2,
            image_size=16,
        ),
        IMAGE,
        "cross_entropy",
    ),
    "mobilenet_v2": Family(
        _cnn(T.MobileNetV2Config, T.MobileNetV2ForImageClassification, image_size=16),
        IMAGE,
        "cross_entropy",
    ),
    "efficientnet": Family(  # B0 at half its width and depth (the default is B7: 66M)
        _cnn(
            T.EfficientNetConfig,
            T.EfficientNetForImageClassification,
            image_size=32,
            width_coefficient=0.5,
            depth_coefficient=0.5,
            hidden_dim=640,
        ),
        _large_image_tensors_file,
        "cross_entropy",
    ),
}
