"""Reward functions: plain Python functions, run with time limits.

Two forms:
- per sample, the ordinary one: `fn(sample: Sample, **options) -> float | dict`;
- per group, for rewards that compare a response with its siblings (the K samples of
  one prompt; length rewards): `fn(group: list[Sample], **options) -> list[float | dict]`,
  one entry per sample, marked with `@group_reward`. Group fns run after the per-sample
  ones, and each Sample then carries `correct`: its score from the accuracy fn
  (`reward.accuracy`), so a length term can look at which siblings are right.
A dict holds named parts and must contain "score"; the other parts are logged as
`reward/<fn>/<part>`. `reward.options.<fn>` are keyword options, checked against the
function's signature at start-up. Built-ins are registered by short name; any other
function is named by its dotted path (`mypkg.mod:fn` or `mypkg.mod.fn`); a module in the
current folder is found, as with `python -m`.

Every call runs in a separate process (pebble's pool) under `reward.timeout_s`: a
reward that raises, returns anything but finite numbers (a string, None, NaN) or hangs
scores 0 (a whole group, for a group fn) and is counted in the metrics (`reward/errors`,
`reward/timeouts`); a hanging worker is killed and replaced. The first failure of each fn
is also a warning on the console. User code never takes the trainer down.

The accuracy gate (Short-RL, `reward.accuracy_gate`) zeroes the named fns' scores in a
batch whose accuracy fell more than tau_acc below the best batch accuracy so far; that
running maximum is the runner's state, saved in checkpoints.
"""

from __future__ import annotations

import inspect
import logging
import math
import multiprocessing
import os
import reprlib
import sys
from collections import defaultdict
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable

from pebble import ProcessPool

from rlcore.config import ConfigError, import_function

BUILTIN = {
    "math": "rlcore.rewards.math:math_correct",
    "format": "rlcore.rewards.format:think_format",
    "rpt": "rlcore.rewards.rpt:rpt_prefix",
    "short_rl": "rlcore.rewards.length:short_rl",
    "kimi_length": "rlcore.rewards.length:kimi_length",
    "soft_overlong": "rlcore.rewards.length:soft_overlong",
    "l1_length": "rlcore.rewards.length:l1_length",
    "asyncthink": "rlcore.rewards.asyncthink:asyncthink",
    "asyncthink_correct": "rlcore.rewards.asyncthink:organizer_correct",
}
# What a reward fn must look like, by whether it is a group reward.
SIGNATURE = {False: "(sample: Sample, **options) -> float | dict",
             True: "(group: list[Sample], **options) -> list[float | dict]"}

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """What a reward function sees."""

    prompt: str
    response: str
    ground_truth: str
    metadata: dict[str, Any] = field(default_factory=dict)
    num_tokens: int = 0  # response length in tokens
    correct: float | None = None  # the accuracy fn's score; set before group fns run
    # What the rollout program recorded (Trajectory.trace): AsyncThink's fork/join trace.
    trace: dict[str, Any] = field(default_factory=dict)


def group_reward(fn: Callable) -> Callable:
    """Mark `fn` as a group reward: it takes the list of a prompt's samples."""
    fn.group_reward = True
    return fn


def resolve(spec: str) -> Callable:
    """A built-in name (BUILTIN) or a dotted path → the reward function. The current folder is
    on the import path, as with `python -m`, so `myrew:fn` finds ./myrew.py (in the pool's
    workers too: spawned processes start with this process's sys.path). It goes last, so a
    file there never shadows an installed module."""
    if spec not in BUILTIN and ":" not in spec and "." not in spec:
        raise ConfigError(f"reward.fns: unknown reward {spec!r}; built-ins: {', '.join(BUILTIN)}; "
                          "or your own function as module:function")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    return import_function(BUILTIN.get(spec, spec), f"reward.fns ({spec})")


def check_options(spec: str, options: dict) -> None:
    """One-line ConfigError unless `spec`'s function can be called as a reward (the sample or
    group first) with `options` as keyword arguments."""
    fn = resolve(spec)
    signature = inspect.signature(fn)
    try:
        signature.bind_partial(None)
    except TypeError:
        must = f"{fn.__name__}{SIGNATURE[getattr(fn, 'group_reward', False)]}"
        raise ConfigError(f"reward.fns ({spec}): {fn.__name__}{signature} cannot be called as a reward; it must be {must}") from None
    try:
        signature.bind(None, **options)
    except TypeError as e:
        raise ConfigError(f"reward.options.{spec}: {e}; see the function's docstring") from None


