"""Trajectories and the padded Batch the learner consumes.

Layout of a Batch (a `tensordict.TensorDict` with batch size [B]):

    input_ids       [B, P+R]  prompt left-padded to P, response right-padded to R
    attention_mask  [B, P+R]
    response_ids    [B, R]
    response_mask   [B, R]    1 on tokens the loss may touch
    rollout_logp    [B, R]    log-probs the rollout engine reported
    rewards, group_ids, response_lengths  [B]
    modes           [B]       hybrid thinking's forced mode: 1 think, 0 no-think, -1 none (rlcore.hybrid)
    unit_ids        [B]       the trajectory (RL unit) a row belongs to: its index in the list given to
                              build_batch; -1 for a padding row (see build_batch)

A trajectory with `workers` (AsyncThink's organizer, rlcore.asyncthink) becomes several rows:
its own, then one per worker, all with its reward and group id and its unit id, so that
they share one advantage (algorithms/asyncthink.py).

Every per-token tensor an algorithm sees is [B, R] over the response, so the
response always starts at column P of input_ids. Later stages add
old_logp / ref_logp / advantages, all [B, R].
"""

from __future__ import annotations

import dataclasses
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
    # Tokens the loss may touch; None = all response tokens (AsyncThink masks pasted worker text).
    loss_mask: list[int] | None = None
    # The mode the `hybrid` rollout program forced (its tag is response token 0): 1 think, 0 no-think; -1 none.
    mode: int = -1
    reward: float = 0.0
    reward_parts: dict[str, float] = field(default_factory=dict)
    accuracy: float = 0.0
    # What the rollout program recorded about the response, for rewards and metrics (the
    # fork_join program: rlcore.asyncthink.ForkJoinTrace.record).
    trace: dict = field(default_factory=dict)
    # AsyncThink's workers: trajectories of the same RL unit, trained with this one's reward.
    workers: list[Trajectory] = field(default_factory=list)

    def sample(self) -> Sample:
        return Sample(self.prompt.text, self.text, self.prompt.ground_truth, self.prompt.metadata,
                      num_tokens=len(self.response_ids), trace=self.trace)


def batch_rows(trajectories: list[Trajectory]) -> list[tuple[int, Trajectory]]:
    """(unit id, row) for each row: each trajectory, followed by its workers."""
    return [(u, row) for u, t in enumerate(trajectories) for row in (t, *t.workers)]


def build_batch(trajectories: list[Trajectory], pad_id: int, rows_multiple: int = 1) -> TensorDict:
    """The padded batch of the trajectories' rows (batch_rows). With workers the row count varies;
    `rows_multiple` (learner ranks × mini-batches) then adds padding rows up to a multiple of it:
    copies of the last row with no loss tokens, unit id −1 (a copy, not an empty row, so that
    every forward sees at least one real token). An algorithm that compares rows within groups
    skips them, as AsyncThink's does."""
    rows = batch_rows(trajectories)
    units = [u for u, _ in rows] + [-1] * (-len(rows) % rows_multiple)
    rows = [t for _, t in rows]
    rows += [dataclasses.replace(rows[-1], loss_mask=[0] * len(rows[-1].response_ids))] * (len(units) - len(rows))
    owner = [trajectories[u] for u in units]  # whose reward and group a row has (padding: the last unit's)
    B = len(rows)
    P = max(len(t.prompt.token_ids) for t in rows)
    R = max(max(len(t.response_ids) for t in rows), 1)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, P + R, dtype=torch.long)
    response_mask = torch.zeros(B, R)
    rollout_logp = torch.zeros(B, R)
    for i, t in enumerate(rows):
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
            "rewards": torch.tensor([t.reward for t in owner], dtype=torch.float),
            "group_ids": torch.tensor([t.group_id for t in owner], dtype=torch.long),
            "response_lengths": torch.tensor([len(t.response_ids) for t in rows], dtype=torch.float),
            "modes": torch.tensor([t.mode for t in rows], dtype=torch.long),
            "unit_ids": torch.tensor(units, dtype=torch.long),
        },
        batch_size=[B],
    )


def split_even(batch: TensorDict, parts: int) -> list[TensorDict]:
    """`parts` contiguous pieces of equal size (the config check guarantees divisibility)."""
    size = batch.batch_size[0] // parts
    return [batch[i * size : (i + 1) * size] for i in range(parts)]


