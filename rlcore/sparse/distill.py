"""Training SeerAttention-R gates by self-distillation: `rlcore sft recipe=seer_gate_distill`.

The model is frozen; each step runs it once (eager attention, output_attentions=True) on
packed task texts, captures the pre-RoPE q/k from forward hooks on every layer's
self_attn.q_proj / k_proj, and fits the gates to the block-pooled attention
(rlcore.sparse.seer.block_attention_target) with AdamW, lr cosine from `lr` to `min_lr`.

Data: the model's own task texts in the SFT format (chat-templated prompt + the worked
completion of `sft.completion_fn` + EOS), shuffled and packed end to end into sequences of
`seq_len` tokens, so that a sequence spans many key blocks. Training texts come from the
data config's training split, the recall check's from its held-out split.

Block recall (written to block_recall.json in the run dir): for each held-out query t whose
prefix has more blocks than the budget (t//bs + 1 > budget_tokens//bs), each layer and each
query head, the share of that head's true attention mass inside the blocks its KV group
selects; averaged over heads, queries, sequences and layers. The gates select through
`SeerSelector` exactly as at decode (post-RoPE cache, RoPE inverted, newest block always
kept); the baseline keeps the newest budget//bs blocks; the oracle, an upper bound, picks
blocks knowing the true attention.
"""

from __future__ import annotations

import json
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoConfig

from rlcore.config import ConfigError, check_positive, import_function, validate_common
from rlcore.data import load_splits
from rlcore.logging import RunLogger
from rlcore.models import load_model, load_tokenizer, resolve_model_path
from rlcore.sparse.attention import GATES_FILE
from rlcore.sparse.seer import (
    SeerSelector,
    block_attention_target,
    build_gates,
    distill_loss,
    model_dims,
    model_rope,
    save_gates,
)


def distill_gates(cfg) -> dict:
    settings = cfg.sparse_distill
    validate_common(cfg)
    model_path = resolve_model_path(cfg.model.path)
    validate_distill(settings, AutoConfig.from_pretrained(model_path))
    started = time.time()
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(model_path)
    model = frozen_teacher(model_path, cfg.model.dtype)
    gates = build_gates(model.config, settings.block_size, settings.d_gate)
    assert all(not p.requires_grad for p in model.parameters()) and all(p.requires_grad for p in gates.parameters())

    completion_of = import_function(cfg.sft.completion_fn, "sft.completion_fn")
    train_set, eval_set = load_splits(cfg.data, tokenizer)
    train_ids = pack_texts(train_set, completion_of, tokenizer, settings.seq_len, settings.steps * settings.batch_size, cfg.seed)
    eval_ids = pack_texts(eval_set, completion_of, tokenizer, settings.seq_len, settings.eval_sequences, cfg.seed)

    budget_blocks = settings.eval_budget_tokens // settings.block_size
    recall_before = block_recall(model, gates, eval_ids, budget_blocks)
    log = RunLogger(Path(cfg.run_dir), cfg.logger, OmegaConf.to_container(cfg, resolve=True), cfg.name, 0, settings.steps)
    losses = train_gates(model, gates, train_ids, settings, log)
    recall_after = block_recall(model, gates, eval_ids, budget_blocks)
    gates_path = output_path(settings.output, model_path, Path(cfg.run_dir))
    save_gates(gates, gates_path)

    recall = {"budget_tokens": settings.eval_budget_tokens, "block_size": settings.block_size,
              "budget_blocks": budget_blocks, "blocks_per_sequence": settings.seq_len // settings.block_size,
              "eval_sequences": settings.eval_sequences, "gate": recall_after["gate"], "recency": recall_after["recency"],
              "oracle": recall_after["oracle"], "gate_untrained": recall_before["gate"]}
    summary = {"steps": settings.steps, "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
               "block_recall": {k: recall[k]["mean"] for k in ("gate", "recency", "oracle", "gate_untrained")},
               "budget_tokens": settings.eval_budget_tokens, "gates": str(gates_path),
               "wall_time_s": round(time.time() - started, 1)}
    for name, content in (("block_recall.json", recall), ("summary.json", summary)):
        (Path(cfg.run_dir) / name).write_text(json.dumps(content, indent=2))
    return summary


