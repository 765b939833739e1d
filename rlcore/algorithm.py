"""The Algorithm interface and the loss pieces every algorithm shares.

An algorithm is a small dataclass registered by name: its fields are the
options a user sets under `algorithm.*`, `advantages()` turns rewards into
per-token advantages, and `loss()` is the policy loss for one micro-batch.
Tensors follow one layout (see rlcore.batch): per-sample tensors are [B],
per-token tensors are [B, R] over the response tokens, `response_mask` marks
the real ones.

Loss normalisation is global: a mini-batch is split over learner ranks and
micro-batches, and each piece divides by the *whole* mini-batch's token or
sequence count (`LossNorm`), so the summed gradient equals the gradient of
the loss computed on the whole mini-batch at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError
from torch import Tensor

from rlcore.config import ConfigError, check_choice

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_ESTIMATORS = ("k1", "k2", "k3")


class LossNorm(NamedTuple):
    """Token and sequence counts of the whole mini-batch a micro-batch belongs to."""

    tokens: float
    seqs: float


def aggregate(per_token: Tensor, mask: Tensor, mode: str, norm: LossNorm) -> Tensor:
    """Reduce a [B, R] per-token loss to a scalar.

    token-mean: Σ over all tokens / tokens in the mini-batch.
    seq-mean-token-mean: mean over sequences of each sequence's token mean.
    seq-mean-token-sum: mean over sequences of each sequence's token sum.
    """
    masked = per_token * mask
    if mode == "token-mean":
        return masked.sum() / norm.tokens
    if mode == "seq-mean-token-mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / norm.seqs
    if mode == "seq-mean-token-sum":
        return masked.sum() / norm.seqs
    raise ValueError(f"unknown loss aggregation {mode!r}")


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from samples of π (Schulman's k1/k2/k3)."""
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.exp(log_ratio) - 1 - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}")


def ppo_clip(logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_low: float, eps_high: float):
    """PPO's clipped surrogate per token. Returns (loss [B,R], ratio, clipped [B,R] bool)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    return torch.maximum(unclipped, clipped), ratio, clipped > unclipped


def truncated_is_weights(old_logp: Tensor, rollout_logp: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling for the rollout/learner mismatch: per token
    min(π_old / π_rollout, cap), no gradient. π_old is the learner's probability under the
    weights that generated the batch, π_rollout the engine's (vLLM, sparse decoding) for the
    same token; they differ by numerics, so the batch is slightly off-policy for the learner."""
    return torch.exp(old_logp - rollout_logp).clamp(max=cap).detach()


def router_shift_ratio(router_logp: Tensor, router_old_logp: Tensor, floor: float) -> Tensor:
    """RSPO's router-shift ratio per token (SPEC §4), no gradient: [B, R, L, K] → [B, R].

    router_old_logp: the old policy's router log-probs of the K experts it routed each token to,
    in each of the L MoE layers; router_logp: the current router's log-probs of the same experts.
    γ = exp(−mean over layers and experts of |log r_new − log r_old|), at least `floor`: 1 when
    the routing has not moved, smaller the more it has. Stop-gradient: the SPEC notes training
    collapses without it."""
    shift = (router_logp - router_old_logp).abs().mean(dim=(-2, -1))
    return torch.exp(-shift).clamp(min=floor).detach()


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_row_mean(x: Tensor, mask: Tensor) -> Tensor:
    """[B, R] → [B]: each row's mean over its masked tokens (0 for a row with none)."""
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def group_sums(values: Tensor, group_ids: Tensor, num_groups: int) -> Tensor:
    """Σ of `values` within each group, as a [num_groups] tensor."""
    return torch.zeros(num_groups, dtype=values.dtype).index_add_(0, group_ids, values)


def expand_to_tokens(per_sample: Tensor, mask: Tensor) -> Tensor:
    """[B] → [B, R], zero outside the response."""
    return per_sample[:, None] * mask


