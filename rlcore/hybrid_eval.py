"""Hybrid thinking in `rlcore eval` (SPEC §2): the mode the model picks, and Hybrid Accuracy.

Greedy pass: one greedy response per prompt, the mode left to the model (hybrid.mode=free:
the `single` program; the response's first token is the mode it chose) or forced into one
mode (`think` / `no_think` programs: the always-think comparison). In free mode it is the
pass `rlcore eval` reports as eval/accuracy, handed over rather than generated again
(rlcore.evaluate.held_out_metrics). Reported for all prompts
and per prompt.metadata["difficulty"] (rlcore.arith_mix: easy|hard):
eval/hybrid/{think_share,no_think_share,accuracy,length_mean}[/<difficulty>]. A response
opening with neither tag counts in neither share.

Hybrid Accuracy (free mode): each prompt is also sampled samples_per_mode times in each mode
(the `hybrid` program, at rollout.temperature) and scored with the configured rewards; the
right mode is the one with the higher mean score, and a near-tie (|difference| ≤ tie_margin)
goes to the mode with the shorter mean response (no-think if those tie too). HAcc is the
share of prompts whose greedy free choice is the right mode: eval/hacc[/<difficulty>].
"""

from __future__ import annotations

from statistics import mean

from rlcore.batch import Trajectory
from rlcore.hybrid import NO_THINK, THINK, response_mode
from rlcore.metrics import means_by_label
from rlcore.rollout.engine import SamplingParams


def right_modes(forced: list[Trajectory], num_prompts: int, tie_margin: float) -> list[int]:
    """Per prompt (group_id), the mode whose forced samples have the higher mean reward; within
    tie_margin, the mode with the shorter mean response, no-think when those are equal too."""
    rewards = [{THINK: [], NO_THINK: []} for _ in range(num_prompts)]
    lengths = [{THINK: [], NO_THINK: []} for _ in range(num_prompts)]
    for t in forced:
        rewards[t.group_id][t.mode].append(t.reward)
        lengths[t.group_id][t.mode].append(len(t.response_ids))
    out = []
    for r, n in zip(rewards, lengths):
        gap = mean(r[THINK]) - mean(r[NO_THINK])
        if abs(gap) > tie_margin:
            out.append(THINK if gap > 0 else NO_THINK)
        else:
            out.append(THINK if mean(n[THINK]) < mean(n[NO_THINK]) else NO_THINK)
    return out


def hybrid_evaluate(rollout, rewards, prompts, greedy: list[Trajectory], rollout_cfg, settings,
                    tag_ids: dict[int, int]) -> dict[str, float]:
    """The metrics of the module docstring. greedy: the greedy pass in settings.mode, scored, in
    prompt order (rlcore.trainer.greedy_responses); settings: rlcore.config.HybridEvalSettings;
    tag_ids: rlcore.hybrid.mode_tag_ids of the model's tokenizer."""
    chosen = [response_mode(t.response_ids, tag_ids) for t in greedy]
    difficulties = [p.metadata.get("difficulty") for p in prompts]
    metrics = {
        **means_by_label("eval/hybrid/think_share", [c == THINK for c in chosen], difficulties),
        **means_by_label("eval/hybrid/no_think_share", [c == NO_THINK for c in chosen], difficulties),
        **means_by_label("eval/hybrid/accuracy", [t.accuracy for t in greedy], difficulties),
        **means_by_label("eval/hybrid/length_mean", [len(t.response_ids) for t in greedy], difficulties),
    }
    if settings.mode == "free":
        sampling = SamplingParams(n=2 * settings.samples_per_mode, max_new_tokens=rollout_cfg.eval_max_new_tokens,
                                  temperature=rollout_cfg.temperature, top_p=rollout_cfg.top_p)
        forced = rollout.generate(prompts, "hybrid", sampling)
        rewards.score(forced, train=False)
        right = right_modes(forced, len(prompts), settings.tie_margin)
        metrics |= means_by_label("eval/hacc", [c == r for c, r in zip(chosen, right)], difficulties)
    return metrics
