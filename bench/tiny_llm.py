"""A tiny Llama-style causal LM with grouped-query attention, pruned to half its non-embedding
parameters by the engine, Torch-Pruning and a Minitron recipe; held-out perplexity before and
after pruning and after a short distillation fine-tune.

The model (`MODEL`): transformers' `LlamaForCausalLM`, byte-level (vocabulary 256), hidden 128,
4 decoder blocks, 8 query heads of 16 dims sharing 4 key/value heads (GQA, 2 query heads per
KV head), `head_dim` stated in the config, SwiGLU FFN of 352 (2.75×), untied input and output
embeddings (Llama's default; with 256 bytes they are 8% of the parameters either way). It is
trained here on CPU on the Jargon File (see `text_corpus.py`) and cached under
var/bench/tiny_llm/ (keyed by model, training settings and corpus hash), so reruns skip training.

Every row starts from the same trained model, is pruned to ≤ 50% of its non-embedding
parameters (everything but `embed_tokens` and `lm_head`; precisely: half the blocks' parameters
plus the final norm, so that half the blocks fit), and then gets the same distillation
fine-tune (KL to the unpruned model's next-byte distribution, `Distill`). Perplexity is per byte
on `EVAL_WINDOWS` fixed windows of the held-out text.

Rows:
- ours: `worker.engine.prune` with the causal-LM cross-entropy (`worker.pipeline.losses.causal_lm`)
  on the calibration batches, methods `oba`, `oba_full`, `taylor`, `magnitude`, on three axes: width
  (`granularity="channel"`: FFN neurons, whole KV groups, hidden size), depth
  (`granularity="layer"`: whole decoder blocks) and both (`granularity="channel"`,
  `depth_share=0.5`, `--depth-share`). Uniform widths (`global_ranking=False`: what a Llama config
  can state), and optionally global ranking (`--global-rows`). The target is set on the engine's
  `params` metric (all parameters) so that the non-embedding parameters land at ≤ 50%; where pruning
  the hidden size also shrinks the embeddings, reruns ask for less than the previous run kept.
- Torch-Pruning 1.6.1: `MagnitudeImportance`, `TaylorImportance` and `HessianImportance` (with its
  accumulation bug fixed, `FixedHessianImportance`) run by `tp.pruner.BasePruner` as its own
  Llama example does (local, i.e. uniform, ratio; one shot) on FFN neurons and the hidden size:
  it cannot build the attention-head groups of this GQA model (see `tp_prune`). Its ratio counts
  channels: it is searched until the non-embedding parameters land at ≤ 50%.
- Minitron (ModelOpt's recipe, written here from its description): width importance is the mean
  |activation| per FFN neuron (input of `down_proj`), per head (L2 norm of each head's output
  before `o_proj`, averaged) and per hidden channel (RMSNorm outputs, summed over all norms);
  depth importance is ShortGPT's block influence 1 − cos(block input, block output). Width keeps
  the attention heads (as Minitron's published Llama/Mistral models do) and shrinks the hidden
  size and the FFN by the same factor (hidden at a multiple of the head count, as transformers'
  Llama config requires); depth drops the least influential blocks; both first drops the number
  of blocks nearest `KEPT ** depth_share` of them in log space, re-scores, then widths. One
  shot, structural removal by slicing the Linear/Embedding/RMSNorm weights here.

Every pruned model is saved with `save_pretrained` and reloaded with `from_pretrained`; the
`reloads` column says whether that round trip gives the same logits.

Needs `apt-get install jargon-text` (or `--corpus FILE`). docs/benchmarks/tiny-llm.md has the
results. Run `python -m bench.tiny_llm --help`; `--quick` is a shorter smoke run (fewer
calibration batches and held-out windows, 5 fine-tune steps) of every row.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from bench.common import markdown_table, set_threads
from bench.peers import FixedHessianImportance, peer_importance
from bench.text_corpus import (
    JARGON_FILE,
    VOCAB_SIZE,
    Corpus,
    even_windows,
    load_corpus,
    random_windows,
)
from worker.engine import InvalidConfig, PruneConfig, prune_
from worker.pipeline.losses import causal_lm, distillation

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "var" / "bench" / "tiny_llm"

MODEL: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}
KEPT = 0.5  # fraction of the non-embedding parameters to keep
DEPTH_SHARE = 0.5  # "both": share of the reduction (in log space) taken by removing blocks
EVAL_WINDOWS = 128  # held-out windows of SEQ bytes for perplexity
SEQ = 256


@dataclass(frozen=True)
class Training:
    steps: int = 600
    batch: int = 16
    lr: float = 3e-3
    warmup: int = 30
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class Distill:
    steps: int = 100
    batch: int = 8
    lr: float = 1e-3
    warmup: int = 10
    seed: int = 1


@dataclass(frozen=True)
class Calibration:
    batches: int = 4
    size: int = 4  # sequences of SEQ bytes per batch
    seed: int = 2


@dataclass
class Row:
    method: str
    axis: str
    kept_nonemb: float | None = None  # achieved fraction of non-embedding parameters
    ppl_pruned: float | None = None
    ppl_distilled: float | None = None
    seconds: float | None = None  # pruning wall time (scoring included; not the fine-tune)
    reloads: bool | None = None
    shape: str = ""  # layers / hidden / FFN / query heads / KV heads after pruning
    note: str = ""


# --------------------------------------------------------------------------------------------
# Model, training, evaluation


def build_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**MODEL, "attn_implementation": "sdpa"}))


def embedding_params(model: LlamaForCausalLM) -> int:
    embeddings = {model.get_input_embeddings().weight, model.get_output_embeddings().weight}
    return sum(p.numel() for p in embeddings)


def hidden_width(model: LlamaForCausalLM) -> int:
    return int(model.model.embed_tokens.weight.shape[1])


def nonembedding_params(model: LlamaForCausalLM) -> int:
    return sum(p.numel() for p in model.parameters()) - embedding_params(model)


def nonembedding_goal(model: LlamaForCausalLM) -> int:
    """`KEPT` of the decoder blocks' parameters, plus the final norm (so half the blocks fit)."""
    final_norm = model.model.norm.weight.numel()
    return math.floor(KEPT * (nonembedding_params(model) - final_norm)) + final_norm


