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
  - Not a speed path. Each step gathers a request's whole K/V out of the paged cache and
    summarises every key block anew (vLLM reuses pages across requests, so summaries cached
    per request would go stale); the gather costs what dense attention does. A fast version
    keeps summaries per physical page, updated when a page fills, and runs the Triton kernel
    over the page table (plan in issue 4's notes).
  - No rectification: vLLM's scheduler has no "re-run these generated tokens densely" step;
    config validation asks ReSA for rectify_every=0. Seer's gates and RoPE are loaded on CPU
    from the gate file and the model's config (rlcore.sparse.attention.selector_from_config).

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
from rlcore.sparse.decode import block_sparse_decode
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
        self.layer_idx: int | None = None  # from the layer's name, on the first forward (Seer's gates are per layer)
        self.keys_dim_major: bool | None = None  # the key cache layout, found on the first forward

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if attn_metadata is None:  # warm-up
            return output
        key_cache, value_cache = _split(kv_cache)
        if self.layer_idx is None:
            self.layer_idx = int(re.search(r"layers\.(\d+)\.", layer.layer_name).group(1))
        if self.keys_dim_major is None:
            self.keys_dim_major = _key_layout(key_cache, key, attn_metadata.slot_mapping,
                                              attn_metadata.num_actual_tokens, layer.isa)
        query_lens = attn_metadata.query_start_loc.diff()
        if attn_metadata.max_query_len > 1:  # prefill rows in the batch: dense for all, decode rows redone below
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        selector = self.state.selector
        for row in (query_lens == 1).nonzero().flatten().tolist():
            token = int(attn_metadata.query_start_loc[row])
            kv_len = int(attn_metadata.seq_lens[row])
            k, v = self._request_kv(key_cache, value_cache, attn_metadata.block_table[row], kv_len)
            q = query[token : token + 1]  # [1, H_q, D]
            table = selector.select(self.layer_idx, q, k, kv_len, cached=False)
            output[token] = block_sparse_decode(q, k, v, table, kv_len, selector.block_size, self.scale)[0]
            self.state.count(table, kv_len)
        return output

    def _request_kv(self, key_cache, value_cache, pages, kv_len: int):
        """One request's keys and values [1, H_kv, kv_len, D], gathered from its pages."""
        page_size = key_cache.shape[2]
        pages = pages[: -(-kv_len // page_size)].long()
        k = key_cache[pages]  # [n, H_kv, page, D] (a copy), laid out as stored
        if self.keys_dim_major:
            k = k.view(k.shape[0], k.shape[1], k.shape[3], page_size).transpose(2, 3)
        v = value_cache[pages]
        return [x.transpose(0, 1).reshape(1, x.shape[1], -1, x.shape[3])[:, :, :kv_len] for x in (k, v)]


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
