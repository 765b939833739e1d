"""Advantages and losses: vectorised code against plain loops and hand-computed values."""

import math

import pytest
import torch
from conftest import random_groups
from tensordict import TensorDict

from rlcore.algorithm import LossNorm, aggregate, build_algorithm, kl_estimate, ppo_clip
from rlcore.algorithms.grpo import grpo_advantages
from rlcore.algorithms.opo import NotOnPolicyError, opo_advantages
from rlcore.config import ConfigError


def grpo_loop(rewards, groups, scale_by_std=True, eps=1e-6):
    out = []
    for i, r in enumerate(rewards):
        members = [rewards[j] for j in range(len(rewards)) if groups[j] == groups[i]]
        if len(members) == 1:
            out.append(0.0)
            continue
        mean = sum(members) / len(members)
        std = math.sqrt(sum((m - mean) ** 2 for m in members) / (len(members) - 1))
        out.append((r - mean) / (std + eps) if scale_by_std else r - mean)
    return out


def opo_loop(rewards, lengths, groups):
    out = []
    for i, r in enumerate(rewards):
        idx = [j for j in range(len(rewards)) if groups[j] == groups[i]]
        baseline = sum(lengths[j] * rewards[j] for j in idx) / sum(lengths[j] for j in idx)
        out.append(r - baseline)
    return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_matches_loop(seed, scale_by_std):
    rewards, _, groups = random_groups(seed)
    got = grpo_advantages(rewards, groups, scale_by_std)
    want = torch.tensor(grpo_loop(rewards.tolist(), groups.tolist(), scale_by_std))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_grpo_equal_rewards_give_zero_advantage():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    assert torch.all(grpo_advantages(rewards, groups) == 0)


def test_grpo_hand_values():
    # group rewards [1, 0]: mean 0.5, unbiased std sqrt(0.5) → ±0.5/0.7071 = ±0.70711
    adv = grpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([0.70711, -0.70711]), atol=1e-5, rtol=0)
    torch.testing.assert_close(grpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), scale_by_std=False), torch.tensor([0.5, -0.5]))


def test_opo_three_sample_hand_example():
    # r = [1, 0, 1], l = [2, 4, 6]: b = (2·1 + 4·0 + 6·1) / 12 = 8/12 = 2/3
    adv = opo_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([2.0, 4.0, 6.0]), torch.tensor([0, 0, 0]))
    torch.testing.assert_close(adv, torch.tensor([1 / 3, -2 / 3, 1 / 3]))


def test_opo_differs_from_plain_mean_when_lengths_differ():
    rewards, lengths, groups = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 9.0]), torch.tensor([0, 0])
    # length-weighted baseline 0.1, not the plain mean 0.5
    torch.testing.assert_close(opo_advantages(rewards, lengths, groups), torch.tensor([0.9, -0.1]))


@pytest.mark.parametrize("seed", range(5))
def test_opo_matches_loop(seed):
    rewards, lengths, groups = random_groups(seed)
    got = opo_advantages(rewards, lengths, groups)
    want = torch.tensor(opo_loop(rewards.tolist(), lengths.tolist(), groups.tolist()))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_opo_group_of_one_gets_zero():
    adv = opo_advantages(torch.tensor([1.0, 0.3, 0.7]), torch.tensor([5.0, 3.0, 2.0]), torch.tensor([0, 1, 1]))
    assert adv[0] == 0


def test_opo_batch_baseline_pools_all_groups():
    algo = build_algorithm({"name": "opo", "baseline": "batch"})
    batch = TensorDict(
        {"rewards": torch.tensor([1.0, 0.0, 1.0, 0.0]), "response_lengths": torch.tensor([1.0, 1.0, 2.0, 4.0]),
         "group_ids": torch.tensor([0, 0, 1, 1]), "response_mask": torch.ones(4, 3)}, batch_size=[4])
    # b = (1 + 0 + 2 + 0) / 8 = 0.375 for everyone
    torch.testing.assert_close(algo.advantages(batch)[:, 0], torch.tensor([0.625, -0.375, 0.625, -0.375]))


def test_advantages_are_zero_outside_response():
    algo = build_algorithm({"name": "grpo"})
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    batch = TensorDict({"rewards": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0]), "response_mask": mask}, batch_size=[2])
    adv = algo.advantages(batch)
    assert torch.all(adv[mask == 0] == 0) and torch.all(adv[mask == 1] != 0)


def test_ppo_clip_hand_values():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]]))  # ratios
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, ratio, clipped = ppo_clip(logp, old, adv, eps_low=0.2, eps_high=0.2)
    # A>0, r=1.5 → clipped at 1.2: -1.2 ; A>0, r=0.5 → unclipped -0.5 (min of objective)
    # A<0, r=1.5 → unclipped 1.5 ; A<0, r=0.5 → clipped at 0.8: 0.8
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -0.5, 1.5, 0.8]]))
    assert clipped.tolist() == [[True, False, False, True]]