def shape_of(model: LlamaForCausalLM) -> str:
    layers = model.model.layers
    if not layers:
        return "0 layers"
    attn = layers[0].self_attn
    d = attn.head_dim
    ffn = {int(layer.mlp.down_proj.in_features) for layer in layers}
    heads = {int(layer.self_attn.q_proj.out_features) // d for layer in layers}
    kv = {int(layer.self_attn.k_proj.out_features) // d for layer in layers}

    def fmt(values: set[int]) -> str:
        return str(values.pop()) if len(values) == 1 else f"{min(values)}–{max(values)}"

    hidden = hidden_width(model)
    origin = [getattr(layer, "bench_origin", None) for layer in layers]
    blocks = (
        "blocks " + ",".join(str(i) for i in origin) if None not in origin else f"{len(layers)}L"
    )
    return f"{blocks} h{hidden} ffn{fmt(ffn)} q{fmt(heads)} kv{fmt(kv)}"


def batch_of(tokens: Tensor) -> dict[str, Any]:
    return {"input_ids": tokens, "use_cache": False}


def _lr_factor(step: int, steps: int, warmup: int, final: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def train(corpus: Corpus, settings: Training, log_every: int = 50) -> LlamaForCausalLM:
    """AdamW (β = 0.9, 0.95; decay on matrices only), linear warm-up then cosine decay."""
    model = build_model(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay},
    ]
    optimizer = torch.optim.AdamW(
        groups,
        lr=settings.lr,
        betas=(0.9, 0.95),
        weight_decay=0.0,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: _lr_factor(s, settings.steps, settings.warmup, settings.final_lr_fraction),
    )
    model.train()
    started = time.perf_counter()
    for step in range(settings.steps):
        tokens = random_windows(corpus.train, settings.batch, SEQ, generator)
        loss = causal_lm(model, batch_of(tokens))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % log_every == 0 or step == 0:
            elapsed = time.perf_counter() - started
            print(f"  step {step + 1}/{settings.steps}: loss {loss.item():.3f} ({elapsed:.0f} s)")
    model.eval()
    return model


def cache_key(corpus: Corpus, settings: Training) -> str:
    blob = json.dumps(
        {"model": MODEL, "training": dataclasses.asdict(settings), "corpus": corpus.sha256},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def trained_model(corpus: Corpus, settings: Training, cache: Path) -> tuple[LlamaForCausalLM, dict]:
    """The trained model from the cache, or trained now and cached. Also its training record."""
    folder = cache / cache_key(corpus, settings)
    record_file = folder / "training.json"
    if record_file.exists():
        model = LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
        model.eval()
        return model, json.loads(record_file.read_text())
    print(f"training the model ({settings.steps} steps); cached in {folder}")
    started = time.perf_counter()
    model = train(corpus, settings)
    seconds = time.perf_counter() - started
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    record = {
        "seconds": round(seconds, 1),
        "training": dataclasses.asdict(settings),
        "tokens_seen": settings.steps * settings.batch * SEQ,
        "corpus": corpus.description,
    }
    record_file.write_text(json.dumps(record, indent=2))
    return model, record


def tagged_model(corpus: Corpus, settings: Training, cache: Path) -> tuple[LlamaForCausalLM, dict]:
    """`trained_model`, each block tagged with its position (`bench_origin`: which blocks
    survive depth pruning; copied with the model)."""
    dense, record = trained_model(corpus, settings, cache)
    for index, layer in enumerate(dense.model.layers):
        layer.bench_origin = index
    return dense, record


def perplexity(model: nn.Module, windows: Tensor, batch: int = 32) -> float:
    """exp(mean next-byte cross-entropy) over every predicted byte of `windows` (eval mode)."""
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch):
        logits = model(input_ids=chunk, use_cache=False).logits[:, :-1]
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


def distill_finetune(
    student: nn.Module, teacher: nn.Module, corpus: Corpus, settings: Distill
) -> None:
    """The fine-tune every pruned model gets: KL(teacher ‖ student) per byte, AdamW, cosine.

    The same windows in the same order for every row (`settings.seed`)."""
    loss_fn = distillation(teacher)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, settings.steps, settings.warmup, 0.0)
    )
    student.train()
    for _ in range(settings.steps):
        tokens = random_windows(corpus.train, settings.batch, SEQ, generator)
        # worker.pipeline.losses.distillation averages over rows: (batch·tokens) next-byte
        # distributions
        loss = loss_fn(student, batch_of(tokens))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    student.eval()


