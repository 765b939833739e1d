"""`rlcore eval`: greedy held-out accuracy of any model on a task; with hybrid.enabled=true also
the hybrid-thinking metrics (mode choice per difficulty, Hybrid Accuracy: rlcore.hybrid_eval)."""

from __future__ import annotations

import json
from pathlib import Path

from rlcore.cluster import ray_session
from rlcore.config import validate_common, validate_hybrid_eval
from rlcore.data import load_splits
from rlcore.hybrid import mode_tag_ids
from rlcore.hybrid_eval import hybrid_evaluate
from rlcore.models import load_tokenizer, resolve_model_path
from rlcore.reward import RewardRunner
from rlcore.rollout.programs import check_program
from rlcore.trainer import greedy_metrics, greedy_responses, start_actors


def eval_command(cfg) -> dict:
    validate_common(cfg)
    validate_hybrid_eval(cfg)
    model_path = resolve_model_path(cfg.model.path)  # zoo models are built here, once, not in each actor
    tokenizer = load_tokenizer(model_path)
    check_program(cfg.rollout.eval_program, tokenizer)
    tag_ids = mode_tag_ids(tokenizer) if cfg.hybrid.enabled else None
    _, eval_set = load_splits(cfg.data, tokenizer)
    with RewardRunner(cfg.reward) as rewards, ray_session(cfg.cluster):
        rollout, _ = start_actors(cfg, model_path)
        result = {"model": cfg.model.path, "prompts": len(eval_set), **held_out_metrics(rollout, rewards, eval_set, cfg, tag_ids)}
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.run_dir) / "eval.json").write_text(json.dumps(result, indent=2))
    return result


def held_out_metrics(rollout, rewards, prompts, cfg, tag_ids: dict[int, int] | None) -> dict:
    """eval/accuracy and eval/length_mean (rlcore.trainer.greedy_metrics) and, with hybrid.enabled,
    rlcore.hybrid_eval's metrics. The free greedy pass is generated once: with hybrid.mode=free the
    hybrid metrics are computed from the same responses.

    eval/accuracy always describes the free greedy pass (rollout.eval_program, `single` by default), whatever hybrid.mode
    is: it stays comparable with training's eval/accuracy_before/after and across modes. With
    hybrid.mode=think or no_think the forced greedy pass is a second, different pass, reported
    only under eval/hybrid/* (the README's HGPO table takes its forced-think accuracy and length
    from eval/hybrid/accuracy and eval/hybrid/length_mean, bench/results/hgpo_hybrid_eval.json)."""
    free = greedy_responses(rollout, rewards, prompts, cfg.rollout)
    metrics = greedy_metrics(free)
    if cfg.hybrid.enabled:
        if cfg.hybrid.mode == "free":
            greedy = free
        else:
            greedy = greedy_responses(rollout, rewards, prompts, cfg.rollout, program=cfg.hybrid.mode)
        metrics |= hybrid_evaluate(rollout, rewards, prompts, greedy, cfg.rollout, cfg.hybrid, tag_ids)
    return metrics