def test_asymmetric_clip():
    loss, _, _ = ppo_clip(torch.log(torch.tensor([[1.5]])), torch.zeros(1, 1), torch.ones(1, 1), eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(loss, torch.tensor([[-1.28]]))


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "mode, want",
    [
        ("token-mean", (1 + 2 + 3 + 4) / 4),  # 2.5
        ("seq-mean-token-mean", ((1 + 2 + 3) / 3 + 4 / 1) / 2),  # 3.0
        ("seq-mean-token-sum", ((1 + 2 + 3) + 4) / 2),  # 5.0
    ],
)
def test_aggregation_modes_hand_values(mode, want):
    got = aggregate(PER_TOKEN, MASK, mode, LossNorm(tokens=float(MASK.sum()), seqs=2.0))
    assert float(got) == pytest.approx(want)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_aggregation_over_micro_batches_sums_to_whole_batch(mode):
    g = torch.Generator().manual_seed(0)
    per_token = torch.randn(8, 5, generator=g)
    mask = (torch.rand(8, 5, generator=g) > 0.3).float()
    norm = LossNorm(float(mask.sum()), 8.0)
    whole = aggregate(per_token, mask, mode, norm)
    parts = sum(aggregate(per_token[i : i + 3], mask[i : i + 3], mode, norm) for i in range(0, 8, 3))
    torch.testing.assert_close(parts, whole)


def test_kl_estimators_hand_values():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # log(ref/p) = log 0.5 = -0.693147
    assert float(kl_estimate(logp, ref, "k1")) == pytest.approx(0.693147, abs=1e-6)
    assert float(kl_estimate(logp, ref, "k2")) == pytest.approx(0.5 * 0.693147**2, abs=1e-6)
    assert float(kl_estimate(logp, ref, "k3")) == pytest.approx(0.5 - 1 + 0.693147, abs=1e-6)


def test_kl_term_enters_loss():
    algo = build_algorithm({"name": "grpo", "kl_coef": 0.5, "kl_estimator": "k1"})
    logp = torch.log(torch.tensor([[0.5]]))
    batch = TensorDict({"response_mask": torch.ones(1, 1), "old_logp": logp.clone(), "advantages": torch.zeros(1, 1),
                        "ref_logp": torch.log(torch.tensor([[0.25]]))}, batch_size=[1])
    loss, metrics = algo.loss(logp, batch, LossNorm(1.0, 1.0))
    assert float(loss) == pytest.approx(0.5 * 0.693147, abs=1e-5)
    assert float(metrics["kl_ref"]) == pytest.approx(0.693147, abs=1e-5)


def test_opo_loss_is_reinforce_when_on_policy():
    algo = build_algorithm({"name": "opo"})
    logp = torch.log(torch.tensor([[0.2, 0.7], [0.4, 0.9]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0], [-0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    batch = TensorDict({"response_mask": mask, "old_logp": logp.detach().clone(), "advantages": adv}, batch_size=[2])
    loss, metrics = algo.loss(logp, batch, LossNorm(3.0, 2.0))
    loss.backward()
    # ratio = 1 → d loss / d logp = -A · mask / tokens
    torch.testing.assert_close(logp.grad, -adv * mask / 3.0)
    assert float(metrics["ratio_max_dev"]) == 0 and float(metrics["clip_frac"]) == 0


def test_opo_refuses_off_policy_ratio():
    algo = build_algorithm({"name": "opo"})
    batch = TensorDict({"response_mask": torch.ones(1, 1), "old_logp": torch.zeros(1, 1), "advantages": torch.ones(1, 1)}, batch_size=[1])
    with pytest.raises(NotOnPolicyError, match="not on-policy"):
        algo.loss(torch.full((1, 1), 0.1), batch, LossNorm(1.0, 1.0))


@pytest.mark.parametrize("options, message", [
    ({"name": "opo", "mini_batches": 2}, "OPO is exactly on-policy"),
    ({"name": "opo", "epochs": 2}, "OPO is exactly on-policy"),
    ({"name": "opo", "kl_coef": 0.1}, "OPO uses no KL"),
    ({"name": "grpo", "clip": 0.1}, "algorithm.clip is not an option of grpo"),
    ({"name": "nope"}, "algorithm.name='nope' is not registered"),
    ({"name": "grpo", "loss_agg": "mean"}, "algorithm.loss_agg='mean' is not allowed"),
])
def test_algorithm_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        build_algorithm(options)
