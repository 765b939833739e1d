"""Choosing key blocks for one decode step: the part SeerAttention-R and ReSA share.

A selector scores the *complete* key blocks of each (row, KV head), always keeps the newest
block (partial or just filled: its keys are the ones the next tokens attend to most and it has
no summary yet), and returns a block table for `rlcore.sparse.decode.block_sparse_decode`.

Block summaries (ReSA's key min/max, SeerAttention-R's gated pooled keys) are made once per
block, when it fills. `select` keeps them per layer for a batch of sequences it follows (the
transformers backend; `truncate` drops summaries past a cache length when the cache is
rewritten by ReSA's rectification); rlcore.sparse.paged keeps them per page of vLLM's paged
cache. Both end in `choose`, which takes rows of different lengths.
"""

from __future__ import annotations

import torch


class BlockSelector:
    """Subclasses define `summarize` (blocks → summaries) and `block_scores` (query × summaries)."""

    def __init__(self, block_size: int, budget_blocks: int | None = None, keep_ratio: float | None = None,
                 min_blocks: int = 1, threshold: float | None = None):
        """How many blocks to keep: `budget_blocks` (a fixed count), `keep_ratio` (ceil of a share
        of the blocks, at least `min_blocks`), or `threshold` (every block scoring above it).
        The newest block counts towards the budget and is always kept."""
        if sum(x is not None for x in (budget_blocks, keep_ratio, threshold)) != 1:
            raise ValueError("BlockSelector: give exactly one of budget_blocks, keep_ratio, threshold")
        self.block_size = block_size
        self.budget_blocks = budget_blocks
        self.keep_ratio = keep_ratio
        self.min_blocks = min_blocks
        self.threshold = threshold
        self._summaries: dict[int, torch.Tensor] = {}

    # -- what a method defines -------------------------------------------------------------

    def summarize(self, layer_idx: int, key_blocks: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """key_blocks [B, H_kv, n, bs, D] (post-RoPE keys of complete blocks; block_ids [n] says
        which block of its sequence each one is) → summaries [B, H_kv, n, ...]."""
        raise NotImplementedError

    def block_scores(self, layer_idx: int, query: torch.Tensor, summaries: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
        """query [B, H_q, D] (post-RoPE, row b at sequence position positions[b]) → scores
        [B, H_kv, n]. Row b's blocks from (positions[b] + 1) // bs on are not its complete
        blocks (rows of a paged batch differ in length): their scores are ignored."""
        raise NotImplementedError

    # -- shared machinery ------------------------------------------------------------------

    def reset(self) -> None:
        """A new batch of sequences: forget every cached summary."""
        self._summaries.clear()

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Only these batch rows, in this order (finished rows leave the decode batch)."""
        self._summaries = {layer: s[rows] for layer, s in self._summaries.items()}

    def truncate(self, kv_len: int) -> None:
        """The cache from position kv_len on will be rewritten: drop the blocks it touches."""
        complete = kv_len // self.block_size
        for layer, s in self._summaries.items():
            self._summaries[layer] = s[:, :, :complete]

    def summaries(self, layer_idx: int, keys: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Summaries of the complete blocks of keys[:, :, :kv_len], updated for newly filled blocks."""
        cached = self._summaries.get(layer_idx)
        done = 0 if cached is None else cached.shape[2]
        if done < kv_len // self.block_size:
            fresh = self.block_summaries(layer_idx, keys, kv_len, done)
            cached = fresh if cached is None else torch.cat([cached, fresh], dim=2)
            self._summaries[layer_idx] = cached
        return cached

    def block_summaries(self, layer_idx: int, keys: torch.Tensor, kv_len: int, first_block: int = 0) -> torch.Tensor:
        """Summaries of the complete blocks first_block… of keys[:, :, :kv_len], not cached."""
        bs = self.block_size
        complete = kv_len // bs
        b, h, _, d = keys.shape
        blocks = keys[:, :, first_block * bs : complete * bs].reshape(b, h, complete - first_block, bs, d)
        return self.summarize(layer_idx, blocks, torch.arange(first_block, complete, device=keys.device))

    def keep_count(self, n_blocks: torch.Tensor) -> torch.Tensor:
        """How many of n_blocks [B] blocks each row keeps."""
        if self.budget_blocks is not None:
            return n_blocks.clamp(max=self.budget_blocks)
        if self.keep_ratio is not None:  # ceil in float64, as Python's math.ceil(n * ratio)
            wanted = torch.ceil(n_blocks.double() * self.keep_ratio).long().clamp(min=self.min_blocks)
            return torch.minimum(n_blocks, wanted)
        return n_blocks  # threshold: at most every block

    def select(self, layer_idx: int, query: torch.Tensor, keys: torch.Tensor, kv_len: int) -> torch.Tensor:
        """`choose` for the query at position kv_len - 1 of each row over keys[:, :, :kv_len],
        the rows of a batch this selector follows (summaries cached, see `summaries`)."""
        b, h = keys.shape[:2]
        summaries = self.summaries(layer_idx, keys, kv_len) if kv_len >= self.block_size else None
        lengths = torch.full((b,), kv_len, device=keys.device)
        return self.choose(layer_idx, query, summaries, lengths, kv_len, h)

    def choose(self, layer_idx: int, query: torch.Tensor, summaries: torch.Tensor | None, kv_len: torch.Tensor,
               max_kv_len: int, num_kv_heads: int) -> torch.Tensor:
        """Block table int32 [B, H_kv, n_sel] for row b's query at position kv_len[b] - 1, given
        the summaries [B, H_kv, n, ...] of (at least) each row's complete blocks (None: no row
        has one); ascending block order, -1 padded (rows keeping fewer blocks, threshold mode).
        max_kv_len ≥ every kv_len, known without reading kv_len (no device sync)."""
        bs = self.block_size
        b = query.shape[0]
        n_max = -(-max_kv_len // bs)
        kv_len = kv_len.to(query.device, torch.long)
        n_blocks, complete = (kv_len + bs - 1) // bs, kv_len // bs
        scores = torch.full((b, num_kv_heads, n_max), float("-inf"), device=query.device)
        if summaries is not None:
            n = summaries.shape[2]
            real = torch.arange(n, device=query.device) < complete[:, None, None]
            scores[:, :, :n] = self.block_scores(layer_idx, query, summaries, kv_len - 1).float().masked_fill(~real, float("-inf"))
        newest = (n_blocks - 1).view(b, 1, 1).expand(b, num_kv_heads, 1)
        scores.scatter_(2, newest, float("inf"))  # the newest block, even when it just filled
        top = scores.topk(int(self.keep_count(torch.tensor([n_max]))), dim=-1)
        chosen = torch.arange(top.indices.shape[-1], device=query.device) < self.keep_count(n_blocks)[:, None, None]
        if self.threshold is not None:
            chosen = chosen & (top.values > self.threshold)
        table = top.indices.masked_fill(~chosen, n_max).sort(dim=-1).values  # not chosen: sorted last
        if self.threshold is not None:
            table = table[..., : int(chosen.sum(-1).max())]
        return table.masked_fill(table == n_max, -1).to(torch.int32)