def calibration_batches(corpus: Corpus, settings: Calibration) -> list[dict[str, Any]]:
    """The batches every criterion scores on (ours, Torch-Pruning's, Minitron's)."""
    generator = torch.Generator().manual_seed(settings.seed)
    return [
        batch_of(random_windows(corpus.train, settings.size, SEQ, generator))
        for _ in range(settings.batches)
    ]


@torch.no_grad()
def reloads(model: LlamaForCausalLM, probe: Tensor) -> bool:
    """Does save_pretrained + from_pretrained give back the same logits?"""
    model.eval()
    expected = model(input_ids=probe, use_cache=False).logits
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        again = LlamaForCausalLM.from_pretrained(folder)
        again.eval()
        got = again(input_ids=probe, use_cache=False).logits
    return bool(torch.allclose(expected, got, atol=1e-4, rtol=1e-4))


def sync_config(model: LlamaForCausalLM) -> None:
    """Write the (uniform) pruned widths into the config and the attention modules."""
    config = model.config
    layers = model.model.layers
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types)[: len(layers)]
    config.hidden_size = hidden_width(model)
    for index, layer in enumerate(layers):
        attn = layer.self_attn
        heads = attn.q_proj.out_features // attn.head_dim
        kv_heads = attn.k_proj.out_features // attn.head_dim
        attn.num_key_value_groups = heads // kv_heads
        attn.layer_idx = index
        config.num_attention_heads = heads
        config.num_key_value_heads = kv_heads
        config.intermediate_size = int(layer.mlp.down_proj.in_features)


