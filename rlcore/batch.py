"""Trajectories and the padded Batch the learner consumes.

Layout of a Batch (a `tensordict.TensorDict` with batch size [B]):

    input_ids       [B, P+R]  prompt left-padded to P, response right-padded to R
    attention_mask  [B, P+R]
    response_ids    [B, R]
    response_mask   [B, R]    1 on tokens the loss may touch
    rollout_logp    [B, R]    log-probs the rollout engine reported
    rewards, group_ids, response_lengths  [B]

Every per-token tensor an algorithm sees is [B, R] over the response, so the
response always starts at column P of input_ids. Later stages add
old_logp / ref_logp / advantages, all [B, R].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tensordict import TensorDict

from rlcore.data import Prompt
from rlcore.reward import Sample


@dataclass
class Trajectory:
    prompt: Prompt
    response_ids: list[int]
    rollout_logp: list[float]
    text: str
    finish_reason: str  # "stop" (EOS) or "length"
    group_id: int = 0
    # Tokens the loss may touch; None = all response tokens (AsyncThink and HGPO refine it).
    loss_mask: list[int] | None = None
    reward: float = 0.0
    reward_parts: dict[str, float] = field(default_factory=dict)
    accuracy: float = 0.0

    def sample(self) -> Sample:
        return Sample(self.prompt.text, self.text, self.prompt.ground_truth, self.prompt.metadata)


def build_batch(trajectories: list[Trajectory], pad_id: int) -> TensorDict:
    B = len(trajectories)
    P = max(len(t.prompt.token_ids) for t in trajectories)
    R = max(max(len(t.response_ids) for t in trajectories), 1)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, P + R, dtype=torch.long)
    response_mask = torch.zeros(B, R)
    rollout_logp = torch.zeros(B, R)
    for i, t in enumerate(trajectories):
        p, r = len(t.prompt.token_ids), len(t.response_ids)
        input_ids[i, P - p : P] = torch.tensor(t.prompt.token_ids)
        input_ids[i, P : P + r] = torch.tensor(t.response_ids, dtype=torch.long)
        attention_mask[i, P - p : P + r] = 1
        response_mask[i, :r] = torch.tensor(t.loss_mask, dtype=torch.float) if t.loss_mask is not None else 1.0
        rollout_logp[i, :r] = torch.tensor(t.rollout_logp)
    return TensorDict(
        {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "response_ids": input_ids[:, P:],
            "response_mask": response_mask,
            "rollout_logp": rollout_logp,
            "rewards": torch.tensor([t.reward for t in trajectories], dtype=torch.float),
            "group_ids": torch.tensor([t.group_id for t in trajectories], dtype=torch.long),
            "response_lengths": torch.tensor([len(t.response_ids) for t in trajectories], dtype=torch.float),
        },
        batch_size=[B],
    )


def split_even(batch: TensorDict, parts: int) -> list[TensorDict]:
    """`parts` contiguous pieces of equal size (the config check guarantees divisibility)."""
    size = batch.batch_size[0] // parts
    return [batch[i * size : (i + 1) * size] for i in range(parts)]


def micro_batches(batch: TensorDict, size: int) -> list[TensorDict]:
    return [batch[i : i + size] for i in range(0, batch.batch_size[0], size)]
