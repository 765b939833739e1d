"""RSPO (SPEC §4): the router-shift ratio and the geometric-mean objective, against plain loops
over the SPEC's formulas and hand-computed values; γ on an ordinary GRPO ratio."""

import math

import pytest
import torch
from tensordict import TensorDict

from rlcore.algorithm import LossNorm, build_algorithm, router_shift_ratio
from rlcore.algorithms.rspo import rspo_loss
from rlcore.config import ConfigError


def batch_of(**tensors):
    return TensorDict(tensors, batch_size=[len(next(iter(tensors.values())))])


def gamma_loop(new, old, floor):
    """γ_t = max(exp(−(1/L)·Σ_l (1/K)·Σ_k |log r_new − log r_old|), floor), token by token."""
    B, R, L, K = new.shape
    out = torch.zeros(B, R)
    for b in range(B):
        for t in range(R):
            total = sum(abs(float(new[b, t, l, k]) - float(old[b, t, l, k])) / K for l in range(L) for k in range(K)) / L
            out[b, t] = max(math.exp(-total), floor)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_router_shift_ratio_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(3, 5, 4, 2, generator=g).log_softmax(-1)
    new = old + 0.8 * torch.randn(3, 5, 4, 2, generator=g)  # some tokens shift enough to hit the floor
    gamma = router_shift_ratio(new, old, floor=0.5)
    torch.testing.assert_close(gamma, gamma_loop(new, old, 0.5))
    assert (gamma == 0.5).any() and (gamma > 0.5).any()


def test_router_shift_ratio_hand_values_and_stop_gradient():
    old = torch.log(torch.tensor([[[[0.5, 0.25]]]]))  # one token, one layer, K = 2
    new = torch.log(torch.tensor([[[[0.25, 0.5]]]])).requires_grad_()
    # |log 0.25 − log 0.5| = |log 0.5 − log 0.25| = log 2 → γ = exp(−log 2) = 0.5
    gamma = router_shift_ratio(new, old, floor=0.1)
    torch.testing.assert_close(gamma, torch.tensor([[0.5]]))
    assert not gamma.requires_grad
    assert float(router_shift_ratio(old, old, floor=0.1)) == 1.0  # unmoved router
    assert float(router_shift_ratio(new, old, floor=0.9)) == pytest.approx(0.9)


def rspo_loop(logp, old, adv, mask, eps, gamma):
    """The SPEC's objective literally, per sequence, with γ on the ratio before the clip:
    x_t = (γ_t·w_t)^sgnA, W_t = min(x_t, clip(x_t, 1 − ε, 1 + ε)), S = (Π_t W_t)^(sgnA/|o|),
    loss_i = −S·A. Autograd-friendly (a list of scalars)."""
    losses = []
    for i in range(len(logp)):
        tokens = [t for t in range(len(logp[i])) if mask[i][t]]
        a = float(adv[i][tokens[0]])
        sign = (a > 0) - (a < 0)
        product = torch.tensor(1.0)
        for t in tokens:
            x = (gamma[i][t] * torch.exp(logp[i][t] - old[i][t])) ** sign
            product = product * torch.minimum(x, torch.clamp(x, 1 - eps, 1 + eps))
        losses.append(-product ** (sign / len(tokens)) * a)
    return torch.stack(losses)


@pytest.mark.parametrize("seed", range(4))
def test_rspo_loss_and_gradient_match_loop(seed):
    g = torch.Generator().manual_seed(seed)
    B, R, eps = 6, 7, 0.2
    mask = (torch.arange(R)[None, :] < torch.randint(1, R + 1, (B,), generator=g)[:, None]).float()
    old = -torch.rand(B, R, generator=g)
    shift = 0.3 * torch.randn(B, R, generator=g)  # ratios beyond 1 ± ε on both sides
    adv = torch.tensor([1.5, -0.7, 0.0, 0.4, -2.0, 1.0])[:, None] * mask
    gamma = torch.rand(B, R, generator=g) * 0.5 + 0.5
    fast_logp = (old + shift).requires_grad_()
    loss, seq_ratio, clipped = rspo_loss(fast_logp + gamma.log(), old, adv, mask, eps)
    slow_logp = (old + shift).requires_grad_()
    want = rspo_loop(slow_logp, old, adv, mask.tolist(), eps, gamma)
    torch.testing.assert_close(loss, want)
    moved = adv[:, 0] != 0
    torch.testing.assert_close(seq_ratio[moved], -loss[moved] / adv[moved, 0])
    loss.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(fast_logp.grad, slow_logp.grad)
    assert clipped.any() and not clipped.all()
    assert (fast_logp.grad[clipped] == 0).all()  # a clipped token pushes no further
    assert float(loss[2].detach()) == 0 and (fast_logp.grad[2] == 0).all()  # A = 0: nothing to learn


