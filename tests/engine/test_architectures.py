"""Real architectures built by `transformers` from configs: prune, run, and round-trip."""

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import Tensor, nn

from tests.engine.hf_models import CASES, causal_lm_loss, inputs_of, lm_batches
from worker.engine import PruneConfig, PruneResult, architectures, prune_, reachable_fraction


def _pruned(
    name: str, global_ranking: bool, target: float = 0.7, **settings: Any
) -> tuple[Any, PruneResult]:
    build, data, loss = CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    batches = data(2, 0)
    config = PruneConfig(
        method="oba", target=target, steps=2, global_ranking=global_ranking, **settings
    )
    result = prune_(model, inputs_of(batches[0]), batches, loss, config)
    return model, result


def _attention(model: nn.Module) -> list[tuple[Any, int, list[Any]]]:
    """(module, head size, [query, key, value]) for BERT-style and q_proj-style attention."""
    found: list[tuple[Any, int, list[Any]]] = []
    m: Any
    for m in model.modules():
        if hasattr(m, "query") and hasattr(m, "attention_head_size"):
            found.append((m, m.attention_head_size, [m.query, m.key, m.value]))
        elif hasattr(m, "q_proj") and hasattr(m, "head_dim"):
            found.append((m, m.head_dim, [m.q_proj, m.k_proj, m.v_proj]))
    return found


@pytest.mark.parametrize("normalisation", ["max", "lamp_weights", "lamp_rank_sum"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_prunes_and_runs_forward_and_backward(name: str, normalisation: str) -> None:
    """Every architecture under the default allocation and under the rules of LAMP's widths
    (whose values come from the weights of each group's members, whatever modules they are)."""
    _, data, loss = CASES[name]
    model, result = _pruned(name, global_ranking=True, normalisation=normalisation)
    batch = data(1, 5)[0]

    assert result.macs < result.initial_macs
    value = loss(model, batch)
    value.backward()
    assert torch.isfinite(value)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_heads_in_modules_and_config_agree(name: str) -> None:
    model, _ = _pruned(name, global_ranking=True, target=0.5)
    attention = _attention(model)

    assert attention
    for module, head_size, (query, key, value) in attention:
        assert module.num_attention_heads * head_size == query.out_features
        assert getattr(module, "all_head_size", query.out_features) == query.out_features
        assert key.out_features == value.out_features == query.out_features
    heads = {m.num_attention_heads for m, _, _ in attention}
    assert min(heads) < 4  # heads were pruned
    if len(heads) == 1:
        assert model.config.num_attention_heads == heads.pop()


@pytest.mark.parametrize("name", ["bert", "vit", "gpt2", "llama"])
def test_uniform_widths_round_trip_through_save_pretrained(name: str, tmp_path: Path) -> None:
    _, data, _ = CASES[name]
    model, result = _pruned(name, global_ranking=False)
    inputs = inputs_of(data(1, 9)[0])
    assert result.config_updates
    assert result.macs < result.initial_macs

    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()

    with torch.no_grad():
        expected = model(**inputs).logits
        actual = reloaded(**inputs).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


class _CappedOutput(nn.Module):
    """The output comes from a non-leaf op, allocated after an inner layer's output was freed."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(256, 256), nn.Linear(256, 256)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.inner(x)
        logits = self.head(hidden)
        del hidden  # its memory is free for the next tensor of its size
        return torch.tanh(logits)


def test_an_output_no_leaf_produced_names_no_layer_even_at_a_freed_layers_address() -> None:
    # once the inner layer's output was freed, tanh's result took its address and the inner
    # layer was named an output layer, so it was never pruned (Gemma 2's soft-capped logits)
    assert architectures.output_layers(_CappedOutput(), torch.randn(8, 256)) == []


def _bart(encoder_ffn: int, decoder_ffn: int) -> nn.Module:
    config = transformers.BartConfig(
        vocab_size=64,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=encoder_ffn,
        decoder_ffn_dim=decoder_ffn,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.BartForConditionalGeneration(config).eval()


def test_each_stack_of_an_encoder_decoder_states_its_own_ffn_width(tmp_path: Path) -> None:
    model = _bart(encoder_ffn=128, decoder_ffn=96)
    batches = lm_batches(2, 0)

    result = prune_(
        model,
        inputs_of(batches[0]),
        batches,
        causal_lm_loss,
        PruneConfig(method="oba", target=0.7, steps=2, global_ranking=False),
    )

    encoder, decoder = (result.config_updates[f"{s}_ffn_dim"] for s in ("encoder", "decoder"))
    assert encoder < 128 and encoder * 3 == decoder * 4  # each stack uniform, in step
    model.save_pretrained(tmp_path)
    reloaded = transformers.BartForConditionalGeneration.from_pretrained(tmp_path).eval()
    inputs = inputs_of(lm_batches(1, 9)[0])
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-5
        )


def test_an_ffn_no_description_names_is_kept_whole() -> None:
    """GPT-J's `fc_in` under a model type no family describes (as GPT-J was before its entry):
    its width was pruned while `n_inner` stayed, and the output did not reload. Now the FFN
    stays whole, and a target that needs it is refused."""
    config = transformers.GPTJConfig(
        vocab_size=64, n_embd=32, n_inner=128, n_layer=2, n_head=4, n_positions=32, rotary_dim=4
    )
    model = transformers.GPTJForCausalLM(config).eval()
    inputs = inputs_of(lm_batches(1, 0)[0])
    assert len(architectures.ffn_layers(model)) == 2  # described: `mlp.fc_in`, `n_inner`

    model.config.model_type = "an_undescribed_family"

    assert architectures.ffn_layers(model) == {}
    assert reachable_fraction(model, inputs, PruneConfig(target=0.5, global_ranking=False)) == 1


@pytest.mark.parametrize(
    ("sizes", "integral"),
    [
        ([(15, 11), (30, 22)], False),  # 11 × (15 / 11) is 14.99…: one neuron short
        ([(160, 96), (320, 192)], False),  # Swin: a stage of twice the width, the same ratio
        ([(96, 48)], True),  # DINOv2's config types mlp_ratio as an integer
    ],
)
def test_a_ratio_field_rebuilds_every_width_exactly(
    sizes: list[tuple[int, int]], integral: bool
) -> None:
    """(width, hidden) per layer: the class builds int(hidden × ratio) neurons."""
    ratio = architectures._ratio(sizes, integral)

    assert ratio is not None
    assert all(int(hidden * ratio) == width for width, hidden in sizes)
    assert isinstance(ratio, int) == integral


def test_a_ratio_the_layers_do_not_share_is_not_written() -> None:
    assert architectures._ratio([(56, 96), (100, 192)], integral=False) is None
    assert architectures._ratio([(72, 48)], integral=True) is None
