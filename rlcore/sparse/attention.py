"""Block-sparse decoding inside a transformers model, as an attention implementation.

transformers looks attention functions up by name (`config._attn_implementation`) in its
AttentionInterface; we register "rlcore_sparse" there and switch a model to it with
`install`. The function is SDPA (with SDPA's causal masks) for every forward of more than one
query token — prefill, and ReSA's dense rectification — and for decode steps made while the
model is held `dense()`. A single-token decode step asks the model's selector for blocks and
runs `block_sparse_decode` over them. Models, caches and samplers stay transformers' own.

Sparse decoding assumes cache position = token position, i.e. no left padding: the sparse
rollout loop (rlcore.sparse.generate) batches only prompts of one length for that reason.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rlcore.sparse.decode import block_sparse_decode
from rlcore.sparse.selection import BlockSelector

NAME = "rlcore_sparse"


@dataclass
class SparseDecoding:
    """What one model's sparse decode steps use, plus counters for the kept share of keys."""

    selector: BlockSelector
    dense: bool = False  # True: every step dense (prefill, rectification, a dense baseline)
    # tensors once counting starts: added to on the decode device, read (synced) by `density`
    kept_keys: int | torch.Tensor = field(default=0, repr=False)
    total_keys: int | torch.Tensor = field(default=0, repr=False)
    live: torch.Tensor | None = field(default=None, repr=False)  # [B] rows that count; None: all

    def count(self, table: torch.Tensor, kv_len: int | torch.Tensor) -> None:
        """Add one decode step's selection (block table [B, H_kv, n_sel], row b at kv_len[b]
        keys) to the counters."""
        bs = self.selector.block_size
        kv_len = torch.as_tensor(kv_len, device=table.device).expand(table.shape[0])
        newest = (kv_len - 1) % bs + 1  # keys in the newest block: always selected, maybe partial
        kept = ((table >= 0).sum(-1) - 1) * bs + newest[:, None]  # [B, H_kv]
        total = kv_len[:, None].expand_as(kept)
        if self.live is not None:  # a product, not a boolean index: no device sync on CUDA
            kept, total = kept * self.live[:, None], total * self.live[:, None]
        self.kept_keys = self.kept_keys + kept.sum()
        self.total_keys = self.total_keys + total.sum()

    @property
    def density(self) -> float:
        """Share of the (row, KV head, key) triples that sparse steps of unfinished rows attended
        to so far."""
        return float(self.kept_keys) / float(self.total_keys) if self.total_keys else 1.0


def sparse_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    state: SparseDecoding | None = getattr(module, "rlcore_sparse", None)
    if state is None or state.dense or query.shape[2] != 1:
        if attention_mask is not None and query.device.type == "cpu" and key.shape[1] != query.shape[1]:
            return masked_gqa_sdpa(query, key, value, attention_mask, scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    kv_len = key.shape[2]
    table = state.selector.select(module.layer_idx, query[:, :, 0], key, kv_len)
    out = block_sparse_decode(query[:, :, 0], key, value, table, kv_len, state.selector.block_size, scale=scaling)
    state.count(table, kv_len)
    return out.unsqueeze(1), None  # transformers expects [B, T, H_q, D]


def masked_gqa_sdpa(query, key, value, attention_mask, scaling):
    """SDPA under a mask with each KV head shared by its query heads (enable_gqa). transformers
    repeats K/V for masked GQA calls (CUDA's fused kernels need that); on CPU that is a copy of
    the whole cache per layer, most of the cost of a rectification forward at long context."""
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, sparse_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


def install(model, selector: BlockSelector) -> SparseDecoding:
    """Switch `model` to sparse decode steps with `selector`; returns the shared state."""
    state = SparseDecoding(selector)
    for layer in model.model.layers:
        layer.self_attn.rlcore_sparse = state
    model.set_attn_implementation(NAME)
    return state


def install_from_config(model, cfg, model_path: str) -> SparseDecoding:
    """`install` with the selector that rollout.sparse (rlcore.config.SparseConfig) describes."""
    return install(model, selector_from_config(cfg, model_path, model))


def selector_from_config(cfg, model_path: str, model=None) -> BlockSelector:
    """The selector rollout.sparse describes. SeerAttention-R's gates and RoPE follow `model`
    (an HF causal LM, on its device); without one (vLLM holds the weights) they are built on
    CPU from the model's config."""
    if cfg.method == "resa":
        from rlcore.sparse.resa import ReSASelector

        return ReSASelector(cfg.block_size, cfg.keep_ratio, cfg.min_blocks)
    from rlcore.sparse.seer import SeerSelector, load_gates, rotary_embedding

    if model is None:
        from transformers import AutoConfig

        from rlcore.models import resolve_model_path

        config = AutoConfig.from_pretrained(resolve_model_path(model_path))
        gates, rotary = load_gates(config, gate_file(cfg, model_path)), rotary_embedding(config)
    else:
        gates, rotary = load_gates(model, gate_file(cfg, model_path)), model.model.rotary_emb
    budget = None if cfg.threshold else cfg.budget_tokens // cfg.block_size
    return SeerSelector(gates, rotary, cfg.block_size,
                        budget_blocks=budget, threshold=cfg.threshold or None)


# Where gates live in a model folder (and in a run folder): a subfolder, because vLLM loads
# every top-level *.safetensors of a model folder as model weights.
GATES_FILE = Path("seer") / "gates.safetensors"


def gate_file(cfg, model_path: str) -> Path:
    """rollout.sparse.gate_path, or seer/gates.safetensors in the model folder (where
    `rlcore sft recipe=seer_gate_distill` writes it)."""
    from rlcore.models import resolve_model_path

    return Path(cfg.gate_path) if cfg.gate_path else Path(resolve_model_path(model_path)) / GATES_FILE


@contextlib.contextmanager
def dense(state: SparseDecoding):
    """Decode densely inside the block (dense rectification; the dense baseline of benches)."""
    before, state.dense = state.dense, True
    try:
        yield
    finally:
        state.dense = before
