"""bench/opo_variance.py's variance arithmetic against plain loops: explicit small gradient
vectors, every draw's estimate ĝ built directly, the empirical variance taken over draws."""

import pytest
import torch
from conftest import load_bench_script

ov = load_bench_script("opo_variance")

EPS = 1e-6  # grpo_advantages' default


def empirical_variance(estimates: list[list[float]]) -> tuple[float, list[float]]:
    """Σ over coordinates of the unbiased variance over draws, and the mean vector; plain loops."""
    draws, dim = len(estimates), len(estimates[0])
    mean = [sum(e[d] for e in estimates) / draws for d in range(dim)]
    total = sum((e[d] - mean[d]) ** 2 for e in estimates for d in range(dim)) / (draws - 1)
    return total, mean


def loop_advantages(method, rewards, lengths, sq_norms):
    """One group's advantages, written out."""
    k = len(rewards)
    mean = sum(rewards) / k
    if method == "none":
        return list(rewards)
    if method == "grpo_mean":
        return [r - mean for r in rewards]
    if method == "grpo_std":
        std = (sum((r - mean) ** 2 for r in rewards) / (k - 1)) ** 0.5
        return [(r - mean) / (std + EPS) for r in rewards]
    weights = lengths if method == "opo" else sq_norms
    baseline = sum(w * r for w, r in zip(weights, rewards)) / sum(weights)
    return [r - baseline for r in rewards]


def test_variance_from_gram_matches_direct_estimates():
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(6, 5, generator=g, dtype=torch.float64)  # 6 samples, 5 "parameters"
    coeffs = torch.randn(40, 6, generator=g, dtype=torch.float64) + 0.5  # 40 draws
    estimates = [[sum(float(coeffs[r, i]) * float(grads[i, d]) for i in range(6)) for d in range(5)] for r in range(40)]
    expected_var, expected_mean = empirical_variance(estimates)

    var, mean_coeffs, per_draw = ov.variance_from_gram(coeffs, grads @ grads.T)
    assert var == pytest.approx(expected_var, rel=1e-10)
    assert float(per_draw.sum()) / 39 == pytest.approx(expected_var, rel=1e-10)
    assert (mean_coeffs @ grads).tolist() == pytest.approx(expected_mean, rel=1e-10, abs=1e-12)


def test_draw_groups_are_distinct_samples_of_the_pool():
    idx = ov.draw_groups(10, 4, 200, torch.Generator().manual_seed(1))
    assert idx.shape == (200, 4)
    assert all(len(set(row)) == 4 and all(0 <= i < 10 for i in row) for row in idx.tolist())
    assert len({i for row in idx.tolist() for i in row}) == 10  # the whole pool gets drawn


@pytest.mark.parametrize("method", ov.METHODS)
def test_prompt_variances_match_a_loop_over_draws(method):
    """One prompt's pool: its share of the batch variance (fixed normaliser and per-group
    normaliser) and its mean coefficients, against ĝ built draw by draw."""
    g = torch.Generator().manual_seed(2)
    pool, dim, k, draws, batch_tokens, num_prompts = 7, 4, 3, 60, 37.5, 4
    grads = torch.randn(pool, dim, generator=g, dtype=torch.float64) * torch.arange(1, pool + 1, dtype=torch.float64)[:, None]
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.5])
    lengths = torch.tensor([3.0, 9.0, 4.0, 12.0, 5.0, 2.0, 7.0])
    idx = ov.draw_groups(pool, k, draws, g)

    stats = ov.prompt_variances(grads @ grads.T, rewards, lengths, idx, batch_tokens, num_prompts)[method]

    sq_norms = [float(grads[i] @ grads[i]) for i in range(pool)]
    fixed, per_group = [], []
    for row in idx.tolist():
        adv = loop_advantages(method, [float(rewards[i]) for i in row], [float(lengths[i]) for i in row], [sq_norms[i] for i in row])
        group_tokens = sum(float(lengths[i]) for i in row)
        fixed.append([sum(a * float(grads[i, d]) for a, i in zip(adv, row)) / batch_tokens for d in range(dim)])
        per_group.append([sum(a * float(grads[i, d]) for a, i in zip(adv, row)) / (num_prompts * group_tokens) for d in range(dim)])
    expected_var, expected_mean = empirical_variance(fixed)
    expected_var_group, _ = empirical_variance(per_group)

    # float32 advantages from the project's functions: agreement to ~1e-6 relative.
    assert stats["var"] == pytest.approx(expected_var, rel=1e-5)
    assert stats["var_group"] == pytest.approx(expected_var_group, rel=1e-5)
    assert (stats["mean"] @ grads).tolist() == pytest.approx(expected_mean, rel=1e-5, abs=1e-9)
    assert stats["var"] > 0


def test_methods_differ_on_this_pool():
    """The pool above separates the methods (a mix-up between them would go unseen otherwise)."""
    g = torch.Generator().manual_seed(2)
    grads = torch.randn(7, 4, generator=g, dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.5])
    lengths = torch.tensor([3.0, 9.0, 4.0, 12.0, 5.0, 2.0, 7.0])
    idx = ov.draw_groups(7, 3, 60, g)
    stats = ov.prompt_variances(grads @ grads.T, rewards, lengths, idx, 10.0, 1)
    values = [stats[m]["var"] for m in ov.METHODS]
    assert len({round(v, 8) for v in values}) == len(values)


def test_batch_variance_is_the_sum_over_independent_prompts():
    """With the fixed normaliser, prompts drawn independently: the variance of whole batches
    (ĝ over all prompts, built directly) approaches the sum of per-prompt variances."""
    g = torch.Generator().manual_seed(3)
    prompts, pool, dim, k, draws = 3, 6, 5, 3, 8000
    grads = [torch.randn(pool, dim, generator=g, dtype=torch.float64) for _ in range(prompts)]
    rewards = [torch.randint(0, 2, (pool,), generator=g).float() for _ in range(prompts)]
    lengths = [torch.randint(2, 20, (pool,), generator=g).float() for _ in range(prompts)]
    batch_tokens = k * sum(float(x.mean()) for x in lengths)
    total, whole = 0.0, torch.zeros(draws, dim, dtype=torch.float64)
    for p in range(prompts):
        idx = ov.draw_groups(pool, k, draws, g)
        coeffs = ov.coefficients(ov.draw_advantages("opo", rewards[p], lengths[p], None, idx), idx, pool, batch_tokens)
        total += ov.variance_from_gram(coeffs, grads[p] @ grads[p].T)[0]
        whole += coeffs @ grads[p]
    # The same draws on both sides: they differ only by the (zero-mean) cross-prompt covariances.
    assert float(whole.var(0).sum()) == pytest.approx(total, rel=0.05)
