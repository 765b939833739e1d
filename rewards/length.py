"""Length-aware rewards (SPEC §3): terms added to the correctness reward that favour shorter
responses. Lengths are response tokens (`Sample.num_tokens`); "correct" means the accuracy
fn scored the sample above 0.5 (`Sample.correct`, filled in before group rewards run).

Use next to the correctness reward, e.g. `reward.fns=[math,short_rl]`: the total is
correctness + length term.

- short_rl (group): Short-RL designs 1 and 2 — only correct responses get a length term,
  no penalty within tau_l tokens of the group's shortest correct response. Design 3, the
  accuracy-aware gate, needs the batch, so the reward runner does it:
  `reward.accuracy_gate={tau_acc: 0.05, fns: [short_rl]}` (rlcore.reward.AccuracyGate).
- kimi_length (group): Kimi k1.5's length reward over all K responses.
- soft_overlong (per sample): DAPO's soft overlong punishment.
- l1_length (per sample): L1's length-control term −α·|n_target − n_y|; with `math` the
  total is L1's reward 1[correct] − α·|n_target − n_y|. The target comes from the prompt's
  metadata (`target_length`), and the prompt must state it.
"""

from __future__ import annotations

from rlcore.reward import Sample, group_reward


def is_correct(sample: Sample) -> bool:
    return (sample.correct or 0.0) > 0.5


@group_reward
def short_rl(group: list[Sample], tau_l: int = 100) -> list[float]:
    """λ_i for correct responses, 0 for wrong ones. With l_min / l_max over the group's
    correct responses: λ_i = 0.5 if l_i ≤ l_min + tau_l, else
    0.5 − (l_i − l_min) / (l_max − l_min + 1e-5). A lone correct response gets 0.5.
    tau_l: tolerance in tokens (paper: 100 for math, 200 for logic puzzles)."""
    correct = [s.num_tokens for s in group if is_correct(s)]
    if not correct:
        return [0.0] * len(group)
    l_min, l_max = min(correct), max(correct)
    scores = []
    for s in group:
        if not is_correct(s):
            scores.append(0.0)
        elif s.num_tokens <= l_min + tau_l:
            scores.append(0.5)
        else:
            scores.append(0.5 - (s.num_tokens - l_min) / (l_max - l_min + 1e-5))
    return scores


@group_reward
def kimi_length(group: list[Sample]) -> list[float]:
    """λ_i = 0.5 − (l_i − l_min) / (l_max − l_min) over all K responses (0.5 when all lengths
    are equal); λ_i for a correct response, min(0, λ_i) for a wrong one."""
    lengths = [s.num_tokens for s in group]
    l_min, spread = min(lengths), max(lengths) - min(lengths)
    scores = []
    for s in group:
        lam = 0.5 - ((s.num_tokens - l_min) / spread if spread else 0.0)
        scores.append(lam if is_correct(s) else min(0.0, lam))
    return scores


def overlong_penalty(length: float, max_tokens: int, buffer: int) -> float:
    """0 while length ≤ max_tokens − buffer, then linear down to −1 at max_tokens, −1 beyond.
    buffer 0 means no penalty."""
    if buffer == 0:
        return 0.0
    return -min(max(length - (max_tokens - buffer), 0) / buffer, 1.0)


def soft_overlong(sample: Sample, max_tokens: int = 20480, buffer: int = 4096) -> float:
    """DAPO's soft overlong punishment (L_max = max_tokens, L_cache = buffer)."""
    return overlong_penalty(sample.num_tokens, max_tokens, buffer)


def l1_length(sample: Sample, alpha: float = 1 / 3000) -> float:
    """−alpha·|n_target − n_y|, n_target = metadata["target_length"] (tokens)."""
    if "target_length" not in sample.metadata:
        raise KeyError("l1_length needs metadata['target_length'] on every prompt (set data.target_length.choices)")
    return -alpha * abs(int(sample.metadata["target_length"]) - sample.num_tokens)