@dataclass
class Algorithm:
    """Base: PPO-clip policy loss, optional KL to a frozen reference.

    Subclasses set `advantages()`. Options (all settable as `algorithm.<name>`):
    samples_per_prompt: K responses per prompt (a group).
    mini_batches: optimizer steps per rollout batch (the batch split in this many parts).
    epochs: passes over the rollout batch.
    clip_eps / clip_eps_high: PPO clip range [1-clip_eps, 1+clip_eps_high] (high defaults to clip_eps).
    loss_agg: one of LOSS_AGGREGATIONS.
    kl_coef / kl_estimator: β·KL(π‖π_ref) added to the loss; kl_coef 0 loads no reference model.
    truncated_is / tis_cap: multiply the policy loss per token by min(π_old/π_rollout, tis_cap)
      (truncated_is_weights), correcting the rollout engine/learner mismatch; any algorithm.
    router_shift / router_shift_floor: MoE models only. Rescale each token's importance ratio by
      RSPO's router-shift ratio γ (router_shift_ratio, floored at router_shift_floor) before the
      policy loss clips and aggregates it; any algorithm. The old log-prob pass then records the
      experts each token was routed to (LearnerRank.logprobs).

    `policy_loss()` is the per-token policy-gradient term (PPO-clip here; GSPO overrides it);
    `loss()` adds truncated IS, the KL term and the aggregation around it.
    Dynamic sampling (DAPO) is asked of the loop through `sampling_rounds` (1 = off).
    """

    samples_per_prompt: int = 8
    mini_batches: int = 1
    epochs: int = 1
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    loss_agg: str = "token-mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    truncated_is: bool = False
    tis_cap: float = 2.0
    router_shift: bool = False
    router_shift_floor: float = 0.1

    name: ClassVar[str] = ""
    # Which rollout program produces its trajectories (rlcore.rollout.programs).
    program: ClassVar[str] = "single"

    def __post_init__(self):
        check_choice("algorithm.loss_agg", self.loss_agg, LOSS_AGGREGATIONS)
        check_choice("algorithm.kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        for key in ("samples_per_prompt", "mini_batches", "epochs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"algorithm.{key}={getattr(self, key)} must be ≥ 1")
        if self.samples_per_prompt == 1 and self.baseline_within_groups:
            raise ConfigError(f"algorithm.samples_per_prompt=1: {self.name}'s baseline comes from the other samples of the "
                              "same prompt, and with none every advantage is 0; set it to 2 or more")
        if self.clip_eps <= 0 or (self.clip_eps_high is not None and self.clip_eps_high <= 0):
            raise ConfigError(f"algorithm.clip_eps={self.clip_eps}, clip_eps_high={self.clip_eps_high}: the clip range "
                              "[1 - clip_eps, 1 + clip_eps_high] needs both > 0")
        if self.kl_coef < 0:
            raise ConfigError(f"algorithm.kl_coef={self.kl_coef} must be ≥ 0")
        if self.tis_cap <= 0:
            raise ConfigError(f"algorithm.tis_cap={self.tis_cap} must be > 0")
        if not 0 < self.router_shift_floor <= 1:
            raise ConfigError(f"algorithm.router_shift_floor={self.router_shift_floor} must be in (0, 1]")

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    @property
    def needs_router(self) -> bool:
        """Whether the learner records the MoE routing of the old policy (router_shift)."""
        return self.router_shift

    @property
    def baseline_within_groups(self) -> bool:
        """Whether advantages compare a sample with the others of its prompt (its group)."""
        return True

    @property
    def sampling_rounds(self) -> int:
        """Most generation rounds per step; > 1 asks the loop for dynamic sampling (DAPO): drop
        groups with all-equal rewards and sample more prompts to refill the batch."""
        return 1

    def advantages(self, batch) -> Tensor:
        """[B, R] per-token advantages from batch["rewards"], ["group_ids"], ["response_mask"]."""
        raise NotImplementedError

    def kl_mask(self, batch) -> Tensor:
        """[B, R] tokens the KL term covers: the response tokens the policy sampled. The k1/k2/k3
        estimators are estimates from samples of π; a token forced by the rollout program is not one."""
        return batch["response_mask"]

    @property
    def clip_range(self) -> tuple[float, float]:
        """(ε_low, ε_high): the ratio is clipped to [1 − ε_low, 1 + ε_high]."""
        return self.clip_eps, self.clip_eps if self.clip_eps_high is None else self.clip_eps_high

    def policy_loss(self, logp: Tensor, batch) -> tuple[Tensor, Tensor, Tensor]:
        """Per-token policy-gradient loss [B, R], importance ratio and clipped flags (both
        [B, R]). Token-level PPO-clip on batch["advantages"]."""
        return ppo_clip(logp, batch["old_logp"], batch["advantages"], *self.clip_range)

    def loss(self, logp: Tensor, batch, norm: LossNorm) -> tuple[Tensor, dict[str, Tensor]]:
        mask = batch["response_mask"]
        metrics = {"approx_kl_old": masked_mean(kl_estimate(logp, batch["old_logp"], "k3"), mask)}
        ratio_logp = logp  # the log-prob the importance ratio is taken of
        if self.router_shift:  # γ·π/π_old = exp(logp + log γ − old_logp): every policy loss sees the rescaled ratio
            gamma = router_shift_ratio(batch["router_logp"], batch["router_old_logp"], self.router_shift_floor)
            ratio_logp = logp + gamma.log()
            metrics["router_shift_gamma"] = masked_mean(gamma, mask)
            metrics["router_shift_floored_frac"] = masked_mean((gamma <= self.router_shift_floor).float(), mask)
        per_token, ratio, clipped = self.policy_loss(ratio_logp, batch)
        metrics |= {"clip_frac": masked_mean(clipped.float(), mask), "ratio_max_dev": ((ratio - 1).abs() * mask).max()}
        if self.truncated_is:
            weights = truncated_is_weights(batch["old_logp"], batch["rollout_logp"], self.tis_cap)
            per_token = per_token * weights
            metrics["tis_weight"] = masked_mean(weights, mask)
            metrics["tis_capped_frac"] = masked_mean((weights >= self.tis_cap).float(), mask)
        if self.kl_coef > 0:
            sampled = self.kl_mask(batch)
            kl = kl_estimate(logp, batch["ref_logp"], self.kl_estimator) * sampled
            per_token = per_token + self.kl_coef * kl
            metrics["kl_ref"] = masked_mean(kl, sampled)
        loss = aggregate(per_token, mask, self.loss_agg, norm)
        metrics["policy_loss"] = loss.detach()
        return loss, {k: v.detach() for k, v in metrics.items()}


ALGORITHMS: dict[str, type[Algorithm]] = {}


def register_algorithm(name: str):
    def wrap(cls):
        cls.name = name
        ALGORITHMS[name] = cls
        return cls

    return wrap


def build_algorithm(options) -> Algorithm:
    """Make the algorithm named by options["name"]; unknown names or options are one-line errors."""
    import rlcore.algorithms  # noqa: F401  (registers the built-ins)

    options = dict(options)
    name = options.pop("name", None)
    if name not in ALGORITHMS:
        raise ConfigError(f"algorithm.name={name!r} is not registered; choose one of: {', '.join(sorted(ALGORITHMS))}")
    cls = ALGORITHMS[name]
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"algorithm.{unknown[0]} is not an option of {name}; allowed: {', '.join(allowed)}")
    try:  # each option as its field's type ("0.1" from a command line is a float; "abc" is an error)
        typed = OmegaConf.merge(OmegaConf.structured(cls), options)
    except ValidationError as e:
        raise ConfigError(f"algorithm.{e.full_key}: {str(e).splitlines()[0]}") from None
    return cls(**{key: typed[key] for key in options})
