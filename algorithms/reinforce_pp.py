"""REINFORCE++ (Hu 2025, arXiv 2501.03262): per-token returns, normalised over the whole batch.

Return of response token t of sample i: G_t = r_i − β·Σ_{s≥t} kl_s (γ = 1), the outcome reward
r_i on the last token and REINFORCE++'s KL penalty −β·kl_s on every token s
(`reward_kl_coef` = β; kl_s = log π_rollout − log π_ref, the k1 estimate on the sampled token).
Advantage: (G_t − μ) / (σ + eps), μ and σ the mean and (biased) standard deviation over all
response *tokens* of the batch, as in the reference implementation (OpenRLHF normalises over
action tokens).

With β = 0 (the default) every token of sample i has G_t = r_i, so μ = Σ l_i·r_i / Σ l_i —
exactly OPO's length-weighted baseline over the whole batch (SPEC §1 `optimal_batch`), and
`scale_by_std=false` (no division by σ) is OPO's optimal_batch variant: A_i = r_i − Σ l_j·r_j / Σ l_j.

Choices: the KL in the reward uses the rollout engine's log-probs (the policy that sampled;
the learner's old log-probs may come from the update pass itself, after the advantages are
needed). The KL-in-loss term (`kl_coef`) stays available as for every algorithm; the two can
be combined, though the paper uses only the reward form. Loss: the shared PPO-clip, token-mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlcore.algorithm import Algorithm, register_algorithm
from rlcore.config import ConfigError


def kl_penalised_returns(rewards: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """[B, R] per-token returns G_t = r_i − β·Σ_{s≥t} kl_s over the masked tokens (0 elsewhere)."""
    penalty = -beta * kl * mask
    to_go = penalty.flip(-1).cumsum(-1).flip(-1)  # Σ_{s≥t}
    return (rewards[:, None] + to_go) * mask


def reinforce_pp_advantages(returns: Tensor, mask: Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """[B, R]: (G − μ) / (σ + eps), μ and σ over all masked tokens of the batch; G − μ when
    scale_by_std is off; 0 outside the mask."""
    mask, returns = mask.double(), returns.double()
    tokens = mask.sum().clamp(min=1e-12)
    centred = (returns - (returns * mask).sum() / tokens) * mask
    if scale_by_std:
        centred = centred / ((centred**2).sum() / tokens).sqrt().add(eps)
    return centred.float()


@register_algorithm("reinforce_pp")
@dataclass
class ReinforcePP(Algorithm):
    """scale_by_std=false is OPO's `optimal_batch` variant (batch baseline, no std);
    reward_kl_coef > 0 is REINFORCE++'s KL penalty in the per-token reward (loads the reference)."""

    scale_by_std: bool = True
    reward_kl_coef: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.reward_kl_coef < 0:
            raise ConfigError(f"algorithm.reward_kl_coef={self.reward_kl_coef} must be ≥ 0")

    @property
    def needs_reference(self) -> bool:
        return super().needs_reference or self.reward_kl_coef > 0

    @property
    def baseline_within_groups(self) -> bool:
        return False  # the batch's mean

    def advantages(self, batch) -> Tensor:
        mask = batch["response_mask"]
        kl = batch["rollout_logp"] - batch["ref_logp"] if self.reward_kl_coef else torch.zeros_like(mask)
        returns = kl_penalised_returns(batch["rewards"], kl, mask, self.reward_kl_coef)
        return reinforce_pp_advantages(returns, mask, self.scale_by_std)
