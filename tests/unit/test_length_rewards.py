"""Length-aware rewards (SPEC §3) against hand-computed values, and group rewards, options and
the accuracy gate through the reward runner."""

import pytest
from conftest import compose
from omegaconf import OmegaConf

from rlcore.batch import Trajectory
from rlcore.config import AccuracyGateConfig, ConfigError, RewardConfig, validate_common
from rlcore.data import Prompt
from rlcore.reward import RewardRunner, Sample
from rlcore.rewards.length import kimi_length, l1_length, overlong_penalty, short_rl, soft_overlong


def group(lengths, correct):
    return [Sample("q", "r", "4", num_tokens=n, correct=c) for n, c in zip(lengths, correct)]


def test_short_rl_hand_values():
    # correct lengths 10, 30, 50 → l_min 10, l_max 50; tau_l 5: only 10 is within tolerance
    scores = short_rl(group([10, 30, 50, 5], [1, 1, 1, 0]), tau_l=5)
    assert scores == pytest.approx([0.5, 0.5 - 20 / (40 + 1e-5), 0.5 - 40 / (40 + 1e-5), 0.0])
    # tau_l 25 covers 30 too; the wrong (shortest) response never counts as l_min
    assert short_rl(group([10, 30, 50, 5], [1, 1, 1, 0]), tau_l=25)[:2] == [0.5, 0.5]


def test_short_rl_edge_cases():
    assert short_rl(group([40, 7], [1, 0]), tau_l=0) == [0.5, 0.0]  # one correct → 0.5
    assert short_rl(group([40, 7], [0, 0])) == [0.0, 0.0]


def test_kimi_length_hand_values():
    # lengths 10..40 → λ = 0.5, 1/6, −1/6, −0.5; wrong responses keep only the negative part
    scores = kimi_length(group([10, 20, 30, 40], [1, 0, 1, 0]))
    assert scores == pytest.approx([0.5, 0.0, -1 / 6, -0.5])
    assert kimi_length(group([12, 12], [1, 0])) == [0.5, 0.0]


def overlong_loop(length, max_tokens, buffer):
    if length <= max_tokens - buffer:
        return 0.0
    if length <= max_tokens:
        return ((max_tokens - buffer) - length) / buffer
    return -1.0


def test_overlong_penalty_hand_values_and_loop():
    # L_max 20, L_cache 5: free up to 15, then −0.2 per token to −1 at 20, −1 beyond
    assert [overlong_penalty(n, 20, 5) for n in (10, 15, 16, 18, 20, 25)] == pytest.approx([0, 0, -0.2, -0.6, -1, -1])
    assert [overlong_penalty(n, 24, 7) for n in range(30)] == pytest.approx([overlong_loop(n, 24, 7) for n in range(30)])
    assert soft_overlong(Sample("q", "r", "4", num_tokens=18), max_tokens=20, buffer=5) == pytest.approx(-0.6)


def test_l1_length():
    sample = Sample("q", "r", "4", metadata={"target_length": 100}, num_tokens=70)
    assert l1_length(sample, alpha=0.01) == pytest.approx(-0.3)
    with pytest.raises(KeyError, match="target_length"):
        l1_length(Sample("q", "r", "4", num_tokens=70))


# ---- through the runner --------------------------------------------------------------------


def trajectory(answer, tokens, group_id):
    return Trajectory(Prompt("p", "What is 2+2?", "4"), [1] * tokens, [0.0] * tokens, rf"\boxed{{{answer}}}", "stop", group_id)


def runner(fns, **reward):
    cfg = OmegaConf.structured(RewardConfig(fns=list(fns), accuracy="math", timeout_s=5.0, num_workers=2, **reward))
    return RewardRunner(cfg)


