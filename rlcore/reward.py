"""Reward functions: plain Python functions of one sample, run with time limits.

A reward is `fn(sample: Sample) -> float | dict`. A dict holds named parts and
must contain "score"; the other parts are logged as `reward/<fn>/<part>`.
Built-ins are registered by short name; any other function is named by its
dotted path (`mypkg.mod:fn` or `mypkg.mod.fn`).

Every call runs in a separate process (pebble's pool) under
`reward.timeout_s`: a reward that raises or hangs scores 0 and is counted in
the metrics (`reward/errors`, `reward/timeouts`); a hanging worker is killed
and replaced. User code never takes the trainer down.
"""

from __future__ import annotations

import multiprocessing
from collections import defaultdict
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable

from pebble import ProcessPool

from rlcore.config import import_function

BUILTIN = {
    "math": "rlcore.rewards.math:math_correct",
    "format": "rlcore.rewards.format:think_format",
}


@dataclass
class Sample:
    """What a reward function sees."""

    prompt: str
    response: str
    ground_truth: str
    metadata: dict[str, Any] = field(default_factory=dict)


def resolve(spec: str) -> Callable[[Sample], Any]:
    """A built-in name (BUILTIN) or a dotted path → the reward function."""
    return import_function(BUILTIN.get(spec, spec), f"reward.fns ({spec})")


_resolved: dict[str, Callable] = {}


def _call(spec: str, sample: Sample):
    """Runs in a pool worker: look the function up once per process, call it."""
    if spec not in _resolved:
        _resolved[spec] = resolve(spec)
    return _resolved[spec](sample)


def _as_score(value) -> tuple[float, dict[str, float]]:
    if isinstance(value, dict):
        parts = {k: float(v) for k, v in value.items()}
        return parts.pop("score"), parts
    return float(value), {}


class RewardRunner:
    """Scores trajectories with the configured reward functions in a process pool."""

    def __init__(self, cfg):
        self.specs = list(cfg.fns)
        self.weights = list(cfg.weights) or [1.0] * len(self.specs)
        self.accuracy = cfg.accuracy
        self.timeout_s = cfg.timeout_s
        for spec in self.specs:  # fail at start-up, in this process, with one line
            resolve(spec)
        # spawn: the trainer process runs Ray's threads, which fork does not copy safely.
        self.pool = ProcessPool(max_workers=cfg.num_workers, context=multiprocessing.get_context("spawn"))

    def close(self):
        self.pool.stop()
        self.pool.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def score(self, trajectories) -> dict[str, float]:
        """Fill each trajectory's `reward`, `reward_parts` and `accuracy`; return step metrics."""
        futures = [
            [self.pool.schedule(_call, args=(spec, t.sample()), timeout=self.timeout_s) for spec in self.specs]
            for t in trajectories
        ]
        counts, sums = defaultdict(int), defaultdict(float)
        for traj, row in zip(trajectories, futures):
            traj.reward, traj.reward_parts = 0.0, {}
            for spec, weight, future in zip(self.specs, self.weights, row):
                try:
                    score, parts = _as_score(future.result())
                except FutureTimeout:
                    score, parts = 0.0, {}
                    counts["reward/timeouts"] += 1
                except Exception:  # a user reward that raises scores 0, counted
                    score, parts = 0.0, {}
                    counts["reward/errors"] += 1
                traj.reward += weight * score
                traj.reward_parts[spec] = score
                for part, value in {spec: score, **{f"{spec}/{k}": v for k, v in parts.items()}}.items():
                    sums[f"reward/{part}"] += value
            traj.accuracy = traj.reward_parts.get(self.accuracy, 0.0)
        n = max(len(trajectories), 1)
        metrics = {k: v / n for k, v in sums.items()}
        metrics.update({k: float(counts[k]) for k in ("reward/errors", "reward/timeouts")})
        metrics["reward/mean"] = sum(t.reward for t in trajectories) / n
        metrics["accuracy"] = sum(t.accuracy for t in trajectories) / n
        return metrics
