"""RLOO: REINFORCE with a leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024).

Each sample's baseline is the mean reward of the *other* K−1 samples of its group:
A_i = r_i − (Σ_g r_j − r_i) / (K − 1), the same for every response token. No division
by a std. A group of one sample has no other sample and gets advantage 0.
The loss is the shared PPO-clip one (with one optimizer step per batch the ratio is 1
and it is plain REINFORCE, as in the paper); loss_agg defaults to token-mean
(**open** in the paper, which sums per sequence; set seq-mean-token-sum for that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlcore.algorithm import Algorithm, expand_to_tokens, group_sums, register_algorithm


def rloo_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """A_i = r_i − mean of the other rewards in i's group; 0 for a group of one."""
    rewards = rewards.double()
    num_groups = int(group_ids.max()) + 1
    counts = group_sums(torch.ones_like(rewards), group_ids, num_groups)[group_ids]
    others = (group_sums(rewards, group_ids, num_groups)[group_ids] - rewards) / (counts - 1).clamp(min=1)
    return torch.where(counts > 1, rewards - others, 0.0).float()


@register_algorithm("rloo")
@dataclass
class RLOO(Algorithm):
    """PPO-clip (REINFORCE when on-policy) with the leave-one-out group baseline. No extra options."""

    def advantages(self, batch) -> Tensor:
        return expand_to_tokens(rloo_advantages(batch["rewards"], batch["group_ids"]), batch["response_mask"])
