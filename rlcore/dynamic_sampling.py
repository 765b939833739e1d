"""Dynamic sampling (DAPO): keep only groups whose rewards differ, refilling from new prompts.

A group whose K rewards are all equal has zero advantage under a group baseline and
teaches nothing; DAPO drops such groups and generates more until the batch is full.
"""

from __future__ import annotations

import math
from typing import Callable

from rlcore.batch import Trajectory


def split_groups(trajectories: list[Trajectory]) -> list[list[Trajectory]]:
    """The trajectories by group_id, groups in order of first appearance."""
    groups: dict[int, list[Trajectory]] = {}
    for t in trajectories:
        groups.setdefault(t.group_id, []).append(t)
    return list(groups.values())


def informative(group: list[Trajectory]) -> bool:
    """Whether the group's rewards differ: a group baseline gives an all-equal group advantage 0."""
    return len({t.reward for t in group}) > 1


def informative_frac(trajectories: list[Trajectory]) -> float:
    """The share of groups whose rewards differ; the trainer logs it every step as
    `sampling/informative_frac` (with dynamic sampling: of the first round, before any refill)."""
    groups = split_groups(trajectories)
    return sum(map(informative, groups)) / len(groups)


def refill_groups(trajectories: list[Trajectory], sample_more: Callable[[int, int], list[Trajectory]], groups: int,
                  rounds: int) -> tuple[list[Trajectory], dict[str, float]]:
    """Dynamic sampling (DAPO): `groups` groups whose rewards are not all equal.

    Keeps the informative groups of `trajectories`; while fewer than `groups` are kept and
    fewer than `rounds` generation rounds have run, `sample_more(n, round)` generates and
    scores the groups of n more prompts, n = the missing count over the share kept so far
    (at most `groups`). If the rounds run out, dropped groups fill the rest, so the batch
    keeps its size; they have advantage 0 under a group baseline. Group ids come back as
    0..groups−1 in batch order. The reward metrics (and informative_frac) stay those of the
    first round, an unbiased sample of the policy."""
    kept: list[list[Trajectory]] = []
    dropped: list[list[Trajectory]] = []
    generated, missing = 0, groups
    for round_ in range(1, rounds + 1):
        if round_ > 1:
            share = len(kept) / generated
            trajectories = sample_more(min(groups, math.ceil(missing / share)) if share else groups, round_ - 1)
        found = split_groups(trajectories)
        for group in found:
            (kept if informative(group) else dropped).append(group)
        generated += len(found)
        missing = groups - len(kept)
        if missing <= 0:
            break
    fillers = max(0, groups - len(kept))
    chosen = kept[:groups] + dropped[:fillers]
    out = []
    for gid, group in enumerate(chosen):
        for t in group:
            t.group_id = gid
            out.append(t)
    metrics = {"sampling/rounds": float(round_), "sampling/filler_groups": float(fillers)}
    return out, metrics
