"""Every head's size where the config states it apart from the hidden size and heads stay (T5's
`d_kv`): dimension j of head h is row h·d + j of q, k and v and that column of o, pruned
together, the same count from every head, and stated back as `d_kv`."""

import copy
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from tests.worker.family_zoo import FAMILIES, VOCAB
from worker.engine import PruneConfig, prune_
from worker.engine.head_dims import head_dim_layers
from worker.engine.plan import Plan, apply_plan_


def _batch(seed: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (4, 10), generator=generator)
    decoder = torch.randint(4, VOCAB, (4, 6), generator=generator)
    return {"input_ids": ids, "decoder_input_ids": decoder, "use_cache": False}


def _loss(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    logits = model(**batch).logits
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, :6].reshape(-1)
    )


def _t5() -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES["t5"].build().eval()


def test_removing_a_dimension_equals_silencing_its_query_row_and_output_column() -> None:
    model = _t5()
    reference = copy.deepcopy(model)
    [first, *_] = head_dim_layers(model)
    [silenced, *_] = head_dim_layers(reference)
    d = first.head_dim
    removed = [[0], [3], [d - 1], [5]]  # one dimension of each of the 4 heads
    for head, [j] in enumerate(removed):
        silenced.owner.q.weight.data[head * d + j] = 0  # its q·k term
        silenced.owner.o.weight.data[:, head * d + j] = 0  # its value's way out

    first.remove_dims_(removed)

    assert first.head_dim == d - 1
    assert first.owner.inner_dim == first.heads * (d - 1)
    assert all(p.weight.shape[0] == 4 * (d - 1) for p in first.projections[:3])
    assert first.owner.o.weight.shape[1] == 4 * (d - 1)
    with torch.no_grad():
        torch.testing.assert_close(
            model(**_batch(1)).logits, reference(**_batch(1)).logits, rtol=0, atol=1e-5
        )


def test_removes_each_head_s_lowest_ranked_dimensions() -> None:
    model = _t5()
    [layer, *_] = head_dim_layers(model)
    q, k, v, o = (cast(nn.Parameter, p.weight) for p in layer.projections)
    d = layer.head_dim
    scores = {w: torch.zeros(w.shape, dtype=torch.float64) for w in (q, k, v, o)}
    for head in range(layer.heads):  # head h ranks its dimensions (j + h) mod d, lowest first
        for j in range(d):
            scores[q][head * d + j] = float((j + head) % d + 1)
    kept_rows = q.detach().clone()

    ranked = layer.rank_(scores, "oba")
    removed = layer.remove_([0, 1])

    assert ranked.shape == (d,) and bool((ranked[1:] >= ranked[:-1]).all())
    assert removed == [sorted({(-head) % d, (1 - head) % d}) for head in range(layer.heads)]
    expected = [
        kept_rows[head * d + j]
        for head in range(layer.heads)
        for j in range(d)
        if j not in removed[head]
    ]
    torch.testing.assert_close(layer.owner.q.weight.detach(), torch.stack(expected))


def test_t5_prunes_its_head_size_states_d_kv_and_replays_its_plan(tmp_path: Path) -> None:
    model = _t5()
    original = copy.deepcopy(model)
    result = prune_(
        model,
        _batch(0),
        [_batch(0), _batch(1)],
        _loss,
        PruneConfig(method="oba", target=0.5, steps=2, global_ranking=False),
    )

    sizes = {layer.head_dim for layer in head_dim_layers(model)}
    assert len(sizes) == 1 and sizes.pop() == result.config_updates["d_kv"] < 16
    assert result.macs <= 0.5 * result.initial_macs
    assert result.plan.head_dim_removals  # what the plan replays
    rebuilt = apply_plan_(original, _batch(0), Plan.from_json(result.plan.to_json()))
    rebuilt.load_state_dict(model.state_dict())
    model.save_pretrained(tmp_path)
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = model(**_batch(3)).logits
        for other in (reloaded, rebuilt.eval()):
            torch.testing.assert_close(other(**_batch(3)).logits, expected, rtol=0, atol=1e-5)
