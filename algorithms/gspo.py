"""GSPO (Zheng et al. 2025, arXiv 2507.18071): the importance ratio and its clipping per sequence.

s_i = exp(mean_t log(π(y_i,t)/π_old(y_i,t))) over i's response tokens (the geometric mean
of the token ratios), loss_i = −min(s_i·A_i, clip(s_i, 1 − ε_low, 1 + ε_high)·A_i), and
the batch loss is the mean over sequences (loss_agg=seq-mean-token-mean: every token of
sequence i carries loss_i, so a sequence's token mean is loss_i). The gradient reaches
every token through s_i. Advantages are GRPO's, group-normalised, one per sequence.
Clip range from the paper: ε_low 3e-4, ε_high 4e-4 (SPEC §4). No KL term by default.
Truncated IS (algorithm.truncated_is) weights each token's share of loss_i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlcore.algorithm import masked_row_mean, ppo_clip, register_algorithm
from rlcore.algorithms.grpo import GRPO


def gspo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, eps_low: float, eps_high: float):
    """Sequence-level clipped surrogate. advantages [B, R] (one value per row on its tokens).
    Returns (loss_i, s_i, clipped_i), each [B]."""
    seq_log_ratio = masked_row_mean(logp - old_logp, mask)
    seq_adv = masked_row_mean(advantages, mask)
    return ppo_clip(seq_log_ratio, torch.zeros_like(seq_log_ratio), seq_adv, eps_low, eps_high)


@register_algorithm("gspo")
@dataclass
class GSPO(GRPO):
    clip_eps: float = 3e-4
    clip_eps_high: float | None = 4e-4
    loss_agg: str = "seq-mean-token-mean"

    def policy_loss(self, logp: Tensor, batch) -> tuple[Tensor, Tensor, Tensor]:
        mask = batch["response_mask"]
        loss, ratio, clipped = gspo_loss(logp, batch["old_logp"], batch["advantages"], mask, *self.clip_range)
        # every token of sequence i carries its sequence's loss, ratio and clip flag
        return loss[:, None].expand_as(mask), ratio[:, None].expand_as(mask), clipped[:, None].expand_as(mask)
