"""`distill` on models without a task head: the embedding it compares, zero at the start, and
the engine's exact scores through it (a Hessian-vector product needs it twice differentiable)."""

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from torch import nn

from tests.worker import factories
from worker.engine import parameter_scores
from worker.pipeline import finetune, losses, models, steps


def _bert() -> transformers.BertModel:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config).eval()


def _text_batch(masked: bool) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(1)
    batch: dict[str, Any] = {"input_ids": torch.randint(4, 30, (4, 8), generator=generator)}
    if masked:
        lengths = torch.tensor([8, 5, 3, 6])
        # (rows, tokens): 1 on each row's first `length` tokens, 0 on the padding after them
        batch["attention_mask"] = (torch.arange(8) < lengths[:, None]).long()
    return batch


def _check_distillation(
    model: nn.Module, batches: list[dict[str, Any]], pooling: models.Pooling | None = None
) -> None:
    """Zero at student = teacher, positive once the student moves, and finite, non-zero
    `oba_full` scores (a Hessian-vector product taken through the loss)."""
    loss = losses.make_loss("distill", model, pooling)
    moved = copy.deepcopy(model)
    torch.manual_seed(2)
    with torch.no_grad():
        for parameter in moved.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        assert float(loss(model, batches[0])) == pytest.approx(0.0, abs=1e-5)
        assert float(loss(moved, batches[0])) > 1e-3

    scores = parameter_scores(model, batches, loss, "oba_full")

    assert all(torch.isfinite(s).all() for s in scores.values())
    assert sum(float(s.abs().sum()) for s in scores.values()) > 0


@pytest.mark.parametrize("masked", [True, False])
def test_a_bert_without_head_is_compared_on_its_mean_token_state(masked: bool) -> None:
    model = _bert()
    batch = _text_batch(masked)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
        rows = losses.representations(model(**batch), batch, None)

    mask = batch.get("attention_mask", torch.ones(4, 8, dtype=torch.long))
    expected = torch.stack([hidden[r, mask[r].bool()].mean(0) for r in range(4)])
    assert list(rows) == ["hidden"]
    torch.testing.assert_close(rows["hidden"], expected)
    _check_distillation(model, [batch, _text_batch(masked)])


def test_padding_the_batch_leaves_a_masked_representation_alone() -> None:
    model = _bert()
    batch = _text_batch(masked=True)
    # four more padding tokens on every row: masked out, they must not count
    padded = {k: torch.cat([v, torch.zeros(4, 4, dtype=v.dtype)], dim=1) for k, v in batch.items()}
    with torch.no_grad():
        short = losses.representations(model(**batch), batch, None)["hidden"]
        long = losses.representations(model(**padded), padded, None)["hidden"]
    torch.testing.assert_close(short, long, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("pooling", "normalize"),
    [
        ({"pooling_mode_mean_tokens": True}, True),
        ({"pooling_mode_mean_tokens": True}, False),
        ({"pooling_mode_cls_token": True}, True),
        ({"pooling_mode": "max"}, True),
        ({"pooling_mode": ["cls", "mean"]}, False),
    ],
)
def test_a_sentence_transformers_folder_is_compared_on_its_sentence_embedding(
    tmp_path: Path, pooling: dict[str, Any], normalize: bool
) -> None:
    folder = factories.sentence_transformers_folder(tmp_path, pooling=pooling, normalize=normalize)
    loaded = models.load(folder, "hf", trusted=False)
    texts = ["good movie", "the plot a bad awful film", "acting", "a great great film the end"]
    library = SentenceTransformer(str(folder), device="cpu")
    features = library.preprocess(texts)
    batch = {k: v for k, v in features.items() if isinstance(v, torch.Tensor)}
    assert batch["attention_mask"].min() == 0  # rows of different lengths: padding is masked

    with torch.no_grad():
        ours = losses.representations(loaded.model(**batch), batch, loaded.pooling)

    assert loaded.pooling is not None and loaded.pooling.normalize is normalize
    expected = library.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(ours["sentence"], expected, atol=1e-5, rtol=1e-5)
    _check_distillation(loaded.model, [batch], loaded.pooling)


def test_a_vit_without_head_is_compared_on_its_mean_token_state() -> None:
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    model = transformers.ViTModel(config).eval()
    batches = [{"pixel_values": torch.randn(4, 3, 16, 16)} for _ in range(2)]
    with torch.no_grad():
        rows = losses.representations(model(**batches[0]), batches[0], None)
        expected = model(**batches[0]).last_hidden_state.mean(1)  # (rows, 17 tokens, 32) → mean

    torch.testing.assert_close(rows["hidden"], expected)
    _check_distillation(model, batches)


