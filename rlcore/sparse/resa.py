"""ReSA block selection (SPEC §8): per-block key min/max summaries and a query-aware upper bound.

For a key block with elementwise bounds k_min ≤ k ≤ k_max, Σ_j max(q_j·kmin_j, q_j·kmax_j)
bounds q·k from above for every key in the block, so a block whose bound is low cannot hold a
large attention logit. One query per KV group (the mean of its g query heads, scaled by d^-½)
makes the selection group-query-aware: all heads of a group read the same blocks, which is
what lets the kernel load each selected block once per group.

Rectification (dense re-run of the newest f tokens) lives in rlcore.sparse.generate.
"""

from __future__ import annotations

import torch

from rlcore.sparse.selection import BlockSelector


class ReSASelector(BlockSelector):
    def __init__(self, block_size: int = 16, keep_ratio: float = 0.1, min_blocks: int = 16):
        super().__init__(block_size, keep_ratio=keep_ratio, min_blocks=min_blocks)

    def summarize(self, layer_idx: int, key_blocks: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """[B, H_kv, n, bs, D] → [B, H_kv, n, 2, D]: elementwise (min, max) over each block."""
        return torch.stack([key_blocks.amin(dim=3), key_blocks.amax(dim=3)], dim=3)

    def block_scores(self, layer_idx: int, query: torch.Tensor, summaries: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
        b, h_kv, _, _, d = summaries.shape
        q = query.view(b, h_kv, -1, d).float().mean(dim=2) * d**-0.5  # [B, H_kv, D]
        # max(q_j·kmin_j, q_j·kmax_j) is q_j·kmax_j where q_j ≥ 0 and q_j·kmin_j elsewhere
        # (kmin ≤ kmax): one product with the weights (q⁻, q⁺) over the (min, max) pair. As a
        # multiply-and-sum, not a matrix-vector matmul: ~5x faster on CPU (measured, 512 blocks).
        weights = torch.stack([q.clamp(max=0), q.clamp(min=0)], dim=2)  # [B, H_kv, 2, D]
        return (summaries.float() * weights[:, :, None]).sum(dim=(-2, -1))
