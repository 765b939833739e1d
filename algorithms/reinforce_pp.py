"""REINFORCE++ (Hu 2025, arXiv 2501.03262): the reward, normalised over the whole batch.

Advantage of every response token of sample i: (r_i − μ) / (σ + eps), where μ and σ are
the mean and the (biased) standard deviation over all response *tokens* of the batch, as
in the reference implementation (OpenRLHF normalises over action tokens). A sample of
length l_i counts l_i times, so μ = Σ l_i·r_i / Σ l_i — exactly OPO's length-weighted
baseline over the whole batch (SPEC §1 `optimal_batch`). `scale_by_std=false` drops the
division by σ, which is OPO's optimal_batch variant: A_i = r_i − Σ l_j·r_j / Σ l_j.
Lengths are `response_lengths` (the tokens generated), the same lengths OPO weights by.

Choices where the paper differs from this loop: REINFORCE++ puts a per-token KL penalty
into the reward; here the reference log-probs are computed after the advantages, so the
KL term goes into the loss instead (algorithm.kl_coef, default 0 = no reference model).
Loss: the shared PPO-clip, token-mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlcore.algorithm import Algorithm, expand_to_tokens, register_algorithm
from rlcore.algorithms.opo import opo_advantages


def reinforce_pp_advantages(rewards: Tensor, lengths: Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """(r_i − μ) / (σ + eps), μ and σ over all response tokens of the batch (length-weighted
    over samples); r_i − μ when scale_by_std is off. A batch of one sample gets 0."""
    centred = opo_advantages(rewards, lengths, torch.zeros_like(rewards, dtype=torch.long)).double()
    if scale_by_std:
        lengths = lengths.double()
        std = ((lengths * centred**2).sum() / lengths.sum().clamp(min=1e-12)).sqrt()
        centred = centred / (std + eps)
    return centred.float()


@register_algorithm("reinforce_pp")
@dataclass
class ReinforcePP(Algorithm):
    """scale_by_std=false is OPO's `optimal_batch` variant (batch baseline, no std)."""

    scale_by_std: bool = True

    def advantages(self, batch) -> Tensor:
        per_sample = reinforce_pp_advantages(batch["rewards"], batch["response_lengths"], self.scale_by_std)
        return expand_to_tokens(per_sample, batch["response_mask"])
