"""Each family `worker.engine.families` describes (and one the default description fits),
uploaded as an `hf` folder and pruned by the job with an `hf` output: it reaches half its MACs
(or is refused before pruning, saying what it can reach), the job's own reload check passes,
and the output reloads with the family's class at the pruned size. Tiny configs in the real
models' proportions (FFN 4× hidden), random weights."""

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn

from tests.worker import factories
from worker.engine import TargetUnreachable, measure
from worker.engine.families import FAMILIES
from worker.steps import JobFiles, execute

VOCAB = len(factories.WORDS) + 4
HIDDEN = 64  # FFN 4× hidden, as the real models; wide enough that attention products are cheap


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    data: Callable[[Path], Path]
    loss: str
    method: str = "oba"
    target: float = 0.5
    slow: bool = False  # over 5 s


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=HIDDEN, n_layer=2, n_head=4, n_inner=4 * HIDDEN
    )
    return transformers.GPT2LMHeadModel(config)


def _gpt_neox() -> nn.Module:
    config = transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
    )
    return transformers.GPTNeoXForCausalLM(config)


def _falcon() -> nn.Module:
    config = transformers.FalconConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        ffn_hidden_size=4 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
    )
    return transformers.FalconForCausalLM(config)


def _starcoder2() -> nn.Module:
    """No entry of its own: the default description (`c_fc`, `intermediate_size`) fits."""
    config = transformers.Starcoder2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.Starcoder2ForCausalLM(config)


def _opt() -> nn.Module:
    config = transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        ffn_dim=4 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        word_embed_proj_dim=HIDDEN,
    )
    return transformers.OPTForCausalLM(config)


def _distilbert() -> nn.Module:
    config = transformers.DistilBertConfig(
        vocab_size=VOCAB,
        dim=HIDDEN,
        hidden_dim=4 * HIDDEN,
        n_layers=2,
        n_heads=4,
        max_position_embeddings=32,
    )
    config.num_labels = 2
    return transformers.DistilBertForSequenceClassification(config)


def _dinov2() -> nn.Module:
    config = transformers.Dinov2Config(
        image_size=16,
        patch_size=4,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=4,
    )
    config.num_labels = 2
    return transformers.Dinov2ForImageClassification(config)


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
    config.num_labels = 2
    return transformers.SwinForImageClassification(config)


def _bart() -> nn.Module:
    config = transformers.BartConfig(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=4 * HIDDEN,
        decoder_ffn_dim=4 * HIDDEN,
        max_position_embeddings=32,
    )
    return transformers.BartForConditionalGeneration(config)


# BART's heads and hidden size are derived from each other, so only its FFNs can move: at these
# proportions a config-describable prune keeps at least 0.508 of its MACs (see the refusal test).
CASES = {
    "bart": Case(
        _bart, factories.lm_tensors_file, "distill", method="oba_full", target=0.55, slow=True
    ),
    "dinov2": Case(_dinov2, factories.image_tensors_file, "cross_entropy"),
    "distilbert": Case(_distilbert, factories.tensors_file, "cross_entropy"),
    "falcon": Case(_falcon, factories.lm_tensors_file, "causal_lm"),
    "gpt2": Case(_gpt2, factories.lm_tensors_file, "causal_lm"),
    "gpt_neox": Case(_gpt_neox, factories.lm_tensors_file, "causal_lm"),
    "opt": Case(_opt, factories.lm_tensors_file, "causal_lm"),
    "starcoder2": Case(_starcoder2, factories.lm_tensors_file, "causal_lm"),
    "swin": Case(_swin, factories.image_tensors_file, "cross_entropy"),
}


def _execute(tmp_path: Path, case: Case, target: float) -> tuple[dict[str, Any], Path]:
    """The job on `case` uploaded as an hf folder: its result and its hf archive."""
    torch.manual_seed(0)
    folder = tmp_path / "upload"
    case.build().save_pretrained(folder)
    spec = factories.spec(
        outputs=["hf"],
        loss=case.loss,
        method=case.method,
        target={"macs": target},
        calibration={"batches": 2, "batch_size": 4},
    )
    data = case.data(tmp_path / "data.safetensors")
    (tmp_path / "work").mkdir()
    result, exports = execute(
        spec,
        JobFiles(folder, "hf", data, "tensors", None, tmp_path / "work"),
        torch.device("cpu"),
        False,
        lambda progress: None,
    )
    [hf] = [e.path for e in exports if e.format == "hf"]
    return result, hf


def test_every_described_family_has_its_case() -> None:
    assert set(FAMILIES) <= set(CASES)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] * CASES[n].slow) for n in sorted(CASES)]
)
def test_prunes_to_its_target_with_an_hf_output_that_reloads(tmp_path: Path, name: str) -> None:
    case = CASES[name]

    result, hf = _execute(tmp_path, case, case.target)

    assert result["macs_after"] <= case.target * result["macs_before"]
    assert result["exports"]["hf"]["relative_diff"] <= 1e-4  # the job's own reload check
    with zipfile.ZipFile(hf) as bundle:
        bundle.extractall(tmp_path / "reloaded")
    config: Any = transformers.AutoConfig.from_pretrained(tmp_path / "reloaded")
    model = getattr(transformers, config.architectures[0]).from_pretrained(tmp_path / "reloaded")
    inputs = {
        k: torch.zeros(shape, dtype=torch.long if k == "input_ids" else torch.float)
        for k, shape in result["example_inputs"].items()
    }
    reloaded = measure(model.eval(), inputs)
    assert (reloaded.macs, reloaded.params) == (result["macs_after"], result["params_after"])


def test_bart_at_half_its_macs_is_refused_with_what_it_can_reach(tmp_path: Path) -> None:
    with pytest.raises(TargetUnreachable) as refused:
        _execute(tmp_path, CASES["bart"], 0.5)

    assert 0.5 < refused.value.reachable <= CASES["bart"].target
    assert "\n" not in str(refused.value)
