"""RSPO (Zhang et al. 2025, arXiv 2510.23027): router-shift policy optimization for MoE models.

SPEC §4. Two parts:
- the router-shift ratio γ_t (rlcore.algorithm.router_shift_ratio): how far the router has
  moved, since the rollout, on the experts the old policy routed token t to. RSPO turns it on
  (router_shift=true); any other algorithm can too.
- a geometric-mean sequence objective with token-level clipping (GMPO's form), on the
  rescaled ratio w_t = γ_t·π(y_t)/π_old(y_t):
      x_t = w_t^{sgn A_i},   W_t = min(x_t, clip(x_t, ·, 1 + ε)),
      S_i = [Π_t W_t]^{sgn A_i / |o_i|},   J = mean_i S_i·A_i.
  min(x, clip(x, lo, hi)) is min(x, hi) for any lo ≤ 1, so only the upper bound acts: a token
  stops pushing once its ratio has moved 1 + ε in the direction of its advantage (up for
  A > 0, down to 1/(1 + ε) for A < 0). Every token of sequence i carries −S_i·A_i, and the
  loss is the mean over sequences (loss_agg=seq-mean-token-mean), as in GSPO.

Choices the SPEC leaves open, and why:
- γ multiplies the ratio *before* the clip, as the SPEC's text and the paper's abstract say;
  the SPEC's formula writes Π_t W_t·γ_t (γ after the clip), which for A < 0 would divide by
  γ and weight shifted tokens up, against the method's purpose. Before the clip, a shifted
  token's weight goes down whatever the sign of its advantage.
- ε = e^0.4 − 1 ≈ 0.49: GMPO's clip of the token log-ratio to ±0.4 (RSPO is GMPO plus the
  router shift). γ floor 0.1 (SPEC's default).
- Advantages are GRPO's, group-normalised, one per sequence.
- The routing measured is the one at the position whose logits give y_t (the position
  before y_t: rlcore.models.response_logprobs_with_routers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rlcore.algorithm import masked_row_mean, register_algorithm
from rlcore.algorithms.grpo import GRPO


def rspo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, eps: float):
    """The geometric-mean objective above. logp may already hold log γ (the rescaled ratio).
    advantages [B, R] (one value per row on its tokens). Returns (loss_i [B], S_i [B],
    clipped [B, R]: tokens whose x_t passed 1 + ε, which carry no gradient)."""
    sign = torch.sign(masked_row_mean(advantages, mask))
    log_x = sign[:, None] * (logp - old_logp)
    log_bound = math.log1p(eps)
    log_w = torch.clamp(log_x, max=log_bound)  # log min(x, 1 + ε)
    seq_ratio = torch.exp(sign * masked_row_mean(log_w, mask))
    return -seq_ratio * masked_row_mean(advantages, mask), seq_ratio, (log_x > log_bound) & (mask > 0)


@register_algorithm("rspo")
@dataclass
class RSPO(GRPO):
    clip_eps: float = math.exp(0.4) - 1
    loss_agg: str = "seq-mean-token-mean"
    router_shift: bool = True

    def policy_loss(self, logp: Tensor, batch) -> tuple[Tensor, Tensor, Tensor]:
        mask = batch["response_mask"]
        loss, seq_ratio, clipped = rspo_loss(logp, batch["old_logp"], batch["advantages"], mask, self.clip_range[1])
        # every token of sequence i carries its sequence's loss and ratio
        return loss[:, None].expand_as(mask), seq_ratio[:, None].expand_as(mask), clipped
