"""Variance of the policy-gradient estimate with OPO's length-weighted baseline vs GRPO's.

What is measured
    A fixed pool: P prompts of the task's training split, M samples each, generated once by
    the rollout engine (rlcore.rollout.hf, the `single` program) at the run's temperature,
    scored by the run's reward (RewardRunner: math-verify on the last boxed answer). For every
    sample i the exact gradient g_i = ∇ Σ_t log π(y_i,t) over all model parameters
    (response_logprobs, one sample per backward), and for each prompt its Gram matrix
    G_p[i, j] = g_i·g_j in float64; the gradients themselves are freed after each prompt.

    A batch is one group of K samples per prompt, drawn from that prompt's M without
    replacement, independently across prompts. Its estimate is ĝ = Σ_i c_i g_i with
    c_i = A_i / T̄, A_i from each method's advantage function (rlcore.algorithms):
        none        A_i = r_i                                  (no baseline)
        grpo_mean   r_i − mean_g r                             (grpo_advantages, no std)
        grpo_std    (r_i − mean_g r) / (std_g r + ε)           (grpo_advantages)
        opo         r_i − Σ_g l_j r_j / Σ_g l_j                (opo_advantages, SPEC §1)
        oracle      r_i − Σ_g ‖g_j‖² r_j / Σ_g ‖g_j‖²          (extra: opo_advantages with the
                    true squared gradient norms as weights, what OPO's length stands in for)
    T̄ = K · Σ_p (mean response tokens of prompt p's pool) is the expected number of response
    tokens in a batch: the trainer's token-mean divides by the batch's actual count T, and
    fixing it at E[T] (a) keeps the prompts independent, so the batch's variance is exactly
    the sum of per-prompt variances and only the per-prompt Gram matrices are needed (with a
    random T every cross-prompt product g_i·g_j would be), and (b) is the setting of OPO's
    derivation (sum aggregation up to a constant). `T_cv` in the output, std(T)/E[T] over
    batches, says how far from constant T really is. A second normalisation is also reported
    (`group_norm`): each group divided by its own token count and the batch averaged over
    prompts, c_i = A_i / (P · T_g), which is the trainer's token-mean exactly for a batch of
    one prompt, and is also exactly per-prompt decomposable.

    Per prompt, R draws (the same draws for every method) give coefficient rows c_r ∈ R^M;
    the variance of ĝ_p is trace Cov = Σ_r (c_r − c̄)ᵀ G_p (c_r − c̄) / (R − 1)
    (variance_from_gram); summed over prompts it is the batch's variance. The mean gradient
    Eĝ = Σ_p Σ_i c̄_p,i g_i is accumulated as a vector across prompts (cross-prompt products
    included); ‖Eĝ‖² is reported with its bootstrap bias (Σ_p Var_p / R) removed, with the
    cosine of each method's Eĝ to the no-baseline one (a baseline leaves E ĝ unchanged up to
    its dependence on the group's own samples) and the relative variance Var / ‖Eĝ‖²
    (scale-free, so grpo_std, which rescales the gradient, compares with the others there).
    `ratio_se` is the bootstrap-draw standard error only; the pool itself (P prompts, M
    samples) is one sample, see the per-prompt rows and `--seed`.

Output
    A table, and bench/results/opo_variance.json whose one-line form is the last line printed;
    `ratio` = OPO variance / GRPO-mean variance (goal: < 1, OPO lowest). `pool` says how
    well length stands in for ‖g‖² here (corr_sqnorm_length, over the pool and within a
    prompt) and how much lengths vary within a prompt; `per_prompt` has each prompt's shares.

    python bench/opo_variance.py                        # 16 prompts × 64 samples, K=8
    python bench/opo_variance.py --prompts 32 --draws 8000 --seed 1
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import Tensor

from common import machine, train_config, write_result

HERE = Path(__file__).resolve().parent
METHODS = ("none", "grpo_mean", "grpo_std", "opo", "oracle")
GRAM_CHUNK = 1 << 18  # parameter columns converted to float64 at a time


# ---- the variance arithmetic (pure; tests/unit/test_opo_variance.py) --------------------------


def variance_from_gram(coeffs: Tensor, gram: Tensor) -> tuple[float, Tensor, Tensor]:
    """Draw r's estimate is ĝ_r = Σ_i coeffs[r, i] g_i, and gram[i, j] = g_i·g_j.

    Returns (trace of the covariance of ĝ over the R draws, unbiased (R − 1); the mean
    coefficients c̄ [M], so E ĝ = Σ_i c̄_i g_i; the per-draw terms (c_r − c̄)ᵀ G (c_r − c̄) [R],
    whose sum / (R − 1) is the variance). Centring before the quadratic form avoids the
    cancellation of E‖ĝ‖² − ‖E ĝ‖²."""
    coeffs, gram = coeffs.double(), gram.double()
    mean = coeffs.mean(0)
    centred = coeffs - mean
    per_draw = ((centred @ gram) * centred).sum(1)
    return float(per_draw.sum()) / (len(coeffs) - 1), mean, per_draw


def draw_groups(pool_size: int, k: int, draws: int, generator: torch.Generator) -> Tensor:
    """[draws, k] indices: each row a group of k distinct samples of the pool."""
    return torch.rand(draws, pool_size, generator=generator).argsort(1)[:, :k]


def draw_advantages(method: str, rewards: Tensor, lengths: Tensor, sq_norms: Tensor, idx: Tensor) -> Tensor:
    """Advantages [R, K] of each drawn group (row of idx) under `method`, with the project's
    advantage functions (each row is one group)."""
    from rlcore.algorithms.grpo import grpo_advantages
    from rlcore.algorithms.opo import opo_advantages

    draws, k = idx.shape
    r, group_ids = rewards[idx].reshape(-1), torch.arange(draws).repeat_interleave(k)
    if method == "none":
        a = r
    elif method == "grpo_mean":
        a = grpo_advantages(r, group_ids, scale_by_std=False)
    elif method == "grpo_std":
        a = grpo_advantages(r, group_ids, scale_by_std=True)
    elif method == "opo":
        a = opo_advantages(r, lengths[idx].reshape(-1), group_ids)
    elif method == "oracle":
        a = opo_advantages(r, sq_norms[idx].reshape(-1), group_ids)
    else:
        raise ValueError(f"unknown method {method!r}")
    return a.double().reshape(draws, k)


def coefficients(advantages: Tensor, idx: Tensor, pool_size: int, divisor) -> Tensor:
    """[R, M] coefficient rows: advantages [R, K] / divisor (a number, or [R, 1]) placed at the
    drawn samples, zero elsewhere."""
    out = torch.zeros(idx.shape[0], pool_size, dtype=torch.float64)
    return out.scatter_(1, idx, advantages.double() / divisor)


def prompt_variances(gram: Tensor, rewards: Tensor, lengths: Tensor, idx: Tensor, batch_tokens: float, num_prompts: int) -> dict:
    """For one prompt's pool (gram [M, M], rewards and lengths [M]) and its drawn groups idx
    [R, K]: per method, its share of the batch variance with the fixed normaliser
    (`var`, c = A / batch_tokens) and with per-group normalisation (`var_group`,
    c = A / (num_prompts · group tokens)), the mean coefficients `mean` [M] (fixed
    normaliser) and the per-draw terms `per_draw` [R]."""
    pool = gram.shape[0]
    sq_norms = gram.diagonal()
    group_tokens = lengths.double()[idx].sum(1, keepdim=True)
    out = {}
    for method in METHODS:
        adv = draw_advantages(method, rewards, lengths, sq_norms, idx)
        var, mean, per_draw = variance_from_gram(coefficients(adv, idx, pool, batch_tokens), gram)
        var_group, _, _ = variance_from_gram(coefficients(adv, idx, pool, num_prompts * group_tokens), gram)
        out[method] = {"var": var, "var_group": var_group, "mean": mean, "per_draw": per_draw}
    return out


# ---- gradients -------------------------------------------------------------------------------


def sample_gradients(model, params: list[Tensor], batch, temperature: float) -> Tensor:
    """[B, D] float32: row i = ∇ Σ_t log π(y_i,t) over `params`, one sample per backward
    (each row trimmed of its padding)."""
    from rlcore.batch import micro_batches
    from rlcore.models import response_logprobs

    rows = batch.batch_size[0]
    out = torch.empty(rows, sum(p.numel() for p in params))
    for i, row in enumerate(micro_batches(batch, [1] * rows)):
        logp, _ = response_logprobs(model, row, temperature)
        grads = torch.autograd.grad((logp * row["response_mask"]).sum(), params)
        torch.cat([g.reshape(-1) for g in grads], out=out[i])
    return out


def gram_matrix(grads: Tensor) -> Tensor:
    """grads [B, D] → [B, B] inner products, accumulated in float64."""
    gram = torch.zeros(grads.shape[0], grads.shape[0], dtype=torch.float64)
    for start in range(0, grads.shape[1], GRAM_CHUNK):
        chunk = grads[:, start : start + GRAM_CHUNK].double()
        gram += chunk @ chunk.T
    return gram


def combine(coeffs: Tensor, grads: Tensor) -> Tensor:
    """coeffs [n, B], grads [B, D] → [n, D] float64: row k = Σ_i coeffs[k, i] grads[i]."""
    coeffs = coeffs.double()
    return torch.cat([coeffs @ grads[:, s : s + GRAM_CHUNK].double() for s in range(0, grads.shape[1], GRAM_CHUNK)], dim=1)


# ---- the run ---------------------------------------------------------------------------------


def generate_pool(cfg, num_prompts: int, samples: int, seed: int):
    """(trajectories with rewards, grouped per prompt, the engine (its model is the policy),
    reward metrics)."""
    from rlcore.data import load_splits
    from rlcore.models import resolve_model_path
    from rlcore.reward import RewardRunner
    from rlcore.rollout.engine import SamplingParams
    from rlcore.rollout.hf import HFRolloutEngine
    from rlcore.rollout.programs import PROGRAMS

    engine = HFRolloutEngine(resolve_model_path(cfg.model.path), cfg.model.dtype)
    train_set, _ = load_splits(cfg.data, engine.tokenizer)
    prompts = train_set[:num_prompts]
    sampling = SamplingParams(
        n=samples, max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, seed=seed
    )
    trajectories = PROGRAMS["single"](engine, prompts, sampling)
    with RewardRunner(cfg.reward) as rewards:
        metrics = rewards.score(trajectories)
    groups = [[t for t in trajectories if t.group_id == p] for p in range(len(prompts))]
    return groups, engine, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:arith-3m")
    parser.add_argument("--prompts", type=int, default=16, help="P: prompts in the pool")
    parser.add_argument("--samples", type=int, default=64, help="M: samples per prompt in the pool")
    parser.add_argument("--k", type=int, default=8, help="K: group size (samples per prompt in a batch)")
    parser.add_argument("--draws", type=int, default=4000, help="R: groups drawn per prompt")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of the pool and of the draws")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "opo_variance.json")
    args = parser.parse_args()
    if not 2 <= args.k <= args.samples:
        parser.error(f"--k={args.k} must be in [2, --samples={args.samples}]")

    from rlcore.batch import build_batch

    started = time.perf_counter()
    # Enough training rows for P prompts after held-out questions are removed.
    cfg = train_config(["recipe=opo_math", f"model.path={args.model}", f"data.train_size={2 * args.prompts + 50}"])
    groups, engine, reward_metrics = generate_pool(cfg, args.prompts, args.samples, args.seed)
    generated = time.perf_counter()
    model, temperature = engine.model, cfg.rollout.temperature
    params = [p for p in model.parameters() if p.requires_grad]
    lengths = [torch.tensor([float(len(t.response_ids)) for t in g]) for g in groups]
    rewards = [torch.tensor([t.reward for t in g]) for g in groups]
    batch_tokens = args.k * sum(float(l.mean()) for l in lengths)  # E[T] of a batch
    print(f"pool: {len(groups)} prompts × {args.samples} samples in {generated - started:.0f}s, "
          f"accuracy {reward_metrics['accuracy']:.3f}, {sum(p.numel() for p in params):,} parameters")

    generator = torch.Generator().manual_seed(args.seed)
    totals = {m: {"var": 0.0, "var_group": 0.0} for m in METHODS}
    mean_grads = None  # [methods, D]: Σ_p Σ_i c̄_p,i g_i
    draw_terms = {m: [] for m in METHODS}
    tokens_var, rows, norm_len = 0.0, [], []
    for p, group in enumerate(groups):
        batch = build_batch(group, engine.tokenizer.pad_token_id)
        grads = sample_gradients(model, params, batch, temperature)
        gram = gram_matrix(grads)
        idx = draw_groups(args.samples, args.k, args.draws, generator)
        stats = prompt_variances(gram, rewards[p], lengths[p], idx, batch_tokens, len(groups))
        for m, s in stats.items():
            totals[m]["var"] += s["var"]
            totals[m]["var_group"] += s["var_group"]
            draw_terms[m].append(s["per_draw"])
        vecs = combine(torch.stack([stats[m]["mean"] for m in METHODS]), grads)
        mean_grads = vecs if mean_grads is None else mean_grads + vecs
        del grads, vecs
        tokens_var += float(lengths[p][idx].sum(1).var())
        norm_len.append(torch.stack([gram.diagonal(), lengths[p].double()]))
        rows.append({
            "reward_mean": round(float(rewards[p].mean()), 3),
            "length_mean": round(float(lengths[p].mean()), 2),
            "length_std": round(float(lengths[p].std()), 2),
            **{f"var_{m}": float(f"{s['var']:.6g}") for m, s in stats.items()},
        })
        print(f"prompt {p + 1}/{len(groups)}: reward {rows[-1]['reward_mean']:.3f}, length "
              f"{rows[-1]['length_mean']:.1f}±{rows[-1]['length_std']:.1f}, "
              f"opo/grpo_mean {s_ratio(stats['opo']['var'], stats['grpo_mean']['var'])}", flush=True)
    seconds = time.perf_counter() - started

    # ‖E ĝ‖²: the accumulated mean vector's squared norm is biased up by Σ_p Var_p / R.
    mean_sq = {m: float(v @ v) - totals[m]["var"] / args.draws for m, v in zip(METHODS, mean_grads)}
    ref = mean_grads[METHODS.index("none")]
    cosine = {m: float(v @ ref / (v.norm() * ref.norm()).clamp(min=1e-300)) for m, v in zip(METHODS, mean_grads)}
    var = {m: totals[m]["var"] for m in METHODS}
    ratio = var["opo"] / var["grpo_mean"] if var["grpo_mean"] else float("nan")
    # Draw noise of the ratio (delta method on paired draws, prompts independent).
    z_var = sum(
        float((o / var["opo"] - g / var["grpo_mean"]).var()) for o, g in zip(draw_terms["opo"], draw_terms["grpo_mean"])
    ) if var["opo"] and var["grpo_mean"] else float("nan")
    ratio_se = ratio * math.sqrt(z_var / args.draws)
    norms_lengths = torch.cat(norm_len, dim=1)
    corr = float(torch.corrcoef(norms_lengths)[0, 1]) if norms_lengths[1].std() > 0 else None
    # Within-prompt: mean over prompts of the correlation of ‖g_i‖² with l_i (prompts whose lengths vary).
    within = [float(torch.corrcoef(x)[0, 1]) for x in norm_len if x[1].std() > 0 and x[0].std() > 0]
    compared = [r for r in rows if r["var_grpo_mean"] > 0]

    print(f"\n{'method':<10} {'variance':>12} {'/grpo_mean':>10} {'group-norm':>12} {'/grpo_mean':>10} "
          f"{'‖Eĝ‖²':>12} {'Var/‖Eĝ‖²':>10} {'cos(none)':>9}")
    for m in METHODS:
        print(f"{m:<10} {var[m]:>12.5g} {s_ratio(var[m], var['grpo_mean']):>10} {totals[m]['var_group']:>12.5g} "
              f"{s_ratio(totals[m]['var_group'], totals['grpo_mean']['var_group']):>10} {mean_sq[m]:>12.5g} "
              f"{s_ratio(var[m], mean_sq[m]):>10} {cosine[m]:>9.4f}")
    print(f"opo/grpo_mean = {ratio:.4f} ± {ratio_se:.4f} (draw noise); opo lower on "
          f"{sum(r['var_opo'] < r['var_grpo_mean'] for r in compared)}/{len(compared)} prompts with reward variance")

    def sig(x: float) -> float:
        return float(f"{x:.6g}")

    result = {
        "benchmark": "opo_variance",
        "model": args.model,
        "settings": {
            "prompts": len(groups), "samples_per_prompt": args.samples, "k": args.k, "draws": args.draws,
            "seed": args.seed, "temperature": temperature, "max_new_tokens": cfg.rollout.max_new_tokens,
            "prompt_split": "train", "normaliser": "fixed E[T] (see docstring)", "parameters": sum(p.numel() for p in params),
        },
        "pool": {
            "accuracy": round(reward_metrics["accuracy"], 4),
            "prompts_with_mixed_rewards": sum(0 < r["reward_mean"] < 1 for r in rows),
            "length_mean": round(float(torch.cat(lengths).mean()), 2),
            "length_std_within_prompt_mean": round(sum(r["length_std"] for r in rows) / len(rows), 3),
            "batch_tokens_expected": round(batch_tokens, 1),
            "T_cv": round(math.sqrt(tokens_var) / batch_tokens, 5),
            "corr_sqnorm_length": round(corr, 4) if corr is not None else None,
            "corr_sqnorm_length_within_prompt_mean": round(sum(within) / len(within), 4) if within else None,
        },
        "variance": {m: sig(var[m]) for m in METHODS},
        "variance_group_norm": {m: sig(totals[m]["var_group"]) for m in METHODS},
        "ratio_to_grpo_mean": {m: round(var[m] / var["grpo_mean"], 4) if var["grpo_mean"] else None for m in METHODS},
        "ratio_to_grpo_mean_group_norm": {
            m: round(totals[m]["var_group"] / totals["grpo_mean"]["var_group"], 4) if totals["grpo_mean"]["var_group"] else None
            for m in METHODS
        },
        "mean_grad_sq_norm": {m: sig(mean_sq[m]) for m in METHODS},
        "relative_variance": {m: sig(var[m] / mean_sq[m]) if mean_sq[m] > 0 else None for m in METHODS},
        "cosine_to_no_baseline_mean": {m: round(cosine[m], 5) for m in METHODS},
        "per_prompt": rows,
        "opo_lower_prompts": f"{sum(r['var_opo'] < r['var_grpo_mean'] for r in compared)}/{len(compared)}",
        "ratio": round(ratio, 4),
        "ratio_se": round(ratio_se, 4),
        "wall_time_s": round(seconds, 1),
        "generation_s": round(generated - started, 1),
        "machine": machine(),
    }
    write_result(result, args.out)


def s_ratio(a: float, b: float) -> str:
    return f"{a / b:.4f}" if b else "n/a"


if __name__ == "__main__":
    main()
