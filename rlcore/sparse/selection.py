"""Choosing key blocks for one decode step: the part SeerAttention-R and ReSA share.

A selector scores the *complete* key blocks of each (row, KV head), always keeps the newest
block (partial or just filled: its keys are the ones the next tokens attend to most and it has
no summary yet), and returns a block table for `rlcore.sparse.decode.block_sparse_decode`.

Block summaries (ReSA's key min/max, SeerAttention-R's gated pooled keys) are cached per
layer and computed lazily for blocks that filled since the last step, so a block is
summarised once, when it fills. `truncate` drops summaries past a cache length when the
cache is rewritten (ReSA's rectification re-runs the newest tokens).
"""

from __future__ import annotations

import math

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

    def summarize(self, layer_idx: int, key_blocks: torch.Tensor, first_block: int) -> torch.Tensor:
        """key_blocks [B, H_kv, n, bs, D] (post-RoPE keys of complete blocks first_block…) →
        summaries [B, H_kv, n, ...]."""
        raise NotImplementedError

    def block_scores(self, layer_idx: int, query: torch.Tensor, summaries: torch.Tensor,
                     position: int) -> torch.Tensor:
        """query [B, H_q, D] (post-RoPE, at cache position `position`) → scores [B, H_kv, n]."""
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
        return self.summarize(layer_idx, blocks, first_block)

    def keep_count(self, n_blocks: int) -> int:
        if self.budget_blocks is not None:
            return min(n_blocks, self.budget_blocks)
        if self.keep_ratio is not None:
            return min(n_blocks, max(self.min_blocks, math.ceil(n_blocks * self.keep_ratio)))
        return n_blocks  # threshold: at most every block

    def select(self, layer_idx: int, query: torch.Tensor, keys: torch.Tensor, kv_len: int,
               cached: bool = True) -> torch.Tensor:
        """Block table int32 [B, H_kv, n_sel] for the query at position kv_len - 1 over
        keys[:, :, :kv_len]; ascending block order, -1 padded (threshold mode only).
        cached=False: summarise every complete block now and keep nothing (keys of a sequence
        this selector does not follow, e.g. one request of vLLM's batch)."""
        bs = self.block_size
        n_blocks = -(-kv_len // bs)
        b, h = keys.shape[:2]
        scores = torch.full((b, h, n_blocks), float("inf"), device=keys.device)
        complete = kv_len // bs
        if complete:
            summaries = (self.summaries if cached else self.block_summaries)(layer_idx, keys, kv_len)
            scores[:, :, :complete] = self.block_scores(layer_idx, query, summaries, kv_len - 1).float()
        scores[:, :, n_blocks - 1] = float("inf")  # the newest block, even when it just filled
        keep = self.keep_count(n_blocks)
        top = scores.topk(keep, dim=-1)
        table = top.indices
        if self.threshold is not None:
            table = torch.where(top.values > self.threshold, table, torch.full_like(table, n_blocks))
            table = table.sort(dim=-1).values
            table = table[..., : int((table < n_blocks).sum(-1).max())]
            table = torch.where(table < n_blocks, table, torch.full_like(table, -1))
        else:
            table = table.sort(dim=-1).values
        return table.to(torch.int32)