# ---- micro-batching -------------------------------------------------------------------------
#
# A learner rank runs its shard as consecutive micro-batches, each trimmed to its own
# longest prompt and response (`trim_padding`), so a micro-batch of short samples costs
# short-sample memory even when the batch holds one long sample. The plan (rows per
# micro-batch) is made by the driver for every rank at once (`plan_micro_batches`): under
# ZeRO-2/3 each forward and backward is a collective, so all ranks must run the same
# number of micro-batches.


def sequence_lengths(batch: TensorDict) -> tuple[torch.Tensor, torch.Tensor]:
    """Real (non-pad) prompt and response tokens of each row, from the attention mask."""
    mask = batch["attention_mask"]
    P = mask.shape[1] - batch["response_ids"].shape[1]
    return mask[:, :P].sum(1), mask[:, P:].sum(1)


def micro_batch_cost(rows: int, prompt: int, response: int) -> int:
    """Token slots of a trimmed micro-batch: rows × its own padded width (pads included,
    because the forward computes them). The response keeps ≥ 1 column, as in build_batch."""
    return rows * (prompt + max(response, 1))


def pack_by_tokens(prompt_lens: list[int], response_lens: list[int], budget: int) -> list[int]:
    """Rows per micro-batch: consecutive rows, in batch order, as many as fit in `budget`
    token slots (micro_batch_cost); a row that alone exceeds the budget goes alone.

    Batch order (no sorting) keeps the per-row outputs in place, so results concatenate
    back without a permutation."""
    sizes: list[int] = []
    rows = longest_prompt = longest_response = 0
    for p, r in zip(prompt_lens, response_lens):
        p_max, r_max = max(longest_prompt, p), max(longest_response, r)
        if rows and micro_batch_cost(rows + 1, p_max, r_max) > budget:
            sizes.append(rows)
            rows, p_max, r_max = 0, p, r
        rows, longest_prompt, longest_response = rows + 1, p_max, r_max
    if rows:
        sizes.append(rows)
    return sizes


def equalise_counts(plans: list[list[int]]) -> list[list[int]]:
    """Split micro-batches until every plan has as many as the longest one.

    The largest micro-batch is halved each time; a part of a micro-batch never costs more
    than the whole, so the token budget still holds. Every shard has the same number of
    rows (split_even), and no plan has more micro-batches than rows, so this always ends."""
    target = max(len(plan) for plan in plans)
    out = []
    for plan in plans:
        plan = list(plan)
        while len(plan) < target:
            i = max(range(len(plan)), key=plan.__getitem__)
            plan[i : i + 1] = [plan[i] - plan[i] // 2, plan[i] // 2]
        out.append(plan)
    return out


def plan_micro_batches(shards: list[TensorDict], rows: int, tokens: int) -> list[list[int]]:
    """Rows per micro-batch for each rank's shard, the same count for every rank.

    tokens > 0 (learner.micro_batch_tokens): packed by token budget; otherwise fixed
    micro-batches of `rows` (learner.micro_batch_size)."""
    if not tokens:
        n = shards[0].batch_size[0]
        return [[min(rows, n - i) for i in range(0, n, rows)] for _ in shards]
    plans = []
    for shard in shards:
        prompt, response = sequence_lengths(shard)
        plans.append(pack_by_tokens(prompt.tolist(), response.tolist(), tokens))
    return equalise_counts(plans)


def trim_padding(batch: TensorDict) -> TensorDict:
    """The same rows with padding cut to their own longest prompt (left) and response (right).

    input_ids/attention_mask lose pad columns on both sides; every other [B, R, …] tensor
    (the per-token response tensors of the layout above) loses them on the right. The
    position ids come from the attention mask, so the real tokens see the same positions."""
    R = batch["response_ids"].shape[1]
    P = batch["input_ids"].shape[1] - R
    prompt, response = sequence_lengths(batch)
    p, r = int(prompt.max()), max(int(response.max()), 1)

    def cut(key, t):
        if key in ("input_ids", "attention_mask"):
            return t[:, P - p : P + r]
        return t[:, :r] if t.dim() >= 2 and t.shape[1] == R else t

    return TensorDict({k: cut(k, v) for k, v in batch.items()}, batch_size=batch.batch_size)


def micro_batches(batch: TensorDict, sizes: list[int]) -> list[TensorDict]:
    """Consecutive micro-batches of `sizes` rows (see plan_micro_batches), each trimmed."""
    out, start = [], 0
    for n in sizes:
        out.append(trim_padding(batch[start : start + n]))
        start += n
    return out


def pad_response(t: torch.Tensor, width: int) -> torch.Tensor:
    """A trimmed [b, r, …] per-token tensor back to the batch's response width R (zeros on the right)."""
    return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.shape[1]))