def test_a_clip_text_tower_with_projection_is_compared_on_its_text_embeds() -> None:
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        vocab_size=30,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=16,
        max_position_embeddings=16,
    )
    model = transformers.CLIPTextModelWithProjection(config).eval()
    batch = _text_batch(masked=True)
    with torch.no_grad():
        rows = losses.representations(model(**batch), batch, None)

    assert list(rows) == ["text_embeds"] and rows["text_embeds"].shape == (4, 16)
    _check_distillation(model, [batch])


def test_the_embedding_distance_is_scale_free_and_counts_direction_and_length() -> None:
    teacher = torch.tensor([[3.0, 4.0], [1.0, 0.0]])

    assert float(losses.embedding_distance(teacher, teacher)) == pytest.approx(0.0, abs=1e-7)
    # the first row twice as long: cosine 1, relative error ‖t‖²/‖t‖² = 1 → mean (1 + 0) / 2
    longer = torch.tensor([[6.0, 8.0], [1.0, 0.0]])
    assert float(losses.embedding_distance(longer, teacher)) == pytest.approx(0.5)
    # turned by 90°: 1 − cos = 1, relative error 2 → mean (0 + 3) / 2
    turned = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert float(losses.embedding_distance(turned, teacher)) == pytest.approx(1.5)
    # scale-free: both scaled together, the same distance
    assert float(losses.embedding_distance(100 * turned, 100 * teacher)) == pytest.approx(1.5)


@pytest.mark.parametrize("head", [False, True])
def test_the_teacher_runs_once_per_batch_and_its_kept_targets_give_the_same_loss(
    head: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model: nn.Module = _bert()
    if head:  # logits: KL against kept log-probabilities
        config = _bert().config
        config.num_labels = 3
        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification(config).eval()
    batches = [_text_batch(masked=True), _text_batch(masked=False)]
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in moved.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    monkeypatch.setattr(losses, "TEACHER_CACHE_BYTES", 0)  # nothing fits: computed each time
    uncached = losses.make_loss("distill", model)
    with torch.no_grad():
        fresh = [float(uncached(moved, b)) for b in batches]
    monkeypatch.undo()
    teacher_passes: list[int] = []
    model.register_forward_hook(lambda *_: teacher_passes.append(1))  # the teacher's copy too
    loss = losses.make_loss("distill", model)

    with torch.no_grad():
        again = [[float(loss(moved, b)) for b in batches] for _ in range(3)]

    assert again == [fresh] * 3
    assert len(teacher_passes) == len(batches)  # once per batch, then kept


@pytest.mark.parametrize(
    ("loss", "distill", "searching", "fine_tune_distils", "teacher_kept"),
    [
        ("causal_lm", None, False, True, True),  # a causal LM's fine-tune distils by default
        ("causal_lm", False, False, False, False),
        ("causal_lm", False, True, False, True),  # its search's candidates still do
        ("cross_entropy", None, False, False, False),
        ("cross_entropy", True, False, True, True),
        ("distill", None, False, False, False),  # the job's loss is that distillation already
    ],
)
def test_which_fine_tunes_distil_from_the_uploaded_model(
    loss: str, distill: bool | None, searching: bool, fine_tune_distils: bool, teacher_kept: bool
) -> None:
    spec = factories.spec(
        loss=loss,
        finetune={"epochs": 1, "distill": distill},
        evaluation={"fraction": 0.2},
        search={"candidates": 2 if searching else 1},
    )
    assert spec.finetune_distils is fine_tune_distils
    assert spec.distils_from_the_original is teacher_kept


def test_a_causal_lm_fine_tunes_by_kl_from_the_model_as_uploaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, _ = factories.architecture_folder(tmp_path, "llama")
    data = factories.lm_tensors_file(tmp_path / "data.safetensors", rows=32)
    (tmp_path / "work").mkdir()
    files = steps.JobFiles(folder, "hf", data, "tensors", None, tmp_path / "work")
    used: list[losses.LossFn] = []
    real = finetune.finetune_

    def recorded(
        net: nn.Module, batches: Any, loss_fn: losses.LossFn, *args: Any, **kw: Any
    ) -> None:
        used.append(loss_fn)
        real(net, batches, loss_fn, *args, **kw)

    monkeypatch.setattr(finetune, "finetune_", recorded)
    spec = factories.spec(loss="causal_lm", finetune={"epochs": 1, "lr": 1e-3})

    result, _ = steps.execute(spec, files, torch.device("cpu"), False, lambda _: None)

    (loss_fn,) = used
    assert loss_fn is not losses.causal_lm
    uploaded = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    batch = {"input_ids": load_file(str(data))["input_ids"][:2]}
    with torch.no_grad():  # the teacher is the model as uploaded, not as pruned
        assert float(loss_fn(uploaded, batch)) == pytest.approx(0, abs=1e-6)
    assert result.after_finetune is not None
