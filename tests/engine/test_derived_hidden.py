"""The hidden size of encoder-decoders whose attention derives the head size from it (BART,
mBART, Whisper): d_model goes with the same count of dimensions from every head of every
attention, whose logits' new scale is folded into the query, so the config states d_model and
`from_pretrained` rebuilds the pruned model."""

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from tests.worker.family_zoo import FAMILIES, VOCAB
from worker.engine import PruneConfig, prune_
from worker.engine.architectures import hidden_size_problem
from worker.engine.head_dims import ScaledHeadDims, head_dim_layers
from worker.engine.plan import Plan, apply_plan_


def _batch(name: str, seed: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    decoder = torch.randint(4, VOCAB, (4, 6), generator=generator)
    if name == "whisper":
        return {"input_features": torch.randn(4, 8, 16, generator=generator)} | {
            "decoder_input_ids": decoder
        }
    ids = torch.randint(4, VOCAB, (4, 10), generator=generator)
    return {"input_ids": ids, "decoder_input_ids": decoder, "use_cache": False}


def _loss(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    logits = model(**batch).logits
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["decoder_input_ids"].reshape(-1)
    )


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES[name].build().eval()


def _scaled(model: nn.Module) -> list[ScaledHeadDims]:
    return [layer for layer in head_dim_layers(model) if isinstance(layer, ScaledHeadDims)]


def test_removing_a_dimension_folds_the_new_logit_scale_into_the_query() -> None:
    [first, *_] = _scaled(_model("bart"))
    with torch.no_grad():  # logits large enough that their scale shows in the softmax
        first.owner.q_proj.weight.mul_(30)
        first.owner.k_proj.weight.mul_(30)
    silenced = copy.deepcopy(first)
    d = first.head_dim
    removed = [[0], [3], [d - 1], [5]]  # one dimension of each of the 4 heads
    for head, [j] in enumerate(removed):
        silenced.owner.q_proj.weight.data[head * d + j] = 0  # its q·k term
        silenced.owner.q_proj.bias.data[head * d + j] = 0
        silenced.owner.out_proj.weight.data[:, head * d + j] = 0  # its value's way out

    first.remove_dims_(removed)

    assert first.head_dim == d - 1 and first.owner.scaling == (d - 1) ** -0.5
    assert first.owner.embed_dim == 4 * (d - 1)
    hidden = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = silenced.owner(hidden)[0]
        torch.testing.assert_close(first.owner(hidden)[0], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["bart", "whisper"])
def test_prunes_d_model_with_every_head_and_reloads(tmp_path: Path, name: str) -> None:
    """Whisper's first convolution is d_model wide too, and its encoder positions are a weight
    the traced graph does not see; BART's `shared` embedding is outside the forward pass. Both
    the `hf` folder and the plan replayed on the original (the `safetensors` output) rebuild
    the pruned model."""
    model = _model(name)
    result = prune_(
        model,
        _batch(name, 0),
        [_batch(name, 0), _batch(name, 1)],
        _loss,
        PruneConfig(method="oba", target=0.5, steps=2, global_ranking=False),
    )

    d_model = result.config_updates["hidden_size"]
    assert d_model < 64 and result.macs <= 0.5 * result.initial_macs
    assert {a.heads * a.head_dim for a in _scaled(model)} == {d_model}
    model.save_pretrained(tmp_path)
    reloaded = getattr(transformers, type(model).__name__).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = model(**_batch(name, 3)).logits
        torch.testing.assert_close(reloaded(**_batch(name, 3)).logits, expected, rtol=0, atol=1e-5)
    plan = Plan.from_json(json.loads(json.dumps(result.plan.to_json())))
    rebuilt = apply_plan_(_model(name), _batch(name, 0), plan)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**_batch(name, 3)).logits, expected, rtol=0, atol=1e-5)


def test_embeddings_scaled_by_the_root_of_d_model_keep_it() -> None:
    """The class computes √d_model from the config on reload: the hidden size stays."""
    config: Any = FAMILIES["bart"].build().config
    config.scale_embedding = True
    model = transformers.BartForConditionalGeneration(config).eval()

    problem = hidden_size_problem(model, _batch("bart", 0))

    assert problem == "its embeddings are scaled by √hidden_size (scale_embedding)"


def test_marian_keeps_d_model_and_says_why() -> None:
    """Marian computes its sinusoidal positions from d_model when it loads: pruned columns
    would come back as other frequencies, so the refusal names that, not the head size."""
    problem = hidden_size_problem(_model("marian"), _batch("marian", 0))

    assert problem == "its sinusoidal positions are computed from d_model when it loads, not saved"
