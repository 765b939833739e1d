"""HGPO (SPEC §2): vectorised advantages against a plain loop and hand-computed values; the loss."""

import math

import pytest
import torch
from conftest import compose
from tensordict import TensorDict

from rlcore.algorithm import LossNorm, build_algorithm, kl_estimate, ppo_clip
from rlcore.algorithms.hgpo import hgpo_advantages, hgpo_rewards
from rlcore.config import ConfigError

THINK, NO = 1, 0


def norm_loop(values, groups, eps=1e-6):
    """(x − mean) / (std + eps) over each group, Bessel std: the SPEC's norm(), written out."""
    out = []
    for i, x in enumerate(values):
        members = [values[j] for j in range(len(values)) if groups[j] == groups[i]]
        mean = sum(members) / len(members)
        std = math.sqrt(sum((m - mean) ** 2 for m in members) / (len(members) - 1))
        out.append((x - mean) / (std + eps))
    return out


def hgpo_loop(rewards, modes, groups, lengths, alpha, delta):
    """SPEC §2 sample by sample: per-mode means, inter and intra rewards, A_i,t."""
    intra, inter = [], []
    for i, r in enumerate(rewards):
        def of_mode(m):
            return [rewards[j] for j in range(len(rewards)) if groups[j] == groups[i] and modes[j] == m]

        r_think, r_no = sum(of_mode(THINK)) / len(of_mode(THINK)), sum(of_mode(NO)) / len(of_mode(NO))
        winner = THINK if r_think > r_no + delta else NO
        inter.append(1.0 if modes[i] == winner else 0.0)
        intra.append(1.0 if r == max(of_mode(modes[i])) else 0.0)
    n_intra, n_inter = norm_loop(intra, groups), norm_loop(inter, groups)
    width = max(lengths)
    return [
        [(n_intra[i] + (alpha * n_inter[i] if t == 0 else 0.0)) if t < lengths[i] else 0.0 for t in range(width)]
        for i in range(len(rewards))
    ]


def random_hybrid_groups(seed, n_groups=5, per_mode=4):
    g = torch.Generator().manual_seed(seed)
    n = n_groups * 2 * per_mode
    rewards = torch.randint(0, 3, (n,), generator=g).float() / 2  # {0, 0.5, 1}: plenty of ties
    modes = torch.tensor([THINK] * per_mode + [NO] * per_mode).repeat(n_groups)
    groups = torch.arange(n_groups).repeat_interleave(2 * per_mode)
    lengths = torch.randint(1, 12, (n,), generator=g)
    perm = torch.randperm(n, generator=g)  # groups and modes need not be contiguous
    return rewards[perm], modes[perm], groups[perm], lengths[perm]


def mask_of(lengths):
    return (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).float()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("alpha, delta", [(1.0, 0.2), (0.5, 0.0), (2.0, -0.3)])
