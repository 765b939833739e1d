"""DAPO (Yu et al. 2025, arXiv 2503.14476): GRPO with four changes.

1. Clip-higher: asymmetric clip range [1 − ε_low, 1 + ε_high], ε_low 0.2, ε_high 0.28.
2. Token-level loss: token-mean over the whole mini-batch (loss_agg=token-mean).
3. Dynamic sampling: groups whose rewards are all equal carry no signal under a group
   baseline; the loop drops them and samples more prompts until the batch is full again,
   for at most `max_sampling_rounds` generation rounds per step (see rlcore.trainer,
   `refill_groups`). If the rounds run out, dropped groups fill the rest, so the batch
   keeps its size (they have advantage 0). The filter looks at the reward the reward
   functions gave (the paper filters on accuracy; equal for a pure correctness reward),
   before the overlong penalty below.
4. Soft overlong punishment on the response length |y| in tokens, added to the reward
   before the group normalisation: 0 while |y| ≤ L_max − L_cache, then
   ((L_max − L_cache) − |y|) / L_cache down to −1 at L_max, −1 beyond (SPEC §3).
   Paper: L_max = overlong_max_tokens = 20480, L_cache = overlong_buffer = 4096;
   overlong_buffer=0 turns it off. It is applied here, on the advantage side, so that the
   dynamic-sampling filter sees the rewards without it (the same formula as the reward fn
   `soft_overlong`, rlcore.rewards.length).
No KL term (kl_coef 0), as in the paper. Advantages are GRPO's (std-normalised).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlcore.algorithm import expand_to_tokens, register_algorithm
from rlcore.algorithms.grpo import GRPO, grpo_advantages
from rlcore.config import ConfigError
from rlcore.rewards.length import overlong_penalty


@register_algorithm("dapo")
@dataclass
class DAPO(GRPO):
    """Options beyond GRPO's: dynamic_sampling, max_sampling_rounds, overlong_max_tokens, overlong_buffer."""

    clip_eps: float = 0.2
    clip_eps_high: float | None = 0.28
    dynamic_sampling: bool = True
    max_sampling_rounds: int = 4
    overlong_max_tokens: int = 20480
    overlong_buffer: int = 4096

    def __post_init__(self):
        super().__post_init__()
        if self.max_sampling_rounds < 1:
            raise ConfigError(f"algorithm.max_sampling_rounds={self.max_sampling_rounds} must be ≥ 1")
        if not 0 <= self.overlong_buffer <= self.overlong_max_tokens:
            raise ConfigError(
                f"algorithm.overlong_buffer={self.overlong_buffer} must be in [0, algorithm.overlong_max_tokens={self.overlong_max_tokens}]"
            )

    @property
    def sampling_rounds(self) -> int:
        return self.max_sampling_rounds if self.dynamic_sampling else 1

    def advantages(self, batch) -> Tensor:
        rewards = batch["rewards"]
        if self.overlong_buffer:
            lengths = batch["response_lengths"].tolist()
            rewards = rewards + torch.tensor([overlong_penalty(n, self.overlong_max_tokens, self.overlong_buffer) for n in lengths])
        return expand_to_tokens(grpo_advantages(rewards, batch["group_ids"], self.scale_by_std), batch["response_mask"])
