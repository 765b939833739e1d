"""Standard baselines — RLOO, REINFORCE++, DAPO, GSPO, truncated IS: vectorised code against
plain loops and hand-computed values."""

import math

import pytest
import torch
from conftest import compose, random_groups
from tensordict import TensorDict

from rlcore.algorithm import ALGORITHMS, LossNorm, build_algorithm, truncated_is_weights
from rlcore.algorithms.grpo import grpo_advantages
from rlcore.algorithms.gspo import gspo_loss
from rlcore.algorithms import reinforce_pp as rpp
from rlcore.algorithms.reinforce_pp import reinforce_pp_advantages
from rlcore.algorithms.rloo import rloo_advantages
from rlcore.batch import Trajectory
from rlcore.config import ConfigError, validate_train
from rlcore.data import Prompt
from rlcore.dynamic_sampling import informative_frac, refill_groups
from rlcore.rewards.length import overlong_penalty  # checked against a loop in test_length_rewards


def batch_of(**tensors):
    return TensorDict(tensors, batch_size=[len(next(iter(tensors.values())))])


# ---- RLOO -----------------------------------------------------------------------------------


def rloo_loop(rewards, groups):
    out = []
    for i, r in enumerate(rewards):
        others = [rewards[j] for j in range(len(rewards)) if groups[j] == groups[i] and j != i]
        out.append(r - sum(others) / len(others) if others else 0.0)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_rloo_matches_loop(seed):
    rewards, _, groups = random_groups(seed)
    want = torch.tensor(rloo_loop(rewards.tolist(), groups.tolist()))
    torch.testing.assert_close(rloo_advantages(rewards, groups), want, atol=1e-5, rtol=1e-5)


def test_rloo_hand_values():
    # group [1, 0, 0]: baselines 0, 0.5, 0.5; the lone sample of group 1 gets 0
    adv = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.7]), torch.tensor([0, 0, 0, 1]))
    torch.testing.assert_close(adv, torch.tensor([1.0, -0.5, -0.5, 0.0]))


def test_rloo_is_scaled_mean_centring():
    # r_i − mean(others) = K/(K−1)·(r_i − mean): Dr.GRPO's advantage times K/(K−1)
    rewards, _, groups = random_groups(7, k=4)
    torch.testing.assert_close(rloo_advantages(rewards, groups), 4 / 3 * grpo_advantages(rewards, groups, scale_by_std=False))


# ---- REINFORCE++ ----------------------------------------------------------------------------


def token_mask(lengths, width=40):
    return (torch.arange(width)[None, :] < lengths[:, None]).float()


def reinforce_pp_loop(rewards, lengths, scale_by_std=True, eps=1e-6):
    """Per-sample advantages with no KL: every response token carries r_i."""
    tokens = [r for r, n in zip(rewards, lengths) for _ in range(int(n))]
    mean = sum(tokens) / len(tokens)
    std = math.sqrt(sum((t - mean) ** 2 for t in tokens) / len(tokens))
    return [(r - mean) / (std + eps) if scale_by_std else r - mean for r in rewards]


def returns_loop(rewards, kl, lengths, beta):
    """G_t = r_i − β·Σ_{s≥t} kl_s, one token at a time."""
    out = torch.zeros_like(kl)
    for i, (r, n) in enumerate(zip(rewards.tolist(), lengths.int().tolist())):
        for t in range(n):
            out[i, t] = r - beta * sum(kl[i, s].item() for s in range(t, n))
    return out


def rpp_advantages(rewards, lengths, scale_by_std=True, eps=1e-6):
    mask = token_mask(lengths)
    return reinforce_pp_advantages(rpp.kl_penalised_returns(rewards, torch.zeros_like(mask), mask, 0.0), mask, scale_by_std, eps)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_reinforce_pp_matches_loop(seed, scale_by_std):
    rewards, lengths, _ = random_groups(seed)
    got = rpp_advantages(rewards, lengths, scale_by_std)
    want = torch.tensor(reinforce_pp_loop(rewards.tolist(), lengths.tolist(), scale_by_std))
    torch.testing.assert_close(got, want[:, None].expand_as(got) * token_mask(lengths), atol=1e-5, rtol=1e-5)


