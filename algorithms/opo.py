"""OPO: exact on-policy RL with the optimal (length-weighted) reward baseline.

See SPEC §1. The variance-minimising baseline is E[‖∇log π‖²·r] / E[‖∇log π‖²],
and ‖∇log π(y)‖² grows with the length of y, so OPO weights each reward by its
response length: b = Σ l_i·r_i / Σ l_i over the group (or the whole batch,
`baseline=batch`, the `optimal_batch` variant used with REINFORCE++).
Exact on-policy means one optimizer step per rollout batch, so the importance
ratio is exactly 1, clipping never acts, and the loss is REINFORCE with this
baseline. The config check below enforces it; the loss checks the ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from rlcore.algorithm import Algorithm, LossNorm, expand_to_tokens, group_sums, register_algorithm
from rlcore.config import ConfigError, check_choice


def opo_advantages(rewards: Tensor, lengths: Tensor, group_ids: Tensor) -> Tensor:
    """A_i = r_i − Σ_g l_j·r_j / Σ_g l_j within each group g. A group of one sample gets 0."""
    rewards, lengths = rewards.double(), lengths.double()
    num_groups = int(group_ids.max()) + 1
    baseline = group_sums(lengths * rewards, group_ids, num_groups) / group_sums(lengths, group_ids, num_groups).clamp(min=1e-12)
    return (rewards - baseline[group_ids]).float()


class NotOnPolicyError(RuntimeError):
    pass


@register_algorithm("opo")
@dataclass
class OPO(Algorithm):
    """Options: baseline=group|batch; ratio_tolerance: largest |ratio−1| accepted before
    the run stops (numerical noise between the old-logprob and update passes is ~1e-6)."""

    baseline: str = "group"
    ratio_tolerance: float = 1e-3

    def __post_init__(self):
        super().__post_init__()
        check_choice("algorithm.baseline", self.baseline, ["group", "batch"])
        if self.mini_batches != 1 or self.epochs != 1:
            raise ConfigError(
                f"algorithm.mini_batches={self.mini_batches}, algorithm.epochs={self.epochs}: OPO is exactly "
                "on-policy (one optimizer step per rollout batch); set both to 1"
            )
        if self.kl_coef:
            raise ConfigError(f"algorithm.kl_coef={self.kl_coef}: OPO uses no KL term; set it to 0")

    @property
    def baseline_within_groups(self) -> bool:
        return self.baseline == "group"

    def advantages(self, batch) -> Tensor:
        group_ids = batch["group_ids"] if self.baseline == "group" else batch["group_ids"] * 0
        per_sample = opo_advantages(batch["rewards"], batch["response_lengths"], group_ids)
        return expand_to_tokens(per_sample, batch["response_mask"])

    def loss(self, logp: Tensor, batch, norm: LossNorm):
        loss, metrics = super().loss(logp, batch, norm)
        if metrics["ratio_max_dev"] > self.ratio_tolerance:
            raise NotOnPolicyError(
                f"OPO importance ratio deviates from 1 by {float(metrics['ratio_max_dev']):.2e} "
                f"(> algorithm.ratio_tolerance={self.ratio_tolerance}): the policy changed between the "
                "old-logprob pass and the update, so the run is not on-policy"
            )
        return loss, metrics