_resolved: dict[str, Callable] = {}


class RewardError(Exception):
    """A reward fn raised or returned something invalid: one line saying what. Raised in the
    worker with a plain message, so it always crosses back to the parent (a user's exception
    class may not unpickle there, and that breaks the pool)."""


def _call(spec: str, options: dict, payload) -> list[tuple[float, dict[str, float]]]:
    """Runs in a pool worker: look the function up once per process, call it, check what it
    returned. One (score, parts) pair per sample: one for a Sample, len(group) for a group."""
    if spec not in _resolved:
        _resolved[spec] = resolve(spec)
    try:
        value = _resolved[spec](payload, **options)
    except Exception as e:
        raise RewardError(f"raised {type(e).__name__}: {e}") from None
    if not isinstance(payload, list):
        return [_as_score(value)]
    if not isinstance(value, (list, tuple)) or len(value) != len(payload):
        raise RewardError(f"returned {_shown(value)}, expected a list of {len(payload)} scores, one per sample")
    return [_as_score(v) for v in value]


def _shown(value) -> str:
    return f"{reprlib.repr(value)} ({type(value).__name__})"


def _as_score(value) -> tuple[float, dict[str, float]]:
    """(score, parts) from a number or a dict with "score"; RewardError unless all are finite numbers."""
    parts = dict(value) if isinstance(value, dict) else {"score": value}
    if "score" not in parts:
        raise RewardError(f"returned {_shown(value)}, expected a number or a dict with 'score'")
    numbers = {name: _finite(v) for name, v in parts.items()}
    for name, number in numbers.items():
        if number is None:
            where = f" as {name!r}" if isinstance(value, dict) else ""
            raise RewardError(f"returned {_shown(parts[name])}{where}, expected a finite number")
    return numbers.pop("score"), numbers


def _finite(value) -> float | None:
    """value as a finite float, or None. Anything float() takes counts (numpy scalars and bools,
    0-d tensors) except text: "0.5" from a reward is a bug, not a score."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class AccuracyGate:
    """Short-RL's accuracy-aware gate: open while batch accuracy ≥ MaxAcc − tau_acc. Each
    training `score` call is one batch (with dynamic sampling, each generation round)."""

    def __init__(self, tau_acc: float | None, fns):
        self.tau_acc, self.fns, self.max_accuracy = tau_acc, set(fns), None

    def update(self, accuracy: float) -> bool:
        """Take one training batch's accuracy; is the gate open for that batch?"""
        if self.tau_acc is None:
            return True
        self.max_accuracy = accuracy if self.max_accuracy is None else max(self.max_accuracy, accuracy)
        return accuracy >= self.max_accuracy - self.tau_acc


