"""Reward functions: math-verify cases, format, and user rewards that raise or hang."""

import time

import pytest
from omegaconf import OmegaConf

from rlcore.batch import Trajectory
from rlcore.config import ConfigError, RewardConfig
from rlcore.data import Prompt
from rlcore.reward import RewardRunner, Sample, resolve
from rlcore.rewards.format import think_format
from rlcore.rewards.math import last_boxed, math_correct


@pytest.mark.parametrize("response, truth, want", [
    (r"<think>1/2</think> \boxed{\frac{1}{2}}", "0.5", 1.0),          # fraction vs decimal
    (r"so the answer is \boxed{0.5}.", r"\frac{1}{2}", 1.0),           # decimal vs fraction, boxed in prose
    (r"We get \boxed{2486} after adding.", "2486", 1.0),
    (r"\boxed{2485}", "2486", 0.0),                                    # wrong answer
    (r"first \boxed{7} then corrected \boxed{8}", "8", 1.0),           # the last box counts
    (r"first \boxed{8} then \boxed{7}", "8", 0.0),
    ("the answer is 2486", "2486", 0.0),                               # no box, no credit
    (r"\boxed{}", "1", 0.0),
])
def test_math_correct(response, truth, want):
    assert math_correct(Sample("q", response, truth)) == want


def test_last_boxed_balances_braces():
    assert last_boxed(r"x \boxed{\frac{1}{2}} y") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{unclosed") is None


def test_format_reward():
    assert think_format(Sample("q", r"<think>2+2=4</think> \boxed{4}", "4")) == 1.0
    assert think_format(Sample("q", r"\boxed{4}", "4")) == 0.0
    assert think_format(Sample("q", r"<think>2+2=4</think> 4", "4")) == 0.0


def test_unknown_reward_is_one_line_config_error():
    with pytest.raises(ConfigError, match="reward.fns") as e:
        resolve("nopkg.nomod:fn")
    assert "\n" not in str(e.value)


def trajectory(text, truth="4"):
    return Trajectory(Prompt("p", "What is 2+2?", truth), [1], [0.0], text, "stop")


def runner(fns, weights=(), timeout_s=3.0):
    cfg = OmegaConf.structured(RewardConfig(fns=list(fns), weights=list(weights), accuracy=fns[0], timeout_s=timeout_s, num_workers=2))
    return RewardRunner(cfg)


def test_runner_weights_parts_and_accuracy():
    trajs = [trajectory(r"<think>x</think> \boxed{4}"), trajectory(r"\boxed{5}")]
    with runner(["math", "format", "user_rewards:with_parts"], weights=[1.0, 0.5, 2.0]) as r:
        metrics = r.score(trajs)
    assert trajs[0].reward == pytest.approx(1.0 + 0.5 + 2.0)
    assert trajs[1].reward == pytest.approx(0.0 + 0.0 + 2.0)
    assert [t.accuracy for t in trajs] == [1.0, 0.0]
    assert metrics["accuracy"] == 0.5
    assert metrics["reward/user_rewards:with_parts/brevity"] == 0.25


def test_raising_and_hanging_rewards_score_zero_and_are_counted():
    trajs = [trajectory(r"\boxed{4}") for _ in range(3)]
    started = time.monotonic()
    with runner(["user_rewards:always_half", "user_rewards:raises", "user_rewards:hangs"], timeout_s=2.0) as r:
        metrics = r.score(trajs)
        # the pool survives: a second round still scores
        again = r.score([trajectory(r"\boxed{4}")])
    assert time.monotonic() - started < 30
    assert metrics["reward/errors"] == 3 and metrics["reward/timeouts"] == 3
    assert all(t.reward == 0.5 for t in trajs)
    assert again["reward/timeouts"] == 1 and again["reward/mean"] == 0.5
