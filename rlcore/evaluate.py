"""`rlcore eval`: greedy held-out accuracy of any model on a task."""

from __future__ import annotations

import json
from pathlib import Path

from rlcore.cluster import ray_session, thread_counts
from rlcore.config import validate_common
from rlcore.data import load_splits
from rlcore.models import load_tokenizer
from rlcore.reward import RewardRunner
from rlcore.rollout.worker import RolloutGroup
from rlcore.trainer import evaluate


def eval_command(cfg) -> dict:
    validate_common(cfg)
    tokenizer = load_tokenizer(cfg.model.path)
    _, eval_set = load_splits(cfg.data, tokenizer)
    with RewardRunner(cfg.reward) as rewards, ray_session(cfg.cluster):
        threads, _ = thread_counts(cfg.cluster, 1)
        rollout = RolloutGroup(cfg.model.path, cfg.model.dtype, cfg.rollout, cfg.cluster, threads)
        result = {"model": cfg.model.path, "prompts": len(eval_set), **evaluate(rollout, rewards, eval_set, cfg.rollout)}
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.run_dir) / "eval.json").write_text(json.dumps(result, indent=2))
    return result