# --------------------------------------------------------------------------------------------
# Structural surgery by hand (Minitron rows)


def _slice_linear(linear: nn.Linear, out_idx: Tensor | None, in_idx: Tensor | None) -> None:
    weight = linear.weight.detach()
    if out_idx is not None:
        weight = weight[out_idx]
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach()[out_idx].clone())
        linear.out_features = len(out_idx)
    if in_idx is not None:
        weight = weight[:, in_idx]
        linear.in_features = len(in_idx)
    linear.weight = nn.Parameter(weight.clone())


def _slice_norm(norm: Any, idx: Tensor) -> None:
    norm.weight = nn.Parameter(norm.weight.detach()[idx].clone())


def keep_blocks(model: LlamaForCausalLM, keep: Sequence[int]) -> None:
    layers = model.model.layers
    model.model.layers = nn.ModuleList([layers[i] for i in sorted(keep)])
    sync_config(model)


def keep_hidden(model: LlamaForCausalLM, idx: Tensor) -> None:
    """Keep the residual-stream channels `idx` everywhere they appear."""
    idx = idx.sort().values
    embed = model.model.embed_tokens
    embed.weight = nn.Parameter(embed.weight.detach()[:, idx].clone())
    embed.embedding_dim = len(idx)
    for layer in model.model.layers:
        _slice_norm(layer.input_layernorm, idx)
        _slice_norm(layer.post_attention_layernorm, idx)
        attn, mlp = layer.self_attn, layer.mlp
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _slice_linear(linear, None, idx)
        for linear in (attn.o_proj, mlp.down_proj):
            _slice_linear(linear, idx, None)
    _slice_norm(model.model.norm, idx)
    _slice_linear(model.get_output_embeddings(), None, idx)
    sync_config(model)


def keep_ffn(model: LlamaForCausalLM, per_layer: Sequence[Tensor]) -> None:
    for layer, idx in zip(model.model.layers, per_layer, strict=True):
        idx = idx.sort().values
        _slice_linear(layer.mlp.gate_proj, idx, None)
        _slice_linear(layer.mlp.up_proj, idx, None)
        _slice_linear(layer.mlp.down_proj, None, idx)
    sync_config(model)


def nonembedding_formula(
    layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, head_dim: int
) -> int:
    """Non-embedding parameters of a bias-free Llama of these (uniform) widths."""
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    return layers * (attention + 3 * hidden * ffn + 2 * hidden) + hidden


# --------------------------------------------------------------------------------------------
# Minitron (NVIDIA ModelOpt's recipe, from its description)


@dataclass
class MinitronScores:
    ffn: list[Tensor]  # per layer: mean |act(gate)·up| per neuron
    heads: list[Tensor]  # per layer: mean L2 norm of each query head's output
    hidden: Tensor  # mean |RMSNorm output| per channel, summed over every norm
    block_influence: Tensor  # per layer: 1 − mean cos(block input, block output)


