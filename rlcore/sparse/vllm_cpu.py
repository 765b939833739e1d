"""Block-sparse decode steps inside vLLM's CPU build (`rollout.backend=vllm` with
`rollout.sparse.method=resa|seer`).

vLLM picks its attention backend by name from a registry whose entries can be overridden
(`vllm.v1.attention.backends.registry.register_backend`); on CPUs it always asks for
CPU_ATTN. `use(selector)` points CPU_ATTN at `SparseCPUAttentionBackend` in this process, where
the rollout engine runs vLLM (one worker, in-process). The backend is vLLM's own CPU backend
with one change: a request whose forward has one query token (a decode step; also, rarely, a
prompt's last token left alone by chunked prefill — vLLM's own decode/prefill split is the
same) attends to the key blocks the selector picks (ReSA's or SeerAttention-R's, as in the
transformers backend) through `block_sparse_decode`, the kernel that backend uses. Prefill — every forward of
more than one token — stays vLLM's dense CPU kernel.

What this is, and is not:
  - Same selection and kernel as the transformers backend, over vLLM's paged KV cache: greedy
    decoding (ReSA with rectification off, Seer) matches `rollout.backend=hf` token for token
    (tests/integration/test_vllm_sparse.py). It shows what sparse rollouts cost in log-prob
    mismatch and accuracy under vLLM's scheduler.
  - Block summaries live per page of vLLM's cache (rlcore.sparse.paged), made once when a block
    fills; a step's decode rows are selected and attended as one batch, reading only the
    selected blocks through the page table (no copy of a request's whole K/V).
  - No rectification: vLLM's scheduler has no "re-run these generated tokens densely" step;
    config validation asks ReSA for rectify_every=0. Seer's gates and RoPE are loaded on CPU
    from the gate file and the model's config (rlcore.sparse.attention.selector_from_config).
  - CPU only: a GPU backend would subclass vLLM's FlashAttention backend the same way and run
    the Triton kernel of rlcore.sparse.decode over its page table (no GPU here to test it).

vLLM's CPU key cache layout depends on the instruction set it picked (`layer.isa`): with the
"vec" kernels a block stores each head's keys dimension-major ([D, block]), values
token-major. The layout is checked, not assumed: on the first forward each layer reads back
the keys it was just given and must find them, else a one-line error.
"""

from __future__ import annotations

import re

import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.attention.selector import _cached_get_attn_backend

from rlcore.sparse.attention import SparseDecoding
from rlcore.sparse.paged import PagedSummaries, sparse_decode_rows, token_positions
from rlcore.sparse.selection import BlockSelector


_state: SparseDecoding | None = None


def use(selector: BlockSelector | None) -> SparseDecoding | None:
    """vLLM engines created after this call in this process decode with `selector` (None:
    densely). Returns the state whose counters those engines' sparse steps update."""
    global _state
    _state = None if selector is None else SparseDecoding(selector)
    if selector is None:
        AttentionBackendEnum.CPU_ATTN.clear_override()
    else:
        register_backend(AttentionBackendEnum.CPU_ATTN, f"{__name__}.SparseCPUAttentionBackend")
    # vLLM caches which class a backend name resolved to (per process): forget it, or an engine
    # made after another one would get the earlier engine's backend.
    _cached_get_attn_backend.cache_clear()
    return _state


class SparseCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[SparseCPUAttentionImpl]:
        return SparseCPUAttentionImpl


class SparseCPUAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if _state is None:
            raise RuntimeError("rlcore.sparse.vllm_cpu: call use(selector) before creating the engine")
        if self.kv_cache_dtype != "auto":
            raise ValueError(f"sparse vLLM decoding reads the KV cache as stored; kv_cache_dtype={self.kv_cache_dtype} is not supported")
        self.state = _state
        self.summaries: PagedSummaries | None = None  # made on the first forward, when the layer's index is known
        self.keys_dim_major: bool | None = None  # the key cache layout, found on the first forward

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if attn_metadata is None:  # warm-up
            return output
        key_cache, value_cache = _split(kv_cache)
        n_tokens = attn_metadata.num_actual_tokens
        if self.summaries is None:
            layer_idx = int(re.search(r"layers\.(\d+)\.", layer.layer_name).group(1))  # Seer's gates are per layer
            self.summaries = PagedSummaries(self.state.selector, layer_idx)
            self.keys_dim_major = _key_layout(key_cache, key, attn_metadata.slot_mapping, n_tokens, layer.isa)
        if self.keys_dim_major:  # a logical [pages, H_kv, page, D] view
            pages, heads, page_size, dim = key_cache.shape
            key_cache = key_cache.view(pages, heads, dim, page_size).transpose(2, 3)
        positions = token_positions(attn_metadata.query_start_loc, attn_metadata.seq_lens)
        self.summaries.update(key_cache, attn_metadata.slot_mapping[:n_tokens], positions)
        if attn_metadata.max_query_len > 1:  # prefill rows in the batch: dense for all, decode rows redone below
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        rows = (attn_metadata.query_start_loc.diff() == 1).nonzero().flatten()
        if len(rows):
            tokens = attn_metadata.query_start_loc[rows].long()
            kv_len = attn_metadata.seq_lens[rows].long()
            out, table = sparse_decode_rows(self.summaries, query[tokens], key_cache, value_cache,
                                            attn_metadata.block_table[rows], kv_len, attn_metadata.max_seq_len, self.scale)
            output[tokens] = out
            self.state.count(table, kv_len)
        return output


def _split(kv_cache: torch.Tensor):
    """[pages, H_kv, page, 2·D] → key and value caches [pages, H_kv, page, D] (as CPU_ATTN splits it)."""
    pages, heads, page_size, _ = kv_cache.shape
    return kv_cache.view(pages, heads, page_size * 2, -1).chunk(2, dim=2)


def _key_layout(key_cache: torch.Tensor, key: torch.Tensor, slot_mapping: torch.Tensor, num_tokens: int, isa: str) -> bool:
    """True if each page stores a head's keys dimension-major ([D, page]), False if token-major;
    decided by reading back the keys of this forward's tokens (already written to their slots)."""
    slots = slot_mapping[:num_tokens].long()
    pages, offsets = slots // key_cache.shape[2], slots % key_cache.shape[2]
    stored = key_cache[pages]  # [T, H_kv, page, D] in the stored layout
    t = torch.arange(len(slots))
    if torch.equal(stored[t, :, offsets], key[:num_tokens]):
        return False
    by_dim = stored.view(stored.shape[0], stored.shape[1], stored.shape[3], stored.shape[2])
    if torch.equal(by_dim[t, :, :, offsets], key[:num_tokens]):
        return True
    raise RuntimeError(f"sparse vLLM decoding cannot read vLLM's CPU key cache (isa {isa!r}); use rollout.backend=hf")
