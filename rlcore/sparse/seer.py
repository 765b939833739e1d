"""SeerAttention-R (SPEC §7): a learned AttnGate per layer that predicts which key blocks a
decode query will attend to, its self-distillation target and loss, and decode-time selection.

One gate per layer, one gate head per KV head (GQA group), parameters batched over heads:

    K_gate[j] = RoPE_{j·bs}( W_k,h · [maxpool; minpool; avgpool](K[j·bs : (j+1)·bs]) )
    Q_gate[t] = RoPE_t( W_q,h · [Q_{h·g}; …; Q_{h·g+g-1}][t] )         (the group's g heads concatenated)
    gate[t]   = softmax_j( Q_gate[t] · K_gate[j] / √d_gate ),  over blocks with j·bs ≤ t

K and Q are the model's pre-RoPE projections (q_proj / k_proj outputs). The gate's RoPE is the
standard rotate-half RoPE at dimension d_gate with the model's rope_theta (no rope scaling).
Scope: Llama/Qwen2-family attention (RoPE applied straight to q_proj/k_proj outputs, no q/k
norm); a model with q/k norms before RoPE (Qwen3) would need the norm in the capture hooks.

Target: the model's attention probabilities max-pooled over each key block, max over the
group's query heads, renormalised over blocks. Loss: KL(target ‖ gate), summed over layers.

At decode, `SeerSelector` recovers pre-RoPE q/k from the post-RoPE query and key cache by
inverting the model's own rotary embedding, so rope scaling (yarn's attention factor, etc.)
is undone exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rlcore.config import ConfigError
from rlcore.sparse.selection import BlockSelector

FORMAT = "rlcore-seer-gates-v1"


# -- pooling and RoPE -----------------------------------------------------------------------


def pool_blocks(key_blocks: torch.Tensor) -> torch.Tensor:
    """key_blocks [..., n, bs, D] → [..., n, 3D]: max, min and mean over each block's keys."""
    return torch.cat([key_blocks.amax(-2), key_blocks.amin(-2), key_blocks.mean(-2)], dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE of x [B, H, n, d] at positions [n], or [B, n] (per row), in the Llama
    convention."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = positions.to(x.device, torch.float32)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    if positions.dim() == 2:
        angles = angles[:, None]  # [B, 1, n, d]: the same for every head
    return x * angles.cos().to(x.dtype) + rotate_half(x) * angles.sin().to(x.dtype)


def _model_cos_sin(x: torch.Tensor, positions: torch.Tensor, rotary_emb):
    position_ids = positions if positions.dim() == 2 else positions[None]
    cos, sin = rotary_emb(x, position_ids.to(x.device))  # [1 or B, n, D]
    return cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)


def model_rope(x: torch.Tensor, positions: torch.Tensor, rotary_emb) -> torch.Tensor:
    """The model's RoPE (Llama's apply_rotary_pos_emb) on x [B, H, n, D] at positions [n] or
    [B, n]."""
    cos, sin = _model_cos_sin(x, positions, rotary_emb)
    return x * cos + rotate_half(x) * sin