@torch.no_grad()
def minitron_scores(model: LlamaForCausalLM, batches: list[dict[str, Any]]) -> MinitronScores:
    layers = list(model.model.layers)
    count = len(batches)
    ffn = [torch.zeros(layer.mlp.down_proj.in_features) for layer in layers]
    heads = [
        torch.zeros(layer.self_attn.q_proj.out_features // layer.self_attn.head_dim)
        for layer in layers
    ]
    hidden = torch.zeros(hidden_width(model))
    influence = torch.zeros(len(layers))
    handles = []

    def on_down(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            ffn[i] += args[0].abs().mean(dim=(0, 1)) / count

        return hook

    def on_o(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0]
            per_head = x.view(*x.shape[:-1], -1, layers[i].self_attn.head_dim)
            heads[i] += per_head.norm(dim=-1).mean(dim=(0, 1)) / count

        return hook

    def on_norm(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        hidden.add_(output.abs().mean(dim=(0, 1)) / count)

    def on_block(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict, output: Any) -> None:
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(x_in, x_out, dim=-1)
            influence[i] += (1 - cos).mean() / count

        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(i)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o(i)))
        handles.append(layer.register_forward_hook(on_block(i), with_kwargs=True))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            handles.append(norm.register_forward_hook(on_norm))
    handles.append(model.model.norm.register_forward_hook(on_norm))
    model.eval()
    try:
        for batch in batches:
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return MinitronScores(ffn, heads, hidden, influence)


def depth_blocks_to_remove(layers: int, depth_kept: float) -> int:
    """Blocks to drop so the kept share of blocks is nearest `depth_kept` in log space."""
    kept = min(range(1, layers + 1), key=lambda k: abs(math.log(k / layers) - math.log(depth_kept)))
    return layers - kept


def _size(config: Any, layers: int, hidden: int, ffn: int) -> int:
    """Non-embedding parameters with these widths and the config's heads."""
    return nonembedding_formula(
        layers,
        hidden,
        ffn,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )


def minitron_prune(
    model: LlamaForCausalLM,
    batches: list[dict[str, Any]],
    axis: str,
    goal: int,
    depth_share: float = DEPTH_SHARE,
) -> None:
    """Prune in place to ≤ `goal` non-embedding parameters, one shot, uniform widths."""
    config: Any = model.config
    blocks = config.num_hidden_layers
    if axis in ("depth", "both"):
        scores = minitron_scores(model, batches)
        if axis == "depth":
            hidden, ffn = config.hidden_size, config.intermediate_size
            drop = next(k for k in range(blocks) if _size(config, blocks - k, hidden, ffn) <= goal)
        else:
            drop = depth_blocks_to_remove(blocks, KEPT**depth_share)
        order = torch.argsort(scores.block_influence).tolist()  # least influential first
        keep_blocks(model, [i for i in range(blocks) if i not in order[:drop]])
        if axis == "depth":
            return
    scores = minitron_scores(model, batches)  # re-scored after dropping blocks
    blocks = config.num_hidden_layers
    hidden, ffn = config.hidden_size, config.intermediate_size

    def size(h: int, f: int) -> int:
        return _size(config, blocks, h, f)

    # hidden and FFN shrink by the same factor r (heads kept): the largest r that fits ...
    lo, hi = 0.0, 1.0
    for _ in range(40):
        r = (lo + hi) / 2
        if size(round(hidden * r), round(ffn * r)) <= goal:
            lo = r
        else:
            hi = r
    # ... with the hidden size rounded to a multiple of the query heads (transformers' Llama
    # config refuses anything else, head_dim or not), then the most FFN neurons that fit
    heads = config.num_attention_heads
    new_hidden = max(heads, round(hidden * lo / heads) * heads)
    new_ffn = ffn
    while size(new_hidden, new_ffn) > goal:
        new_ffn -= 1
    keep_ffn(model, [s.topk(new_ffn).indices for s in scores.ffn])
    keep_hidden(model, scores.hidden.topk(new_hidden).indices)


# --------------------------------------------------------------------------------------------
# Torch-Pruning 1.6.1 peers

TP_CRITERIA = ("magnitude", "taylor", "hessian")


def _tp_gradients(
    criterion: str,
    importance: tp.importance.Importance,
    model: nn.Module,
    batches: list[dict[str, Any]],
) -> None:
    """What the criterion reads: the mean-loss gradient (Taylor), or squared per-sequence
    gradients accumulated by the fixed Hessian importance (one backward per sequence)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    if criterion == "taylor":
        for batch in batches:
            (causal_lm(model, batch) / len(batches)).backward()
    elif criterion == "hessian":
        assert isinstance(importance, FixedHessianImportance)
        importance.zero_grad()
        for batch in batches:
            for row in batch["input_ids"]:
                model.zero_grad(set_to_none=True)
                causal_lm(model, batch_of(row[None])).backward()
                importance.accumulate_grad(model)
        for param in model.parameters():  # the importance reads its averages, not .grad
            param.grad = torch.zeros_like(param)


def tp_prune(
    dense: LlamaForCausalLM, criterion: str, ratio: float, batches: list[dict[str, Any]]
) -> LlamaForCausalLM:
    """A copy of `dense` pruned by Torch-Pruning (one shot, local ratio, as its Llama example).

    FFN neurons and the hidden size only: Torch-Pruning 1.6.1 never finishes building the
    query/key/value head groups of transformers 5's GQA Llama (`get_pruning_group` on a `q_proj`
    or `k_proj` root runs for minutes without returning, eager and sdpa attention alike), so the
    projections' output channels are left out. Widths stay multiples of the query head count
    (`round_to`), which transformers' Llama config requires of the hidden size."""
    model = copy.deepcopy(dense)
    ignored: list[nn.Module] = [model.lm_head]
    for layer in model.model.layers:
        attn = layer.self_attn
        ignored += [attn.q_proj, attn.k_proj, attn.v_proj]
    importance = peer_importance(f"tp_{criterion}")
    pruner = tp.pruner.BasePruner(
        model,
        batch_of(batches[0]["input_ids"][:1]),
        importance=importance,
        global_pruning=False,
        pruning_ratio=ratio,
        ignored_layers=ignored,
        round_to=model.config.num_attention_heads,
        output_transform=lambda out: out.logits,
    )
    _tp_gradients(criterion, importance, model, batches)
    pruner.step()
    model.zero_grad(set_to_none=True)
    sync_config(model)
    model.eval()
    return model