def train_gates(model, gates, train_ids: torch.Tensor, settings, log: RunLogger) -> list[float]:
    """AdamW on the gates only, lr cosine from settings.lr to settings.min_lr; the loss per step."""
    optimizer = torch.optim.AdamW(gates.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.steps, eta_min=settings.min_lr)
    losses = []
    for step in range(1, settings.steps + 1):
        batch = train_ids[(step - 1) * settings.batch_size : step * settings.batch_size]
        losses.append(distill_step(model, gates, optimizer, batch))
        log.log(step, {"distill/loss": losses[-1], "distill/lr": schedule.get_last_lr()[0]})
        schedule.step()
    log.close()
    return losses


def validate_distill(s, config) -> None:
    for key in ("block_size", "d_gate", "seq_len", "batch_size", "steps", "eval_sequences", "lr", "min_lr"):
        check_positive(f"sparse_distill.{key}", s[key])
    if s.seq_len % s.block_size:
        raise ConfigError(f"sparse_distill.seq_len={s.seq_len} must be a multiple of sparse_distill.block_size={s.block_size}")
    longest = getattr(config, "max_position_embeddings", s.seq_len)
    if s.seq_len > longest:
        raise ConfigError(f"sparse_distill.seq_len={s.seq_len} is over the model's max_position_embeddings={longest}")
    if not s.block_size <= s.eval_budget_tokens < s.seq_len:
        raise ConfigError(
            f"sparse_distill.eval_budget_tokens={s.eval_budget_tokens} must be at least block_size={s.block_size} "
            f"and below seq_len={s.seq_len}"
        )


def frozen_teacher(model_path: str, dtype: str):
    """The model in eval mode with eager attention (so it returns attention probabilities), no grads."""
    model = load_model(model_path, dtype)
    model.set_attn_implementation("eager")
    model.eval()
    model.requires_grad_(False)
    return model


