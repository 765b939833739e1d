"""Block selection over a paged KV cache (vLLM's): summaries kept per page, decode rows of
different lengths selected and attended in one batch.

vLLM hands pages out and takes them back as requests come and go, so a summary cached per
request would go stale. `PagedSummaries` keeps a layer's block summaries where the keys are,
per (page, block within the page), and writes a block's summary in the forward that writes
its last key — every forward's tokens are already in the cache when attention runs. A page
reused by another request holds stale summaries only for blocks that request has not filled
yet; those are never scored (a selector scores complete blocks only, and the newest block is
kept without a score). The same holds when vLLM preempts a request and recomputes it: its
blocks are rewritten, and summarised again, in order.

Needs: pages a multiple of the selector's block size; no prefix caching (sparse decode steps
write K/V that dense prefill would not, so pages must not be shared).
"""

from __future__ import annotations

import torch

from rlcore.sparse.decode import block_sparse_decode
from rlcore.sparse.selection import BlockSelector


def token_positions(query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """Each token's position in its sequence, for a forward over requests whose new tokens are
    query_start_loc[r]:query_start_loc[r+1] and whose sequences are seq_lens[r] long with them."""
    query_lens = query_start_loc.diff()
    rows = torch.repeat_interleave(torch.arange(len(query_lens), device=query_lens.device), query_lens)
    first_new = seq_lens[: len(query_lens)] - query_lens  # position of each request's first new token
    return first_new[rows] + torch.arange(len(rows), device=rows.device) - query_start_loc[rows]


class PagedSummaries:
    """One layer's block summaries [pages, blocks per page, H_kv, ...] for one selector (page
    first and heads inside, so a row's summaries are whole pages read in one index_select)."""

    def __init__(self, selector: BlockSelector, layer_idx: int):
        self.selector, self.layer_idx = selector, layer_idx
        self.table: torch.Tensor | None = None  # made on the first write, when the summary's shape is known

    def update(self, key_cache: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> None:
        """Summarise the blocks whose last key this forward wrote: key_cache [P, H_kv, page, D]
        (a logical view of the stored layout), the tokens' cache slots (page · page + offset)
        and sequence positions."""
        bs, page = self.selector.block_size, key_cache.shape[2]
        ends = (positions % bs) == bs - 1
        if not ends.any():
            return
        slots, block_ids = slots[ends].long(), positions[ends].long() // bs
        pages, first = slots // page, slots % page - (bs - 1)
        offsets = first[:, None] + torch.arange(bs, device=slots.device)  # [N, bs]
        keys = key_cache[pages[:, None], :, offsets]  # [N, bs, H_kv, D]
        summaries = self.selector.summarize(self.layer_idx, keys.permute(2, 0, 1, 3)[None], block_ids)[0]  # [H_kv, N, ...]
        if self.table is None:
            shape = (key_cache.shape[0], page // bs, key_cache.shape[1], *summaries.shape[2:])
            self.table = torch.zeros(shape, dtype=summaries.dtype, device=summaries.device)
        self.table[pages, first // bs] = summaries.transpose(0, 1)

    def gather(self, page_table: torch.Tensor, kv_len: torch.Tensor, max_kv_len: int) -> torch.Tensor | None:
        """Summaries [R, H_kv, n, ...] of blocks 0…n−1 of each row (n = max_kv_len // bs; a row's
        blocks past its complete ones hold anything), None if no block is complete yet."""
        bs, n = self.selector.block_size, max_kv_len // self.selector.block_size
        if self.table is None or n == 0:
            return None
        per_page = self.table.shape[1]
        n_pages = -(-n // per_page)
        last_page = (kv_len - 1) // (per_page * bs)
        columns = torch.minimum(torch.arange(n_pages, device=kv_len.device), last_page[:, None])  # each row's own pages
        pages = page_table.long().gather(1, columns)  # [R, n_pages]
        table = torch.index_select(self.table, 0, pages.flatten())  # [R·n_pages, per_page, H_kv, ...]
        table = table.view(len(pages), n_pages * per_page, *self.table.shape[2:])[:, :n]
        return table.transpose(1, 2)  # [R, n, H_kv, ...] → [R, H_kv, n, ...]


def sparse_decode_rows(summaries: PagedSummaries, query: torch.Tensor, key_cache: torch.Tensor,
                       value_cache: torch.Tensor, page_table: torch.Tensor, kv_len: torch.Tensor, max_kv_len: int,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of R requests: query [R, H_q, D] at positions kv_len − 1 over their pages
    (page_table [R, pages]) of key_cache/value_cache [P, H_kv, page, D]. Returns the attention
    output [R, H_q, D] and the block table used."""
    selector = summaries.selector
    table = selector.choose(summaries.layer_idx, query, summaries.gather(page_table, kv_len, max_kv_len),
                            kv_len, max_kv_len, key_cache.shape[1])
    out = block_sparse_decode(query, key_cache, value_cache, table, kv_len, selector.block_size, scale,
                              page_table=page_table)
    return out, table
