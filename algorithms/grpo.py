"""GRPO: group-relative advantages (DeepSeekMath), with Dr.GRPO's no-std option."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlcore.algorithm import Algorithm, expand_to_tokens, group_sums, register_algorithm


def grpo_advantages(rewards: Tensor, group_ids: Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Per-sample advantage (r_i − mean_g) / (std_g + eps), or r_i − mean_g when scale_by_std is off.

    std is the unbiased (Bessel) standard deviation, as in the GRPO reference code;
    a group of one sample gets advantage 0.
    """
    rewards = rewards.double()
    num_groups = int(group_ids.max()) + 1
    counts = group_sums(torch.ones_like(rewards), group_ids, num_groups)
    mean = group_sums(rewards, group_ids, num_groups) / counts
    centred = rewards - mean[group_ids]
    if scale_by_std:
        var = group_sums(centred**2, group_ids, num_groups) / (counts - 1).clamp(min=1)
        centred = centred / (var.sqrt()[group_ids] + eps)
    return torch.where(counts[group_ids] > 1, centred, 0.0).float()


@register_algorithm("grpo")
@dataclass
class GRPO(Algorithm):
    """PPO-clip with group-relative advantages. scale_by_std=false is Dr.GRPO's variant."""

    scale_by_std: bool = True

    def advantages(self, batch) -> Tensor:
        per_sample = grpo_advantages(batch["rewards"], batch["group_ids"], self.scale_by_std)
        return expand_to_tokens(per_sample, batch["response_mask"])