def test_reinforce_pp_hand_values():
    # r = [1, 0], l = [1, 3]: token mean 1/4; centred [0.75, −0.25];
    # token variance (1·0.75² + 3·0.25²)/4 = 0.1875, std 0.4330127 → [1.7320508, −0.5773503]
    rewards, lengths = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 3.0])
    torch.testing.assert_close(rpp_advantages(rewards, lengths, eps=0.0)[:, 0], torch.tensor([1.7320508, -0.5773503]))
    torch.testing.assert_close(rpp_advantages(rewards, lengths, scale_by_std=False)[:, 0], torch.tensor([0.75, -0.25]))


def test_reinforce_pp_without_std_is_opo_optimal_batch():
    rewards, lengths, groups = random_groups(3)
    mask = token_mask(lengths)
    batch = batch_of(rewards=rewards, response_lengths=lengths, group_ids=groups, response_mask=mask)
    rpp_adv = build_algorithm({"name": "reinforce_pp", "scale_by_std": False}).advantages(batch)
    opo = build_algorithm({"name": "opo", "baseline": "batch"}).advantages(batch)
    torch.testing.assert_close(rpp_adv, opo)
    assert torch.all(rpp_adv[mask == 0] == 0)


def test_reinforce_pp_equal_rewards_give_zero():
    assert torch.all(rpp_advantages(torch.ones(4), torch.tensor([1.0, 2.0, 3.0, 4.0])) == 0)


