"""AsyncThink's reward (SPEC §6): format errors, correctness and the concurrency bonus.

Reads what the fork_join rollout program recorded (Sample.trace, rlcore.asyncthink):

- format error → `format_penalty` (R_FE). Errors: those the rollout stopped at (duplicate id,
  join of an unknown id, a malformed fork), pool overflow (more than capacity − 1 workers
  running at once), and no answer (no \\boxed{} in the organizer's own text after its last
  pasted worker text: a worker's answer is not the organizer's).
- else R_A + λ·R_η: R_A the math correctness of that final text, η the trace's concurrency
  (mean running workers per decoding step), R_η = min(η / c, τ) / τ.

SPEC leaves λ, τ, c open; rlcore's defaults: λ = 0.2, τ = 0.5, c = 4, R_FE = −1.
"""

from __future__ import annotations

from rlcore.asyncthink import final_text
from rlcore.reward import Sample
from rlcore.rewards.math import last_boxed, math_correct


def organizer_correct(sample: Sample) -> float:
    """Math correctness of the organizer's own final answer (the accuracy fn of recipe asyncthink_math)."""
    return math_correct(Sample(sample.prompt, final_text(sample.response), sample.ground_truth))


def format_error(sample: Sample, capacity: int) -> str:
    """Why the trace breaks the format ("" when it does not)."""
    if "format_error" not in sample.trace:
        raise ValueError("the asyncthink reward reads the fork_join program's trace; use algorithm=asyncthink")
    if sample.trace["format_error"]:
        return sample.trace["format_error"]
    if sample.trace["max_pool"] > capacity - 1:
        return f"pool overflow: {sample.trace['max_pool']:.0f} workers at once, capacity {capacity} allows {capacity - 1}"
    if last_boxed(final_text(sample.response)) is None:
        return "no answer"
    return ""


def asyncthink(sample: Sample, capacity: int = 4, concurrency_weight: float = 0.2, concurrency_cap: float = 0.5,
               format_penalty: float = -1.0) -> dict:
    """R_FE on a format error, else R_A + λ·R_η (module docstring); capacity c, concurrency_weight λ,
    concurrency_cap τ, format_penalty R_FE."""
    if format_error(sample, capacity):
        return {"score": format_penalty, "format_error": 1.0, "concurrency_bonus": 0.0}
    bonus = min(sample.trace["concurrency"] / capacity, concurrency_cap) / concurrency_cap
    return {"score": organizer_correct(sample) + concurrency_weight * bonus, "format_error": 0.0, "concurrency_bonus": bonus}