def test_group_reward_sees_its_group_and_correctness():
    # two interleaved groups: group 0 = lengths 10 (right), 30 (right), 5 (wrong); group 1 = 8 (right)
    trajs = [trajectory(4, 10, 0), trajectory(4, 8, 1), trajectory(4, 30, 0), trajectory(5, 5, 0)]
    with runner(["math", "short_rl"], options={"short_rl": {"tau_l": 0}}) as r:
        metrics = r.score(trajs)
    lam = [0.5, 0.5, 0.5 - 20 / (20 + 1e-5), 0.0]
    assert [t.reward for t in trajs] == pytest.approx([c + l for c, l in zip([1, 1, 1, 0], lam)])
    assert [t.reward_parts["short_rl"] for t in trajs] == pytest.approx(lam)
    assert metrics["accuracy"] == 0.75 and metrics["reward/short_rl"] == pytest.approx(sum(lam) / 4)


def test_user_group_reward_by_dotted_path_and_bad_returns_counted():
    trajs = [trajectory(4, 3, 0), trajectory(5, 3, 0), trajectory(4, 3, 1)]
    with runner(["math", "user_rewards:share_of_group_correct", "user_rewards:wrong_count"]) as r:
        metrics = r.score(trajs)
    assert [t.reward_parts["user_rewards:share_of_group_correct"] for t in trajs] == [0.5, 0.5, 1.0]
    # wrong_count returns one score for a group of two: that group scores 0 and counts as an error;
    # for the group of one it is right
    assert [t.reward_parts["user_rewards:wrong_count"] for t in trajs] == [0.0, 0.0, 1.0]
    assert metrics["reward/errors"] == 1


@pytest.mark.parametrize("overrides, match", [
    (["+reward.options.short_rl.tau=3"], "reward.options.short_rl: got an unexpected keyword argument 'tau'"),
    (["+reward.options.kimi_length.x=1"], "reward.options: 'kimi_length' is not one of reward.fns"),
    (["reward.accuracy_gate.tau_acc=0.05"], "reward.accuracy_gate.fns is empty"),
    (["reward.accuracy_gate.tau_acc=0.05", "reward.accuracy_gate.fns=[format]"], "reward.accuracy_gate.fns: 'format' is not one of"),
])
def test_bad_reward_options_are_one_line_errors(overrides, match):
    cfg = compose("train", ["reward.fns=[math,short_rl]", *overrides])
    with pytest.raises(ConfigError, match=match) as e:
        validate_common(cfg)
        RewardRunner(cfg.reward).close()
    assert "\n" not in str(e.value)


def test_accuracy_gate_zeroes_length_terms_when_accuracy_drops():
    def batch(right: int, wrong: int):
        return [trajectory(4, 10, i) for i in range(right)] + [trajectory(5, 10, right + i) for i in range(wrong)]

    gate = AccuracyGateConfig(tau_acc=0.1, fns=["short_rl"])
    with runner(["math", "short_rl"], accuracy_gate=gate) as r:
        first = batch(8, 2)  # accuracy 0.8: the max, gate open
        m1 = r.score(first)
        second = batch(6, 4)  # 0.6 < 0.8 − 0.1: closed, length term zeroed
        m2 = r.score(second)
        held_out = r.score(batch(1, 9), train=False)  # evaluation: no update, no gate
        third = batch(15, 5)  # 0.75 ≥ 0.8 − 0.1: open again
        m3 = r.score(third)
        state = r.state_dict()
    assert (m1["reward/gate_open"], m2["reward/gate_open"], m3["reward/gate_open"]) == (1.0, 0.0, 1.0)
    assert first[0].reward == 1.5 and second[0].reward == 1.0 and third[0].reward == 1.5
    assert "reward/gate_open" not in held_out
    assert state == {"max_accuracy": 0.8}
    with runner(["math", "short_rl"], accuracy_gate=gate) as fresh:
        fresh.load_state_dict(state)
        assert fresh.score(batch(6, 4))["reward/gate_open"] == 0.0  # the maximum survived the restart