def pack_texts(prompts, completion_of, tokenizer, seq_len: int, count: int, seed: int) -> torch.Tensor:
    """`count` sequences [count, seq_len] of whole task texts (prompt + completion + EOS) laid end
    to end in a shuffled order, reshuffled for each further pass over the prompts."""
    rng = random.Random(seed)
    stream: list[int] = []
    while len(stream) < count * seq_len:
        order = rng.sample(range(len(prompts)), len(prompts))
        for i in order:
            p = prompts[i]
            stream += p.token_ids + tokenizer(completion_of(p), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            if len(stream) >= count * seq_len:
                break
    return torch.tensor(stream[: count * seq_len]).view(count, seq_len)


@contextmanager
def capture_qk(model):
    """Collect each layer's pre-RoPE q [B, H_q, T, D] and k [B, H_kv, T, D] (q_proj / k_proj outputs)."""
    head_dim = model_dims(model.config)["head_dim"]
    captured: dict[str, list] = {"q": [], "k": []}

    def hook(kind):
        def save(module, args, output):
            b, t, _ = output.shape
            captured[kind].append(output.view(b, t, -1, head_dim).transpose(1, 2))

        return save

    handles = []
    for layer in model.model.layers:
        handles.append(layer.self_attn.q_proj.register_forward_hook(hook("q")))
        handles.append(layer.self_attn.k_proj.register_forward_hook(hook("k")))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def teacher_pass(model, input_ids: torch.Tensor):
    """Per layer: pre-RoPE q, pre-RoPE k and the attention probabilities [B, H_q, T, T] (float32)."""
    with capture_qk(model) as captured:
        out = model(input_ids=input_ids, output_attentions=True, use_cache=False)
    return [q.float() for q in captured["q"]], [k.float() for k in captured["k"]], [a.float() for a in out.attentions]


def distill_step(model, gates, optimizer, input_ids: torch.Tensor) -> float:
    """One optimizer step of the gates towards the frozen model's block attention; the loss."""
    q, k, probs = teacher_pass(model, input_ids)
    kv_heads, block_size = gates[0].num_kv_heads, gates[0].block_size
    targets = [block_attention_target(p, kv_heads, block_size) for p in probs]
    loss = distill_loss([gate(ql, kl) for gate, ql, kl in zip(gates, q, k)], targets)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def block_recall(model, gates, input_ids: torch.Tensor, budget_blocks: int) -> dict:
    """Held-out block recall of the gates (through SeerSelector) and of the recency baseline:
    {"gate": {"mean", "per_layer"}, "recency": {...}, "oracle": {...}} (see the module docstring)."""
    q_pre, k_pre, probs = teacher_pass(model, input_ids)
    rotary = model.model.rotary_emb
    selector = SeerSelector(gates, rotary, budget_blocks=budget_blocks)
    positions = torch.arange(input_ids.shape[1])
    per_layer = {"gate": [], "recency": [], "oracle": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one decode step at a time is a loop of tiny ops: threads only add overhead
    try:
        for layer, (q, k, p) in enumerate(zip(q_pre, k_pre, probs)):
            q_post, k_post = model_rope(q, positions, rotary), model_rope(k, positions, rotary)
            for key, value in layer_recall(selector, layer, q_post, k_post, p).items():
                per_layer[key].append(round(value, 4))
    finally:
        torch.set_num_threads(threads)
    return {key: {"mean": round(sum(v) / len(v), 4), "per_layer": v} for key, v in per_layer.items()}


def layer_recall(selector: SeerSelector, layer: int, q_post, k_post, probs) -> dict:
    """Mean attention mass inside the selected blocks over the queries with more blocks than the
    budget, decoding one position at a time: {"gate": …, "recency": …, "oracle": …}. The oracle
    knows the true attention: the newest block and the older blocks of most mass summed over
    the group's heads (the best any per-group selection can do at this budget)."""
    bs, budget = selector.block_size, selector.budget_blocks
    b, hq, t_len, _ = probs.shape
    hkv = k_post.shape[1]
    block_mass = probs.view(b, hq, t_len, t_len // bs, bs).sum(-1)  # [B, H_q, T, n]
    group_mass = block_mass.view(b, hkv, hq // hkv, t_len, -1).sum(2)  # [B, H_kv, T, n]
    group = torch.arange(hq) // (hq // hkv)  # query head → its KV head

    def recall(t, table):  # [B, H_kv, budget] → mean mass of each query head in its group's blocks
        return block_mass[:, :, t].gather(-1, table.long()[:, group]).sum(-1).mean().item()

    sums = {"gate": 0.0, "recency": 0.0, "oracle": 0.0}
    queries = range(budget * bs, t_len)  # t // bs + 1 > budget
    for t in queries:
        newest = t // bs
        sums["gate"] += recall(t, selector.select(layer, q_post[:, :, t], k_post, t + 1))
        sums["recency"] += recall(t, torch.arange(newest + 1 - budget, newest + 1).expand(b, hkv, budget))
        older = group_mass[:, :, t, :newest].topk(budget - 1, dim=-1).indices
        sums["oracle"] += recall(t, torch.cat([older, torch.full_like(older[..., :1], newest)], dim=-1))
    return {key: total / len(queries) for key, total in sums.items()}


def output_path(output: str, model_path: str, run_dir: Path) -> Path:
    """`auto`: beside the model when its directory is writable, else in the run directory."""
    if output != "auto":
        return Path(output)
    model_dir = Path(model_path)
    target = model_dir if model_dir.is_dir() and os.access(model_dir, os.W_OK) else run_dir
    (target / GATES_FILE).parent.mkdir(parents=True, exist_ok=True)
    return target / GATES_FILE
