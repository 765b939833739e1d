"""Reward functions: math-verify cases, format, and user rewards that raise, hang, return
garbage or are named wrong."""

import logging
import math
import sys
import time

import pytest
from omegaconf import OmegaConf

from rlcore.batch import Trajectory
from rlcore.config import ConfigError, RewardConfig
from rlcore.data import Prompt
from rlcore.reward import RewardRunner, Sample, check_options, resolve
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


def test_unknown_builtin_name_lists_the_builtins():
    with pytest.raises(ConfigError) as e:
        resolve("mathh")
    assert str(e.value) == ("reward.fns: unknown reward 'mathh'; built-ins: math, format, rpt, short_rl, kimi_length, "
                            "soft_overlong, l1_length, asyncthink, asyncthink_correct; or your own function as module:function")


@pytest.mark.parametrize("spec, want", [
    ("user_rewards:takes_no_sample", "takes_no_sample(sample: Sample, **options) -> float | dict"),
    ("user_rewards:group_takes_nothing", "group_takes_nothing(group: list[Sample], **options) -> list[float | dict]"),
])
def test_reward_with_wrong_signature_names_the_one_it_needs(spec, want):
    with pytest.raises(ConfigError) as e:
        check_options(spec, {})
    name = spec.split(":")[1]
    assert str(e.value) == f"reward.fns ({spec}): {name}() cannot be called as a reward; it must be {want}"


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


def test_raising_and_hanging_rewards_score_zero_and_are_counted(caplog):
    trajs = [trajectory(r"\boxed{4}") for _ in range(3)]
    started = time.monotonic()
    with runner(["user_rewards:always_half", "user_rewards:raises", "user_rewards:hangs"], timeout_s=2.0) as r, \
            caplog.at_level(logging.WARNING, logger="rlcore.reward"):
        metrics = r.score(trajs)
        # the pool survives: a second round still scores
        again = r.score([trajectory(r"\boxed{4}")])
    assert time.monotonic() - started < 30
    assert metrics["reward/errors"] == 3 and metrics["reward/timeouts"] == 3
    assert all(t.reward == 0.5 for t in trajs)
    assert again["reward/timeouts"] == 1 and again["reward/mean"] == 0.5
    assert "reward user_rewards:hangs ran past reward.timeout_s=2 s; it scores 0, and further failures are counted in " \
        "reward/timeouts" in [rec.getMessage() for rec in caplog.records]


def test_invalid_rewards_score_zero_and_warn_once_each(caplog):
    """Raising, returning a non-number or a non-finite one: scored 0, counted, one warning per fn.
    An exception that does not unpickle in this process must not break the pool."""
    invalid = {
        "user_rewards:raises": "raised RuntimeError: user bug",
        "user_rewards:raises_two_arg_error": "raised TwoArgError: user and bug",
        "user_rewards:returns_text": "returned 'good' (str), expected a finite number",
        "user_rewards:returns_none": "returned None (NoneType), expected a finite number",
        "user_rewards:returns_nan": "returned nan (float), expected a finite number",
        "user_rewards:returns_inf_part": "returned inf (float) as 'brevity', expected a finite number",
    }
    with runner(["user_rewards:always_half", *invalid]) as r, caplog.at_level(logging.WARNING, logger="rlcore.reward"):
        metrics = [r.score([trajectory("x"), trajectory("y")]) for _ in range(2)]
    assert [m["reward/errors"] for m in metrics] == [12, 12]
    assert [m["reward/mean"] for m in metrics] == [0.5, 0.5]
    assert all(math.isfinite(v) for m in metrics for v in m.values())
    assert [rec.getMessage() for rec in caplog.records] == [
        f"reward {spec} {what}; it scores 0, and further failures are counted in reward/errors" for spec, what in invalid.items()]


def test_numbers_float_takes_are_scores():
    """A numpy bool (`np.isclose(…)`) or a 0-d tensor is a score, as float() reads it."""
    with runner(["user_rewards:returns_numpy_true", "user_rewards:returns_0d_tensor"]) as r:
        metrics = r.score([trajectory("x")])
    assert metrics["reward/mean"] == 2.0 and metrics["reward/errors"] == 0


def test_reward_module_in_the_current_folder_is_found(tmp_path, monkeypatch):
    """`reward.fns=[myrew:fn]` with ./myrew.py, the folder not on sys.path: found, in the workers too."""
    (tmp_path / "myrew_in_cwd.py").write_text("def fn(sample):\n    return 0.75\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    with runner(["myrew_in_cwd:fn"]) as r:
        metrics = r.score([trajectory("x")])
    assert metrics["reward/mean"] == 0.75 and metrics["reward/errors"] == 0