class RewardRunner:
    """Scores trajectories with the configured reward functions in a process pool."""

    def __init__(self, cfg):
        self.specs = list(cfg.fns)
        self.weights = list(cfg.weights) or [1.0] * len(self.specs)
        self.options = {spec: dict(cfg.options.get(spec) or {}) for spec in self.specs}
        self.accuracy = cfg.accuracy
        self.timeout_s = cfg.timeout_s
        for spec in self.specs:  # fail at start-up, in this process, with one line
            check_options(spec, self.options[spec])
        self.grouped = {spec for spec in self.specs if getattr(resolve(spec), "group_reward", False)}
        if self.accuracy in self.grouped:
            raise ConfigError(f"reward.accuracy={self.accuracy!r} is a group reward; name a per-sample fn (e.g. math)")
        self.gate = AccuracyGate(cfg.accuracy_gate.tau_acc, cfg.accuracy_gate.fns)
        self.warned: set[str] = set()  # fns whose first error is on the console already
        # spawn: the trainer process runs Ray's threads, which fork does not copy safely.
        self.pool = ProcessPool(max_workers=cfg.num_workers, context=multiprocessing.get_context("spawn"))

    def close(self):
        self.pool.stop()
        self.pool.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def state_dict(self) -> dict:
        return {"max_accuracy": self.gate.max_accuracy}

    def load_state_dict(self, state: dict) -> None:
        self.gate.max_accuracy = state["max_accuracy"]

    def score(self, trajectories, train: bool = True) -> dict[str, float]:
        """Fill each trajectory's `reward`, `reward_parts` and `accuracy`; return step metrics.
        `train=False` (evaluation) leaves the accuracy gate's state alone and its fns ungated."""
        samples = [t.sample() for t in trajectories]
        counts, sums = defaultdict(int), defaultdict(float)
        results = self._run_per_sample(samples, counts)
        for sample, (score, _) in zip(samples, results.get(self.accuracy, [])):
            sample.correct = score
        results |= self._run_groups(samples, [t.group_id for t in trajectories], counts)

        n = max(len(trajectories), 1)
        accuracy = sum(s.correct or 0.0 for s in samples) / n
        gate_open = self.gate.update(accuracy) if train else True
        for i, (traj, sample) in enumerate(zip(trajectories, samples)):
            traj.reward, traj.reward_parts, traj.accuracy = 0.0, {}, sample.correct or 0.0
            for spec, weight in zip(self.specs, self.weights):
                score, parts = results[spec][i]
                if not gate_open and spec in self.gate.fns:
                    score = 0.0
                traj.reward += weight * score
                traj.reward_parts[spec] = score
                for part, value in {spec: score, **{f"{spec}/{k}": v for k, v in parts.items()}}.items():
                    sums[f"reward/{part}"] += value
        metrics = {k: v / n for k, v in sums.items()}
        metrics.update({k: float(counts[k]) for k in ("reward/errors", "reward/timeouts")})
        metrics["reward/mean"] = sum(t.reward for t in trajectories) / n
        metrics["accuracy"] = accuracy
        if self.gate.tau_acc is not None and train:
            metrics |= {"reward/gate_open": float(gate_open), "reward/max_accuracy": self.gate.max_accuracy}
        return metrics

    def _run_per_sample(self, samples: list[Sample], counts) -> dict[str, list]:
        """spec → [(score, parts)] per sample, for every per-sample fn."""
        specs = [s for s in self.specs if s not in self.grouped]
        futures = {spec: [self._schedule(spec, sample) for sample in samples] for spec in specs}
        return {spec: [self._result(spec, f, 1, counts)[0] for f in row] for spec, row in futures.items()}

    def _run_groups(self, samples: list[Sample], group_ids: list[int], counts) -> dict[str, list]:
        """spec → [(score, parts)] per sample, for every group fn, called once per group."""
        members = defaultdict(list)
        for i, g in enumerate(group_ids):
            members[g].append(i)
        out = {}
        for spec in (s for s in self.specs if s in self.grouped):
            futures = [(idx, self._schedule(spec, [samples[i] for i in idx])) for idx in members.values()]
            out[spec] = [None] * len(samples)
            for idx, future in futures:
                for i, result in zip(idx, self._result(spec, future, len(idx), counts)):
                    out[spec][i] = result
        return out

    def _schedule(self, spec: str, payload):
        return self.pool.schedule(_call, args=(spec, self.options[spec], payload), timeout=self.timeout_s)

    def _result(self, spec: str, future, size: int, counts) -> list[tuple[float, dict]]:
        """`size` (score, parts) pairs from `spec`'s future (1 for a per-sample fn); zeros, counted,
        if it timed out, raised or returned something invalid, and a warning the first time."""
        try:
            return future.result()
        except FutureTimeout:
            counts["reward/timeouts"] += 1
            self._warn_once(spec, f"ran past reward.timeout_s={self.timeout_s:g} s", "reward/timeouts")
        except Exception as e:
            counts["reward/errors"] += 1
            self._warn_once(spec, str(e) if isinstance(e, RewardError) else f"failed: {type(e).__name__}: {e}", "reward/errors")
        return [(0.0, {})] * size

    def _warn_once(self, spec: str, what: str, counted_in: str) -> None:
        if spec not in self.warned:
            self.warned.add(spec)
            log.warning("reward %s %s; it scores 0, and further failures are counted in %s", spec, " ".join(what.split()), counted_in)