def test_kl_penalised_returns_hand_values():
    # one sample, r = 1, kl = [0.1, 0.2, 0.3], β = 1: G = [1 − 0.6, 1 − 0.5, 1 − 0.3]; padding stays 0
    kl, mask = torch.tensor([[0.1, 0.2, 0.3, 9.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    torch.testing.assert_close(rpp.kl_penalised_returns(torch.tensor([1.0]), kl, mask, 1.0), torch.tensor([[0.4, 0.5, 0.7, 0.0]]))


@pytest.mark.parametrize("seed", range(3))
def test_kl_penalised_returns_match_loop(seed):
    rewards, lengths, _ = random_groups(seed)
    mask = token_mask(lengths)
    kl = torch.randn(mask.shape, generator=torch.Generator().manual_seed(seed)).abs()
    torch.testing.assert_close(rpp.kl_penalised_returns(rewards, kl, mask, 0.05), returns_loop(rewards, kl, lengths, 0.05),
                               atol=1e-5, rtol=1e-5)


def test_reinforce_pp_reward_kl_reads_rollout_and_reference_logprobs():
    rewards, lengths, groups = random_groups(1)
    mask = token_mask(lengths)
    rollout_logp = -torch.rand(mask.shape, generator=torch.Generator().manual_seed(0))
    ref_logp = -torch.rand(mask.shape, generator=torch.Generator().manual_seed(1))
    batch = batch_of(rewards=rewards, response_lengths=lengths, group_ids=groups, response_mask=mask,
                     rollout_logp=rollout_logp, ref_logp=ref_logp)
    algorithm = build_algorithm({"name": "reinforce_pp", "reward_kl_coef": 0.1})
    assert algorithm.needs_reference and not build_algorithm({"name": "reinforce_pp"}).needs_reference
    want = reinforce_pp_advantages(returns_loop(rewards, rollout_logp - ref_logp, lengths, 0.1), mask)
    torch.testing.assert_close(algorithm.advantages(batch), want)
    assert not torch.allclose(want, build_algorithm({"name": "reinforce_pp"}).advantages(batch))


def test_reward_kl_adds_no_kl_term_to_the_loss():
    """The KL goes into the reward, not the loss: with the same advantages, the loss is the plain one."""
    rewards, lengths, groups = random_groups(2)
    mask = token_mask(lengths)
    logp = -torch.rand(mask.shape, generator=torch.Generator().manual_seed(2))
    batch = batch_of(response_mask=mask, old_logp=logp, rollout_logp=logp, ref_logp=logp - 1.0,
                     advantages=torch.randn(mask.shape, generator=torch.Generator().manual_seed(3)))
    norm = LossNorm(tokens=float(mask.sum()), seqs=float(len(lengths)))
    with_kl, metrics = build_algorithm({"name": "reinforce_pp", "reward_kl_coef": 0.1}).loss(logp, batch, norm)
    plain, _ = build_algorithm({"name": "reinforce_pp"}).loss(logp, batch, norm)
    assert torch.equal(with_kl, plain) and "kl_ref" not in metrics


def test_negative_reward_kl_coef_is_one_line():
    with pytest.raises(ConfigError, match=r"algorithm.reward_kl_coef=-0.1 must be ≥ 0"):
        build_algorithm({"name": "reinforce_pp", "reward_kl_coef": -0.1})


# ---- DAPO -----------------------------------------------------------------------------------


def test_dapo_advantages_are_grpo_of_shaped_reward():
    rewards, lengths, groups = random_groups(1)
    mask = (torch.arange(40)[None, :] < lengths[:, None]).float()
    batch = batch_of(rewards=rewards, response_lengths=lengths, group_ids=groups, response_mask=mask)
    algo = build_algorithm({"name": "dapo", "overlong_max_tokens": 40, "overlong_buffer": 10})
    shaped = [r + overlong_penalty(n, 40, 10) for r, n in zip(rewards.tolist(), lengths.tolist())]
    want = grpo_advantages(torch.tensor(shaped), groups)
    torch.testing.assert_close(algo.advantages(batch)[:, 0], want)
    off = build_algorithm({"name": "dapo", "overlong_buffer": 0}).advantages(batch)[:, 0]
    torch.testing.assert_close(off, grpo_advantages(rewards, groups))


def test_dapo_defaults_and_clip_higher():
    algo = build_algorithm({"name": "dapo"})
    assert algo.clip_range == (0.2, 0.28) and algo.loss_agg == "token-mean" and algo.kl_coef == 0
    assert (algo.overlong_max_tokens, algo.overlong_buffer) == (20480, 4096)
    assert algo.sampling_rounds == algo.max_sampling_rounds > 1
    assert build_algorithm({"name": "dapo", "dynamic_sampling": False}).sampling_rounds == 1
    assert build_algorithm({"name": "grpo"}).sampling_rounds == 1
    # ratio 1.5 on a positive advantage is clipped at 1 + 0.28; ratio 0.5 on a negative one at 1 − 0.2
    batch = batch_of(response_mask=torch.ones(1, 2), old_logp=torch.zeros(1, 2), advantages=torch.tensor([[1.0, -1.0]]))
    loss, metrics = algo.loss(torch.log(torch.tensor([[1.5, 0.5]])), batch, LossNorm(2.0, 1.0))
    assert float(loss) == pytest.approx((-1.28 + 0.8) / 2)
    assert float(metrics["clip_frac"]) == 1.0


def trajectories(reward_groups, first_id=0):
    """One trajectory per reward, group ids first_id, first_id+1, … ; interleaved like the rollout workers return them."""
    out = [Trajectory(Prompt(f"p{first_id + g}", "q", "a"), [1], [0.0], "t", "stop", group_id=first_id + g, reward=r)
           for g, rewards in enumerate(reward_groups) for r in rewards]
    return out[::2] + out[1::2]


def test_informative_frac_counts_groups_whose_rewards_differ():
    assert informative_frac(trajectories([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.5, 0.2]])) == 0.5
    assert informative_frac(trajectories([[0.0, 0.0, 0.0]])) == 0.0


def test_refill_groups_drops_and_refills():
    calls = []

    def sample_more(n, round_):
        calls.append((n, round_))
        return trajectories([[1.0, 0.0], [1.0, 1.0], [0.5, 0.2]][:n], first_id=100)

    first = trajectories([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    out, metrics = refill_groups(first, sample_more, groups=3, rounds=4)
    # 1 of 3 kept → 2 missing at a kept share of 1/3 → ask for min(3, 6) = 3 prompts, once
    assert calls == [(3, 1)]
    assert [t.prompt.id for t in out] == ["p1", "p1", "p100", "p100", "p102", "p102"]
    assert [t.group_id for t in out] == [0, 0, 1, 1, 2, 2]
    assert metrics == {"sampling/rounds": 2.0, "sampling/filler_groups": 0.0}


def test_refill_groups_fills_with_dropped_groups_when_rounds_run_out():
    calls = []

    def sample_more(n, round_):
        calls.append((n, round_))
        return trajectories([[0.0, 0.0]] * n, first_id=10 * round_)

    first = trajectories([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    out, metrics = refill_groups(first, sample_more, groups=3, rounds=3)
    # 2 missing at a kept share of 1/3, then of 1/6: ceil(6) and ceil(12) prompts, capped at 3
    assert calls == [(3, 1), (3, 2)]
    assert len(out) == 6 and metrics["sampling/filler_groups"] == 2.0 and metrics["sampling/rounds"] == 3.0
    assert [t.prompt.id for t in out] == ["p1", "p1", "p0", "p0", "p2", "p2"]


def test_refill_groups_one_round_only_filters():
    def sample_more(n, round_):
        raise AssertionError("no extra round allowed")

    out, metrics = refill_groups(trajectories([[1.0, 1.0], [0.0, 1.0]]), sample_more, groups=2, rounds=1)
    assert [t.prompt.id for t in out] == ["p1", "p1", "p0", "p0"] and metrics["sampling/filler_groups"] == 1.0


# ---- GSPO -----------------------------------------------------------------------------------


def gspo_loop(logp, old, adv, mask, eps_low, eps_high):
    losses = []
    for i in range(len(logp)):
        idx = [t for t in range(len(mask[i])) if mask[i][t]]
        s = math.exp(sum(logp[i][t] - old[i][t] for t in idx) / len(idx))
        a = adv[i][idx[0]]
        losses.append(-min(s * a, min(max(s, 1 - eps_low), 1 + eps_high) * a))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("seed", range(4))
def test_gspo_loss_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    B, R = 6, 7
    mask = (torch.arange(R)[None, :] < torch.randint(1, R + 1, (B,), generator=g)[:, None]).float()
    old = -torch.rand(B, R, generator=g)
    logp = old + 1e-3 * torch.randn(B, R, generator=g)  # ratios near 1, some outside [1−3e-4, 1+4e-4]
    adv = torch.randn(B, 1, generator=g) * mask
    algo = build_algorithm({"name": "gspo"})
    batch = batch_of(response_mask=mask, old_logp=old, advantages=adv)
    loss, metrics = algo.loss(logp, batch, LossNorm(float(mask.sum()), float(B)))
    want = gspo_loop(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 3e-4, 4e-4)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert 0 < float(metrics["clip_frac"]) < 1


def test_gspo_hand_values_and_gradient():
    # log ratios [0.001, 0.003] → s = e^0.002 = 1.0020020
    old = torch.zeros(2, 2)
    logp = torch.tensor([[0.001, 0.003], [0.001, 0.003]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    loss, ratio, clipped = gspo_loss(logp, old, adv, torch.ones(2, 2), 3e-4, 4e-4)
    # A = 1: clipped at 1 + 4e-4 → −1.0004 (no gradient); A = −1: unclipped → +1.0020020
    torch.testing.assert_close(loss, torch.tensor([-1.0004, math.exp(0.002)]))
    assert clipped.tolist() == [True, False]
    loss.sum().backward()
    # d s / d logp_t = s / |y|
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0], [math.exp(0.002) / 2] * 2]))


def test_gspo_defaults_and_micro_batches_sum_to_whole():
    algo = build_algorithm({"name": "gspo"})
    assert algo.clip_range == (3e-4, 4e-4) and algo.loss_agg == "seq-mean-token-mean"
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(8, 5, generator=g) > 0.3).float()
    mask[:, 0] = 1
    old = -torch.rand(8, 5, generator=g)
    batch = batch_of(response_mask=mask, old_logp=old, advantages=torch.randn(8, 1, generator=g) * mask)
    logp = old + 1e-3 * torch.randn(8, 5, generator=g)
    norm = LossNorm(float(mask.sum()), 8.0)
    whole = algo.loss(logp, batch, norm)[0]
    parts = sum(algo.loss(logp[i : i + 3], batch[i : i + 3], norm)[0] for i in range(0, 8, 3))
    torch.testing.assert_close(parts, whole)


# ---- truncated importance sampling ----------------------------------------------------------


def test_truncated_is_weights_hand_values():
    old = torch.log(torch.tensor([[0.6, 0.2, 0.5]]))
    rollout = torch.log(torch.tensor([[0.2, 0.4, 0.5]]))
    # ratios 3 → capped at 2, 0.5, 1
    torch.testing.assert_close(truncated_is_weights(old, rollout, 2.0), torch.tensor([[2.0, 0.5, 1.0]]))


def tis_loop(adv, mask, old, rollout, cap=None):
    """Token-mean of −A·w, on-policy (ratio 1); w = min(π_old/π_rollout, cap), or 1 without a cap."""
    num = den = 0.0
    for i in range(len(adv)):
        for t in range(len(adv[i])):
            if mask[i][t]:
                num += -adv[i][t] * (1.0 if cap is None else min(math.exp(old[i][t] - rollout[i][t]), cap))
                den += 1
    return num / den


@pytest.mark.parametrize("name", ["grpo", "opo", "rloo", "reinforce_pp", "dapo", "gspo"])
def test_truncated_is_works_with_every_loss(name):
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    old = -torch.rand(2, 3, generator=g)
    rollout = old - torch.log(torch.tensor([[3.0, 0.5, 1.2], [2.0, 0.7, 5.0]]))  # π_old/π_rollout; last is padding
    adv = torch.tensor([[1.0], [-0.5]]) * mask
    batch = batch_of(response_mask=mask, old_logp=old, rollout_logp=rollout, advantages=adv)
    norm = LossNorm(float(mask.sum()), 2.0)
    options = {"name": name, "loss_agg": "token-mean"}
    plain, _ = build_algorithm(options).loss(old.clone(), batch, norm)
    weighted, metrics = build_algorithm(options | {"truncated_is": True, "tis_cap": 1.5}).loss(old.clone(), batch, norm)
    assert float(plain) == pytest.approx(tis_loop(adv.tolist(), mask.tolist(), old.tolist(), rollout.tolist()), rel=1e-5)
    assert float(weighted) == pytest.approx(tis_loop(adv.tolist(), mask.tolist(), old.tolist(), rollout.tolist(), 1.5), rel=1e-5)
    assert float(metrics["tis_capped_frac"]) == pytest.approx(2 / 5)


def test_truncated_is_hand_value():
    # one token, A = 1, on-policy; π_old/π_rollout = 3 → weight 2 → loss −2
    algo = build_algorithm({"name": "grpo", "truncated_is": True})
    batch = batch_of(response_mask=torch.ones(1, 1), old_logp=torch.log(torch.tensor([[0.6]])),
                     rollout_logp=torch.log(torch.tensor([[0.2]])), advantages=torch.ones(1, 1))
    loss, metrics = algo.loss(batch["old_logp"].clone(), batch, LossNorm(1.0, 1.0))
    assert float(loss) == pytest.approx(-2.0) and float(metrics["tis_weight"]) == pytest.approx(2.0)


# ---- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"name": "dapo", "max_sampling_rounds": 0}, "algorithm.max_sampling_rounds=0 must be ≥ 1"),
    ({"name": "dapo", "overlong_buffer": 50, "overlong_max_tokens": 40}, "algorithm.overlong_buffer=50 must be in"),
    ({"name": "dapo", "overlong_buffer": -1}, "algorithm.overlong_buffer=-1 must be in"),
    ({"name": "gspo", "tis_cap": 0}, "algorithm.tis_cap=0.0 must be > 0"),
    ({"name": "rloo", "scale_by_std": False}, "algorithm.scale_by_std is not an option of rloo"),
    ({"name": "reinforce_pp", "baseline": "batch"}, "algorithm.baseline is not an option of reinforce_pp"),
    ({"name": "gspo", "loss_agg": "sum"}, "algorithm.loss_agg='sum' is not allowed"),
    ({"name": "rloo", "samples_per_prompt": 1}, "algorithm.samples_per_prompt=1: rloo's baseline comes from the other samples"),
    ({"name": "opo", "samples_per_prompt": 1}, "algorithm.samples_per_prompt=1: opo's baseline"),
])
def test_baseline_config_errors(options, message):
    with pytest.raises(ConfigError, match=message) as error:
        build_algorithm(options)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("options", [{"name": "reinforce_pp"}, {"name": "opo", "baseline": "batch"}])
def test_one_sample_per_prompt_is_fine_with_a_batch_baseline(options):
    assert build_algorithm({**options, "samples_per_prompt": 1}).samples_per_prompt == 1


@pytest.mark.parametrize("recipe, name", [
    ("rloo_math", "rloo"), ("reinforce_pp_math", "reinforce_pp"), ("dapo_math", "dapo"), ("gspo_math", "gspo"),
])
def test_recipes_compose_and_validate(recipe, name):
    cfg = compose("train", [f"recipe={recipe}", "algorithm.truncated_is=true"])
    algo = build_algorithm(cfg.algorithm)
    validate_train(cfg, algo)
    assert algo.name == name and algo.truncated_is and set(ALGORITHMS) >= {"rloo", "reinforce_pp", "dapo", "gspo"}
    if name == "dapo":
        assert algo.overlong_max_tokens == cfg.rollout.max_new_tokens