def test_hgpo_matches_loop(seed, alpha, delta):
    rewards, modes, groups, lengths = random_hybrid_groups(seed)
    got = hgpo_advantages(rewards, modes, groups, mask_of(lengths), alpha, delta)
    want = torch.tensor(hgpo_loop(rewards.tolist(), modes.tolist(), groups.tolist(), lengths.tolist(), alpha, delta))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_hgpo_hand_values():
    # modes [T, T, N, N], rewards [1, 0, 1, 1]: R̄_think 0.5, R̄_no 1 → no-think wins: inter [0, 0, 1, 1],
    # mean 0.5, Bessel std √(1/3) = 0.57735 → ∓0.866025. Intra: think's best is sample 0; no-think's
    # two are tied best and both get 1 → [1, 0, 1, 1], mean 0.75, std 0.5 → [0.5, −1.5, 0.5, 0.5].
    rewards, modes, groups = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([THINK, THINK, NO, NO]), torch.zeros(4, dtype=torch.long)
    intra, inter = hgpo_rewards(rewards, modes, groups, delta=0.2)
    assert intra.tolist() == [1, 0, 1, 1] and inter.tolist() == [0, 0, 1, 1]
    adv = hgpo_advantages(rewards, modes, groups, torch.ones(4, 3), alpha=1.0, delta=0.2)
    intra_n, inter_n = torch.tensor([0.5, -1.5, 0.5, 0.5]), torch.tensor([-0.866025, -0.866025, 0.866025, 0.866025])
    torch.testing.assert_close(adv[:, 0], intra_n + inter_n, atol=1e-5, rtol=0)
    torch.testing.assert_close(adv[:, 1:], intra_n[:, None].expand(4, 2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("delta, winner", [(0.2, THINK), (0.25, NO), (0.3, NO), (0.0, THINK), (-0.3, THINK)])
def test_delta_margin(delta, winner):
    # R̄_think = 0.75, R̄_no = 0.5: think wins only while 0.75 > 0.5 + δ (the tie at δ = 0.25 goes to no-think).
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    modes = torch.tensor([THINK] * 4 + [NO] * 4)
    _, inter = hgpo_rewards(rewards, modes, torch.zeros(8, dtype=torch.long), delta)
    assert inter.tolist() == [float(m == winner) for m in modes.tolist()]


def test_equal_means_go_to_no_think_and_tied_intra_normalises_to_zero():
    # Every sample right: intra all 1 (all tied best) → norm 0 everywhere; the means tie, so with
    # δ = 0 no-think still wins and the tag alone carries ±α·0.935 (N = 8: 4 ones, 4 zeros).
    rewards, modes = torch.ones(8), torch.tensor([THINK, NO] * 4)
    adv = hgpo_advantages(rewards, modes, torch.zeros(8, dtype=torch.long), torch.ones(8, 5), alpha=1.0, delta=0.0)
    assert torch.all(adv[:, 1:] == 0)
    torch.testing.assert_close(adv[:, 0], torch.where(modes == NO, 0.935414, -0.935414), atol=1e-5, rtol=0)


def test_mode_term_only_on_the_tag_token():
    rewards, modes, groups, lengths = random_hybrid_groups(11)
    mask = mask_of(lengths)
    with_tag = hgpo_advantages(rewards, modes, groups, mask, alpha=1.0, delta=0.2)
    without = hgpo_advantages(rewards, modes, groups, mask, alpha=0.0, delta=0.2)
    torch.testing.assert_close(with_tag[:, 1:], without[:, 1:])
    assert (with_tag[:, 0] != without[:, 0]).all()  # the inter rewards are never all equal
    assert torch.all(with_tag[mask == 0] == 0)
    # α = 0: the intra advantage, the same on every response token
    torch.testing.assert_close(without, without[:, :1] * mask)


@pytest.mark.parametrize("modes, message", [
    ([THINK, THINK, -1, NO], "every trajectory's mode"),
    ([THINK, THINK, THINK, THINK], "both modes for every prompt"),
])
def test_needs_hybrid_trajectories(modes, message):
    with pytest.raises(ValueError, match=message):
        hgpo_rewards(torch.ones(4), torch.tensor(modes), torch.zeros(4, dtype=torch.long), 0.2)


def test_defaults_are_the_papers():
    algo = build_algorithm({"name": "hgpo"})
    assert (algo.alpha, algo.delta, algo.kl_coef, algo.kl_estimator) == (1.0, 0.2, 0.001, "k3")
    assert (algo.samples_per_prompt, algo.loss_agg, algo.program, algo.needs_reference) == (8, "seq-mean-token-mean", "hybrid", True)


@pytest.mark.parametrize("options, message", [
    ({"samples_per_prompt": 7}, "algorithm.samples_per_prompt=7 must be even"),
    ({"alpha": -1.0}, "algorithm.alpha=-1.0 must be ≥ 0"),
    ({"margin": 0.1}, "algorithm.margin is not an option of hgpo"),
])
def test_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        build_algorithm({"name": "hgpo", **options})


def test_loss_is_ppo_clip_plus_beta_k3_per_sample_token_mean():
    g = torch.Generator().manual_seed(0)
    algo = build_algorithm({"name": "hgpo"})
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    logp, old, ref = (-torch.rand(2, 3, generator=g) for _ in range(3))
    adv = torch.randn(2, 3, generator=g)
    batch = TensorDict({"response_mask": mask, "old_logp": old, "ref_logp": ref, "advantages": adv}, batch_size=[2])
    loss, metrics = algo.loss(logp, batch, LossNorm(4.0, 2.0))
    kl = kl_estimate(logp, ref, "k3")
    kl[:, 0] = 0  # the forced mode tag is no sample of π: no KL term on it
    per_token = ppo_clip(logp, old, adv, 0.2, 0.2)[0] + 0.001 * kl
    want = ((per_token[0] * mask[0]).sum() / 3 + per_token[1, 0]) / 2
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(metrics["kl_ref"], kl[0, 1:].mean())  # row 1 has only its tag


def test_kl_skips_the_forced_tag_and_only_there():
    """A reference that differs from the policy only on token 0 (the tag) adds no KL to HGPO's loss;
    GRPO, whose token 0 is sampled, counts it."""
    mask = torch.ones(2, 3)
    logp = torch.full((2, 3), -1.0)
    ref = logp.clone()
    ref[:, 0] = 3.0  # the losing tag pushed 4 nats below the reference: k3 = e^4 − 5 ≈ 49.6
    batch = TensorDict({"response_mask": mask, "old_logp": logp, "ref_logp": ref, "advantages": torch.zeros(2, 3)},
                       batch_size=[2])
    hgpo_loss, hgpo = build_algorithm({"name": "hgpo"}).loss(logp, batch, LossNorm(6.0, 2.0))
    grpo_loss, grpo = build_algorithm({"name": "grpo", "kl_coef": 0.001}).loss(logp, batch, LossNorm(6.0, 2.0))
    assert float(hgpo_loss) == 0.0 and float(hgpo["kl_ref"]) == 0.0
    assert float(grpo["kl_ref"]) == pytest.approx((math.exp(4) - 5) / 3, rel=1e-5)
    assert float(grpo_loss) == pytest.approx(0.001 * (math.exp(4) - 5) * 2 / 6, rel=1e-5)


def test_advantages_read_the_batch():
    rewards, modes, groups, lengths = random_hybrid_groups(3)
    batch = TensorDict({"rewards": rewards, "modes": modes, "group_ids": groups, "response_mask": mask_of(lengths)}, batch_size=[len(rewards)])
    algo = build_algorithm({"name": "hgpo", "alpha": 0.7, "delta": 0.1})
    torch.testing.assert_close(algo.advantages(batch), hgpo_advantages(rewards, modes, groups, mask_of(lengths), 0.7, 0.1))


def test_recipe_composes():
    cfg = compose("train", ["recipe=hgpo_hybrid"])
    algo = build_algorithm(cfg.algorithm)
    assert algo.name == "hgpo" and algo.program == "hybrid" and cfg.data.task == "arith_mix"
    assert cfg.model.path == "runs/sft_hybrid/final"