def tp_ratio_for(dense: LlamaForCausalLM, goal: int, batches: list[dict[str, Any]]) -> float:
    """The smallest channel ratio that lands at ≤ `goal` non-embedding parameters.

    With local (uniform) pruning the widths follow from the ratio alone, whatever the criterion:
    the search runs once with magnitude."""
    lo, hi = 0.0, 0.9
    for _ in range(12):
        mid = (lo + hi) / 2
        if nonembedding_params(tp_prune(dense, "magnitude", mid, batches)) <= goal:
            hi = mid
        else:
            lo = mid
    return hi


# --------------------------------------------------------------------------------------------
# Our engine

ENGINE_METHODS = ("oba", "oba_full", "taylor", "magnitude")
AXES = ("width", "depth", "both")
ENGINE_STEPS = 5
# runs with the target lowered by the overshoot (pruning the hidden size shrinks the embeddings)
ENGINE_ATTEMPTS = 3


def engine_config(
    method: str,
    axis: str,
    global_ranking: bool,
    target: float,
    depth_share: float,
    **allocation: Any,
) -> PruneConfig:
    """The engine's configuration for a row (`allocation`: `schedule`, `block_score`,
    `hidden_size`, as a search varies them); `NotAvailable` names what the engine lacks."""
    fields = {f.name for f in dataclasses.fields(PruneConfig)}
    kwargs: dict[str, Any] = {
        "method": method,
        "target_metric": "params",
        "target": target,
        "steps": ENGINE_STEPS,
        "global_ranking": global_ranking,
        **allocation,
    }
    if axis == "width":
        kwargs["granularity"] = "channel"
        if "hidden_size" in fields:
            kwargs.setdefault("hidden_size", None)  # auto: the config states head_dim
    elif axis == "depth":
        kwargs["granularity"] = "layer"
    else:
        if "depth_share" not in fields:
            raise NotAvailable("engine lacks PruneConfig.depth_share")
        kwargs.update(granularity="channel", depth_share=depth_share)
    try:
        return PruneConfig(**kwargs)
    except InvalidConfig as error:
        raise NotAvailable(f"engine lacks it: {error}") from error


class NotAvailable(Exception):
    """A row the tools cannot run (yet)."""