def test_rspo_hand_values():
    # one sequence, two tokens, ε = 0.2; A = +1: ratios e^0.1 (kept) and e^0.3 (clipped at 1.2)
    logp = torch.tensor([[0.1, 0.3]], requires_grad=True)
    loss, seq_ratio, clipped = rspo_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 0.2)
    s = math.sqrt(math.exp(0.1) * 1.2)
    torch.testing.assert_close(loss, torch.tensor([-s]))
    assert clipped.tolist() == [[False, True]]
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-s / 2, 0.0]]))  # dS/dlogp_t = S/|o| on kept tokens
    # A = −1: x = 1/w; e^−0.3 → x = e^0.3 > 1.2 clipped, e^0.1 → x = e^−0.1 kept; S = (1.2·e^−0.1)^−1/2
    logp = torch.tensor([[-0.3, 0.1]])
    loss, seq_ratio, clipped = rspo_loss(logp, torch.zeros(1, 2), -torch.ones(1, 2), torch.ones(1, 2), 0.2)
    torch.testing.assert_close(seq_ratio, torch.tensor([(1.2 * math.exp(-0.1)) ** -0.5]))
    assert clipped.tolist() == [[True, False]]


def router_batch(gamma: float, advantage: float):
    """One token whose router moved so that γ = `gamma` (one layer, K = 1), logp = old_logp."""
    return batch_of(response_mask=torch.ones(1, 1), old_logp=torch.zeros(1, 1), advantages=torch.full((1, 1), advantage),
                    router_old_logp=torch.zeros(1, 1, 1, 1), router_logp=torch.full((1, 1, 1, 1), math.log(gamma)))


def test_router_shift_on_grpo_rescales_the_ratio_before_the_clip():
    """GRPO (clip 0.2) with router_shift: w = 1, γ = 0.5 → ratio 0.5. A = +1: below the clip
    range, PPO keeps it: loss −0.5, gradient −γ·w = −0.5. A = −1: clipped at 0.8: loss 0.8,
    no gradient. Without router_shift the same batch is ratio 1: loss ∓1."""
    grpo = build_algorithm({"name": "grpo", "router_shift": True})
    norm = LossNorm(1.0, 1.0)
    logp = torch.zeros(1, 1, requires_grad=True)
    loss, metrics = grpo.loss(logp, router_batch(0.5, 1.0), norm)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(-0.5) and float(logp.grad) == pytest.approx(-0.5)
    assert float(metrics["router_shift_gamma"]) == pytest.approx(0.5) and float(metrics["router_shift_floored_frac"]) == 0
    loss, metrics = grpo.loss(torch.zeros(1, 1, requires_grad=True), router_batch(0.5, -1.0), norm)
    assert float(loss.detach()) == pytest.approx(0.8) and float(metrics["clip_frac"]) == 1
    plain = build_algorithm({"name": "grpo"})
    assert float(plain.loss(torch.zeros(1, 1), router_batch(0.5, 1.0), norm)[0]) == pytest.approx(-1.0)
    floored = build_algorithm({"name": "grpo", "router_shift": True, "router_shift_floor": 0.7})
    assert float(floored.loss(torch.zeros(1, 1), router_batch(0.5, 1.0), norm)[1]["router_shift_floored_frac"]) == 1


def test_rspo_defaults_and_bad_floor():
    rspo = build_algorithm({"name": "rspo"})
    assert rspo.needs_router and rspo.loss_agg == "seq-mean-token-mean"
    assert math.log1p(rspo.clip_range[1]) == pytest.approx(0.4)  # GMPO's token log-ratio clip
    assert not build_algorithm({"name": "grpo"}).needs_router
    for floor in (0.0, 1.5):
        with pytest.raises(ConfigError, match=f"algorithm.router_shift_floor={floor} must be in"):
            build_algorithm({"name": "rspo", "router_shift_floor": floor})