def rotary_embedding(config) -> nn.Module:
    """The model's own RoPE module (what `model.model.rotary_emb` is), on CPU, built from its
    config alone: the model is instantiated on the meta device only to learn the module's class."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return type(model.model.rotary_emb)(config=config)


def invert_model_rope(x: torch.Tensor, positions: torch.Tensor, rotary_emb) -> torch.Tensor:
    """Undo `model_rope`. The model's (cos, sin) are m·(cos θ, sin θ), m being the rope type's
    attention scaling, so the inverse is (x·cos − rotate_half(x)·sin) / (cos² + sin²)."""
    cos, sin = _model_cos_sin(x, positions, rotary_emb)
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)


def causal_block_mask(num_queries: int, num_blocks: int, block_size: int, device=None) -> torch.Tensor:
    """[T, n] True where block j has not begun at query position t (j·bs > t)."""
    t = torch.arange(num_queries, device=device)[:, None]
    j = torch.arange(num_blocks, device=device)[None]
    return j * block_size > t


# -- the gate -------------------------------------------------------------------------------


class AttnGate(nn.Module):
    """The gate of one attention layer. Inputs are pre-RoPE: q [B, H_q, T, D], k [B, H_kv, T, D]."""

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, d_gate: int = 128,
                 block_size: int = 64, rope_theta: float = 10000.0):
        super().__init__()
        if num_q_heads % num_kv_heads:
            raise ValueError(f"AttnGate: {num_q_heads} query heads do not split into {num_kv_heads} KV groups")
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.group = num_q_heads // num_kv_heads
        self.d_gate, self.block_size, self.rope_theta = d_gate, block_size, rope_theta
        q_in, k_in = self.group * head_dim, 3 * head_dim
        # Per KV head weights, initialised like nn.Linear (uniform ±1/√fan_in).
        self.w_q = nn.Parameter(torch.empty(num_kv_heads, q_in, d_gate).uniform_(-1, 1) / math.sqrt(q_in))
        self.w_k = nn.Parameter(torch.empty(num_kv_heads, k_in, d_gate).uniform_(-1, 1) / math.sqrt(k_in))

    def block_keys(self, pooled: torch.Tensor, block_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled keys [B, H_kv, n, 3D] of blocks block_ids [n] (default 0…n−1) of their
        sequence → K_gate [B, H_kv, n, d_gate]."""
        k = torch.einsum("bhnc,hcd->bhnd", pooled.to(self.w_k.dtype), self.w_k)
        if block_ids is None:
            block_ids = torch.arange(k.shape[2], device=k.device)
        return rope(k, block_ids * self.block_size, self.rope_theta)

    def queries(self, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE queries [B, H_q, T, D] at positions [T] or [B, T] → Q_gate [B, H_kv, T, d_gate]."""
        b, _, t, d = q.shape
        grouped = q.to(self.w_q.dtype).view(b, self.num_kv_heads, self.group, t, d).permute(0, 1, 3, 2, 4)
        qg = torch.einsum("bhtc,hcd->bhtd", grouped.reshape(b, self.num_kv_heads, t, self.group * d), self.w_q)
        return rope(qg, positions, self.rope_theta)

    def logits(self, q_gate: torch.Tensor, k_gate: torch.Tensor) -> torch.Tensor:
        return q_gate @ k_gate.transpose(-1, -2) / math.sqrt(self.d_gate)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Gate log-probabilities [B, H_kv, T, n] over the key blocks of a whole sequence
        (T a multiple of block_size); blocks that start after a query are masked out."""
        b, h, t, d = k.shape
        if t % self.block_size:
            raise ValueError(f"AttnGate: sequence length {t} is not a multiple of block_size {self.block_size}")
        n = t // self.block_size
        k_gate = self.block_keys(pool_blocks(k.reshape(b, h, n, self.block_size, d)))
        q_gate = self.queries(q, torch.arange(t, device=q.device))
        logits = self.logits(q_gate, k_gate)
        mask = causal_block_mask(t, n, self.block_size, logits.device)
        return logits.masked_fill(mask, torch.finfo(logits.dtype).min).log_softmax(-1)


def model_dims(config) -> dict:
    """The numbers an AttnGate needs from an HF config (Llama/Qwen2 family)."""
    heads = config.num_attention_heads
    rope_params = getattr(config, "rope_parameters", None) or {}
    return {
        "num_layers": config.num_hidden_layers,
        "num_q_heads": heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "rope_theta": float(rope_params.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
    }


def build_gates(config, block_size: int = 64, d_gate: int = 128) -> nn.ModuleList:
    """Freshly initialised gates, one per layer of the model with HF config `config`."""
    dims = model_dims(config)
    return nn.ModuleList(
        AttnGate(dims["num_q_heads"], dims["num_kv_heads"], dims["head_dim"], d_gate, block_size, dims["rope_theta"])
        for _ in range(dims["num_layers"])
    )


# -- distillation target and loss -----------------------------------------------------------


def block_attention_target(probs: torch.Tensor, num_kv_heads: int, block_size: int) -> torch.Tensor:
    """Attention probabilities [B, H_q, T, L] → target [B, H_kv, T, n]: max over each key block,
    max over the KV group's query heads, renormalised to sum 1 over blocks (L padded up to n·bs)."""
    b, hq, t, length = probs.shape
    n = -(-length // block_size)
    blocks = F.pad(probs.float(), (0, n * block_size - length)).view(b, hq, t, n, block_size).amax(-1)
    grouped = blocks.view(b, num_kv_heads, hq // num_kv_heads, t, n).amax(2)
    return grouped / grouped.sum(-1, keepdim=True)


def distill_loss(gate_logprobs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """KL(target ‖ gate) per query, mean over batch/heads/queries within a layer, summed over layers."""
    return sum(F.kl_div(lg, tg, reduction="none").sum(-1).mean() for lg, tg in zip(gate_logprobs, targets))


# -- decode-time selection ------------------------------------------------------------------


class SeerSelector(BlockSelector):
    """Block selection by trained gates. Block summaries are the gates' K_gate of the pooled,
    un-RoPE'd keys (the pooled-K cache); scores are the gate's softmax over the complete blocks
    (the newest block is kept regardless and takes no part in the softmax, so probabilities are
    a little higher than in training and a threshold keeps a little more)."""

    def __init__(self, gates: nn.ModuleList, rotary_emb: nn.Module, block_size: int | None = None,
                 budget_blocks: int | None = None, threshold: float | None = None):
        """gates: from `load_gates` / `build_gates`; rotary_emb: the model's `model.model.rotary_emb`;
        budget_blocks: a token budget // block_size (newest block included); threshold: τ on the
        gate's softmax, e.g. 2e-3..6e-3."""
        gate_bs = gates[0].block_size
        if block_size is not None and block_size != gate_bs:
            raise ValueError(f"SeerSelector: block_size={block_size} but the gates were trained with {gate_bs}")
        super().__init__(gate_bs, budget_blocks=budget_blocks, threshold=threshold)
        self.gates, self.rotary_emb = gates, rotary_emb

    def summarize(self, layer_idx: int, key_blocks: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        b, h, n, bs, d = key_blocks.shape
        positions = (block_ids[:, None] * bs + torch.arange(bs, device=block_ids.device)).flatten()
        keys = invert_model_rope(key_blocks.float().reshape(b, h, n * bs, d), positions, self.rotary_emb)
        with torch.no_grad():
            return self.gates[layer_idx].block_keys(pool_blocks(keys.view(b, h, n, bs, d)), block_ids)

    def block_scores(self, layer_idx: int, query: torch.Tensor, summaries: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
        gate = self.gates[layer_idx]
        where = positions.view(-1, 1)  # [B, 1]: one query per row
        q = invert_model_rope(query.float()[:, :, None], where, self.rotary_emb)
        with torch.no_grad():
            logits = gate.logits(gate.queries(q, where), summaries).squeeze(2)
        complete = (positions + 1) // self.block_size
        outside = torch.arange(logits.shape[-1], device=logits.device) >= complete.view(-1, 1, 1)
        return logits.masked_fill(outside, float("-inf")).softmax(-1)  # over the row's complete blocks


# -- saving and loading ---------------------------------------------------------------------


def save_gates(gates: nn.ModuleList, path: str | Path) -> None:
    """Safetensors with the hyper-parameters in its metadata (checked by `load_gates`)."""
    from safetensors.torch import save_file

    g = gates[0]
    meta = {"format": FORMAT, "block_size": g.block_size, "d_gate": g.d_gate, "num_layers": len(gates),
            "num_q_heads": g.num_q_heads, "num_kv_heads": g.num_kv_heads, "head_dim": g.head_dim, "rope_theta": g.rope_theta}
    tensors = {name: p.detach().contiguous() for name, p in gates.state_dict().items()}
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})


def load_gates(model, path: str | Path) -> nn.ModuleList:
    """Gates saved by `save_gates`, checked against `model` (an HF causal LM or its config)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    if raw.get("format") != json.dumps(FORMAT):
        raise ConfigError(f"{path}: not a SeerAttention-R gate file (no {FORMAT} metadata)")
    meta = {k: json.loads(v) for k, v in raw.items()}
    dims = model_dims(getattr(model, "config", model))
    wrong = [f"{k}={meta[k]} (model: {v})" for k, v in dims.items() if meta[k] != v]
    if wrong:
        raise ConfigError(f"{path}: gates do not fit this model: {', '.join(wrong)}")
    gates = build_gates(getattr(model, "config", model), meta["block_size"], meta["d_gate"])
    gates.load_state_dict(load_file(str(path)))
    return gates.to(getattr(model, "device", "cpu"))