def engine_prune(
    dense: LlamaForCausalLM,
    method: str,
    axis: str,
    global_ranking: bool,
    batches: list[dict[str, Any]],
    goal: int,
    depth_share: float = DEPTH_SHARE,
    **allocation: Any,
) -> tuple[LlamaForCausalLM, float, str]:
    """A pruned copy, the seconds it took and a note. The target is a fraction of all
    parameters chosen so the non-embedding ones land at ≤ `goal`; when pruning the hidden size
    shrank the embeddings too, reruns with the target lowered by the overshoot."""
    total = sum(p.numel() for p in dense.parameters())
    target = (embedding_params(dense) + goal) / total
    example = batch_of(batches[0]["input_ids"][:1])
    seconds = 0.0
    notes = []
    for attempt in range(ENGINE_ATTEMPTS):
        config = engine_config(method, axis, global_ranking, target, depth_share, **allocation)
        model = copy.deepcopy(dense)
        started = time.perf_counter()
        result = prune_(model, example, batches, causal_lm, config)
        seconds += time.perf_counter() - started
        if not result.target_met:
            notes.append("engine: target not met")
        overshoot = nonembedding_params(model) - goal
        if overshoot <= 0:
            break
        if attempt == ENGINE_ATTEMPTS - 1:
            notes.append(f"{overshoot:,} non-embedding parameters over the goal")
        else:  # ask for less than this run kept, by the overshoot
            kept = sum(p.numel() for p in model.parameters())
            target = min(target, kept / total) - overshoot / total
    if attempt:
        notes.append(f"{attempt + 1} runs: target lowered by the overshoot")
    return model, seconds, "; ".join(notes)


# --------------------------------------------------------------------------------------------
# The experiment


PEERS = (*(f"tp_{c}" for c in TP_CRITERIA), "minitron")


@dataclass
class Context:
    dense: LlamaForCausalLM
    corpus: Corpus
    batches: list[dict[str, Any]]
    windows: Tensor
    goal: int  # non-embedding parameters to land at or under
    distill: Distill
    depth_share: float


def evaluate(
    ctx: Context, method: str, axis: str, run: Callable[[], tuple[LlamaForCausalLM, float, str]]
) -> Row:
    """Prune with `run`, then measure, check the reload, fine-tune and measure again."""
    print(f"{method} / {axis} ...", flush=True)
    try:
        model, seconds, note = run()
    except NotAvailable as error:
        print(f"  n/a: {error}")
        return Row(method, axis, note=f"n/a: {error}")
    except Exception as error:
        traceback.print_exc()
        return Row(method, axis, note=f"error: {type(error).__name__}: {error}".splitlines()[0])
    row = Row(method, axis, seconds=seconds, note=note, shape=shape_of(model))
    row.kept_nonemb = nonembedding_params(model) / nonembedding_params(ctx.dense)
    row.ppl_pruned = perplexity(model, ctx.windows)
    try:
        row.reloads = reloads(model, ctx.windows[:2])
    except Exception as error:  # a config that cannot describe the model
        row.reloads = False
        row.note = "; ".join(filter(None, [row.note, f"reload: {type(error).__name__}"]))
    distill_finetune(model, ctx.dense, ctx.corpus, ctx.distill)
    row.ppl_distilled = perplexity(model, ctx.windows)
    print(
        f"  {row.shape}, non-emb kept {row.kept_nonemb:.3f}, ppl pruned {row.ppl_pruned:.2f}, "
        f"distilled {row.ppl_distilled:.2f}, {seconds:.1f} s {row.note}",
        flush=True,
    )
    return row


def timed_prune(fn: Callable[[], LlamaForCausalLM]) -> tuple[LlamaForCausalLM, float, str]:
    started = time.perf_counter()
    model = fn()
    return model, time.perf_counter() - started, ""


def axis_label(ctx: Context, axis: str) -> str:
    if axis == "both" and ctx.depth_share != DEPTH_SHARE:
        return f"both, depth_share {ctx.depth_share}"
    return axis


