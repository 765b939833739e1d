"""HGPO: hybrid group policy optimisation (Large Hybrid-Reasoning Models, arXiv 2505.14631; SPEC §2).

A prompt's N samples come from the `hybrid` rollout program: N/2 forced into think mode, N/2
into no-think mode, the mode tag being response token 0 (batch["modes"]: 1 think, 0 no-think).
From the task rewards r_i and the prompt's per-mode means R̄_think, R̄_no:

- inter-group reward: 1 for each sample of the winning mode argmax{R̄_think, R̄_no + δ}, else 0.
  Think wins only when R̄_think > R̄_no + δ strictly; a tie goes to no-think, which δ favours.
- intra-group reward: 1 for the best sample within its own mode, else 0. Every tied best gets 1
  (SPEC's choice), so a mode whose samples all score the same (all wrong too) gives all of them 1.
- advantage A_i,t = norm(r_intra)_i + 1[t = 0]·α·norm(r_inter)_i, with norm over all N samples of
  the prompt: GRPO's (x − mean) / (std + 1e-6), Bessel std (grpo_advantages). Equal values
  normalise to 0: when every intra reward of a prompt is 1 (each mode's samples tied), only the
  tag term is left. The inter rewards are never all equal (both modes present, one wins), so the
  tag always carries ±α·0.935 for N = 8 (±α/√2 for N = 2).

Loss: the base PPO-clip, per-sample token mean (seq-mean-token-mean), plus β·KL (k3) to the
reference (the start model) on the sampled tokens, not on the forced tag (rlcore's choice; SPEC is
silent): k3 = exp(Δ) − 1 − Δ, Δ = log π_ref − log π, estimates KL from samples of π, and the tag
of the losing mode is no sample: the inter term keeps pushing its probability down, Δ grows, and
exp(Δ) made the tag's "KL" the largest term of the loss (kl_ref 6–16 per token on average over the
last steps, peaks of 59–1418, at lr 1e-5–5e-5; the tug of war settles near β·exp(Δ) ≈ α·0.935).
Without the tag, kl_ref stayed ≤ 0.4 and free-mode accuracy held (README). Defaults are the
paper's: α 1.0, δ 0.2, β 0.001, 4 samples per mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from rlcore.algorithm import Algorithm, expand_to_tokens, group_sums, register_algorithm
from rlcore.algorithms.grpo import grpo_advantages
from rlcore.config import ConfigError
from rlcore.hybrid import NO_THINK, THINK


def hgpo_rewards(rewards: Tensor, modes: Tensor, group_ids: Tensor, delta: float) -> tuple[Tensor, Tensor]:
    """(intra, inter) rewards per sample [B] (see the module docstring)."""
    if not ((modes == THINK) | (modes == NO_THINK)).all():
        raise ValueError("HGPO needs every trajectory's mode (batch['modes'] 0 or 1): trajectories of the hybrid rollout program")
    rewards = rewards.double()
    num_groups = int(group_ids.max()) + 1
    cell = group_ids * 2 + modes  # one cell per (prompt, mode); THINK = 1, NO_THINK = 0
    counts = group_sums(torch.ones_like(rewards), cell, 2 * num_groups)
    if (counts == 0).any():
        raise ValueError("HGPO needs samples of both modes for every prompt (the hybrid rollout program)")
    means = (group_sums(rewards, cell, 2 * num_groups) / counts).view(num_groups, 2)
    winner = torch.where(means[:, THINK] > means[:, NO_THINK] + delta, THINK, NO_THINK)
    inter = (modes == winner[group_ids]).double()
    best = torch.full((2 * num_groups,), -torch.inf, dtype=rewards.dtype).scatter_reduce(0, cell, rewards, "amax")
    intra = (rewards == best[cell]).double()
    return intra, inter


def hgpo_advantages(rewards: Tensor, modes: Tensor, group_ids: Tensor, mask: Tensor, alpha: float, delta: float) -> Tensor:
    """[B, R] advantages: norm(r_intra) on every response token, plus α·norm(r_inter) on token 0 (the mode tag)."""
    intra, inter = hgpo_rewards(rewards, modes, group_ids, delta)
    advantages = expand_to_tokens(grpo_advantages(intra, group_ids), mask)
    advantages[:, 0] += alpha * grpo_advantages(inter, group_ids) * mask[:, 0]
    return advantages


@register_algorithm("hgpo")
@dataclass
class HGPO(Algorithm):
    """Options beyond the base: alpha (α, weight of the mode term on the tag token), delta (δ,
    the margin favouring no-think). samples_per_prompt is N, split evenly between the modes."""

    samples_per_prompt: int = 8
    loss_agg: str = "seq-mean-token-mean"
    kl_coef: float = 0.001
    alpha: float = 1.0
    delta: float = 0.2

    program: ClassVar[str] = "hybrid"

    def __post_init__(self):
        super().__post_init__()
        if self.samples_per_prompt % 2:
            raise ConfigError(f"algorithm.samples_per_prompt={self.samples_per_prompt} must be even: HGPO samples half of each group in each mode")
        if self.alpha < 0:
            raise ConfigError(f"algorithm.alpha={self.alpha} must be ≥ 0")

    def advantages(self, batch) -> Tensor:
        return hgpo_advantages(batch["rewards"], batch["modes"], batch["group_ids"], batch["response_mask"], self.alpha, self.delta)

    def kl_mask(self, batch) -> Tensor:
        """The response tokens after the forced mode tag (token 0): see the module doc."""
        mask = batch["response_mask"].clone()
        mask[:, 0] = 0
        return mask
