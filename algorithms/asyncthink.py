"""AsyncThink (SPEC §6, arXiv 2510.26658): GRPO over organizer/worker units.

The `fork_join` rollout program (rlcore.rollout.programs, rlcore.asyncthink) makes one RL unit
per sample: the organizer's trace and its workers' responses, one row each in the batch
(batch["unit_ids"]). The unit has one reward (the organizer's: rewards/asyncthink.py) and one
group-relative advantage, GRPO's over the units of a prompt, on every loss token of every row
of the unit: the organizer's sampled tokens and all its workers' tokens. Text a worker returned
and the program pasted into the organizer's context has loss mask 0.

Loss: PPO-clip, token mean over all loss tokens of the mini-batch (a unit with more workers
weighs more, as its tokens do; SPEC is silent), no KL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from rlcore.algorithm import expand_to_tokens, register_algorithm
from rlcore.algorithms.grpo import GRPO, grpo_advantages


def unit_advantages(rewards: Tensor, group_ids: Tensor, unit_ids: Tensor, scale_by_std: bool = True) -> Tensor:
    """[B] advantages: GRPO's over the units (their first rows), each unit's on all its rows; 0 on
    padding rows (unit −1). Units are numbered 0..U−1 in row order, a unit's rows consecutive."""
    first = unit_ids >= 0
    first[1:] &= unit_ids[1:] != unit_ids[:-1]
    per_unit = grpo_advantages(rewards[first], group_ids[first], scale_by_std)
    return per_unit[unit_ids.clamp(min=0)] * (unit_ids >= 0)


@register_algorithm("asyncthink")
@dataclass
class AsyncThink(GRPO):
    """GRPO whose samples are organizer/worker units (module docstring)."""

    program: ClassVar[str] = "fork_join"

    def advantages(self, batch) -> Tensor:
        per_row = unit_advantages(batch["rewards"], batch["group_ids"], batch["unit_ids"], self.scale_by_std)
        return expand_to_tokens(per_row, batch["response_mask"])