def run_rows(ctx: Context, args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    for axis in args.axes:
        for method in args.methods:
            run = functools.partial(
                engine_prune, ctx.dense, method, axis, False, ctx.batches, ctx.goal, ctx.depth_share
            )
            rows.append(evaluate(ctx, f"ours: {method}", axis_label(ctx, axis), run))
    tp_ratio: float | None = None
    for peer in args.peers:
        if peer == "minitron":
            for axis in args.axes:
                run = functools.partial(timed_prune, functools.partial(minitron, ctx, axis))
                rows.append(evaluate(ctx, "Minitron", axis_label(ctx, axis), run))
            continue
        if "width" not in args.axes:
            continue
        if tp_ratio is None:
            started = time.perf_counter()
            tp_ratio = tp_ratio_for(ctx.dense, ctx.goal, ctx.batches)
            seconds = time.perf_counter() - started
            print(f"Torch-Pruning channel ratio {tp_ratio:.4f} (searched in {seconds:.0f} s)")
        criterion = peer.removeprefix("tp_")
        prune_tp = functools.partial(tp_prune, ctx.dense, criterion, tp_ratio, ctx.batches)
        run = functools.partial(timed_prune, prune_tp)
        rows.append(evaluate(ctx, f"Torch-Pruning: {criterion}", "width", run))
    if args.global_rows and "width" in args.axes:
        for method in args.methods:
            run = functools.partial(
                engine_prune, ctx.dense, method, "width", True, ctx.batches, ctx.goal
            )
            rows.append(evaluate(ctx, f"ours: {method}, global", "width", run))
    return rows


def minitron(ctx: Context, axis: str) -> LlamaForCausalLM:
    model = copy.deepcopy(ctx.dense)
    minitron_prune(model, ctx.batches, axis, ctx.goal, ctx.depth_share)
    return model


def _num(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(rows: list[Row], ppl_dense: float) -> str:
    headers = [
        "method",
        "axis",
        "non-emb params kept",
        "PPL before",
        "PPL after prune",
        "PPL after distill",
        "seconds",
        "reloads",
        "shape after",
        "note",
    ]
    body = [
        [
            row.method,
            row.axis,
            _num(row.kept_nonemb, 3),
            f"{ppl_dense:.2f}",
            _num(row.ppl_pruned, 2),
            _num(row.ppl_distilled, 2),
            _num(row.seconds, 1),
            "–" if row.reloads is None else ("yes" if row.reloads else "no"),
            row.shape,
            row.note,
        ]
        for row in rows
    ]
    return markdown_table(headers, body)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=JARGON_FILE, help="plain text or .gz")
    parser.add_argument("--train-steps", type=int, default=Training.steps)
    parser.add_argument("--distill-steps", type=int, default=Distill.steps)
    parser.add_argument("--methods", nargs="*", choices=ENGINE_METHODS, default=ENGINE_METHODS)
    parser.add_argument("--axes", nargs="+", choices=AXES, default=AXES)
    parser.add_argument("--peers", nargs="*", choices=PEERS, default=PEERS)
    parser.add_argument(
        "--depth-share", type=float, default=DEPTH_SHARE, help="'both': log-space depth share"
    )
    parser.add_argument("--global-rows", action="store_true", help="also ours, global ranking")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=CACHE, help="trained-model cache folder")
    parser.add_argument("--train-only", action="store_true", help="train (or load) and stop")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 calibration batches, 5 distill steps"
    )
    parser.add_argument("--json", type=Path, help="also write every row to this JSON file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    started = time.perf_counter()
    corpus = load_corpus(args.corpus)
    print(corpus.description)
    dense, record = tagged_model(corpus, Training(steps=args.train_steps), args.cache)
    windows = even_windows(corpus.heldout, 16 if args.quick else EVAL_WINDOWS, SEQ)
    ppl_dense = perplexity(dense, windows)
    print(
        f"dense model: {shape_of(dense)}, {nonembedding_params(dense):,} non-embedding + "
        f"{embedding_params(dense):,} embedding parameters; trained {record['seconds']} s on "
        f"{record['tokens_seen']:,} bytes; held-out perplexity {ppl_dense:.3f} per byte"
    )
    if args.train_only:
        return
    calibration = Calibration(batches=2) if args.quick else Calibration()
    ctx = Context(
        dense,
        corpus,
        calibration_batches(corpus, calibration),
        windows,
        nonembedding_goal(dense),
        Distill(steps=5 if args.quick else args.distill_steps),
        args.depth_share,
    )
    rows = run_rows(ctx, args)
    print()
    print(table(rows, ppl_dense))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"ppl_dense": ppl_dense, "rows": [dataclasses.asdict(r) for r in rows]}, indent=2
            )
        )


if __name__ == "__main__":
    main()
