"""Held-out accuracy with sparse rollouts vs dense: what block-sparse decoding costs in answers.

What is measured
    A rollout engine — transformers (rlcore.rollout.hf) or, with --backend vllm, vLLM's CPU
    build (rlcore.sparse.vllm_cpu: ReSA without rectification) — decodes the task's held-out
    prompts greedily (as `rlcore eval` does), once densely and once per sparse setting given, in
    this process; the task's reward scores the answers. Also reported per setting: the share of
    (row, KV head, key) triples the sparse decode steps attended to (density), the wall
    time, and what a trainer would log as rollout/logp_mismatch_mean and
    rollout/gen_kl_error: the engine's log-probs of its own tokens against a dense scoring
    of the same sequences (the learner's numbers).

Output
    A table, and bench/results/sparse_accuracy_<model>.json whose one-line form is the last
    line printed; `ratio` = accuracy of the first sparse setting / dense accuracy, and
    `points` = their difference ×100 (goal: within 2 points).

    python bench/sparse_accuracy.py                                  # ReSA on arith-3m
    python bench/sparse_accuracy.py --setting method=resa,block_size=4,keep_ratio=0.5,min_blocks=2
    python bench/sparse_accuracy.py --backend vllm --setting method=resa,block_size=4,keep_ratio=0.7,min_blocks=4,rectify_every=0
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import machine, train_config, write_result

HERE = Path(__file__).resolve().parent
DEFAULT_SETTING = "method=resa,block_size=4,keep_ratio=0.7,min_blocks=4,rectify_every=8"


def parse_setting(text: str):
    from omegaconf import OmegaConf

    from rlcore.config import SparseConfig

    values = dict(kv.split("=", 1) for kv in text.split(","))
    return OmegaConf.merge(OmegaConf.structured(SparseConfig), OmegaConf.from_dotlist([f"{k}={v}" for k, v in values.items()]))


def accuracy(cfg, sparse, eval_set, rewards) -> dict:
    from rlcore.batch import Trajectory, build_batch
    from rlcore.config import SparseConfig, longest_request
    from rlcore.models import resolve_model_path
    from rlcore.rollout.engine import SamplingParams
    from rlcore.rollout.worker import make_engine
    from rlcore.trainer import response_metrics

    rollout = cfg.rollout.copy()
    rollout.sparse = sparse if sparse is not None else SparseConfig()
    engine = make_engine(rollout, resolve_model_path(cfg.model.path), cfg.model.dtype, longest_request(cfg), colocated=False)
    greedy = SamplingParams(n=1, max_new_tokens=cfg.rollout.eval_max_new_tokens, temperature=0.0)
    started = time.perf_counter()
    groups = engine.generate([p.token_ids for p in eval_set], greedy)
    seconds = time.perf_counter() - started
    trajectories = [
        Trajectory(p, c.token_ids, c.logprobs, engine.decode(c.token_ids), c.finish_reason, group_id=i)
        for i, (p, (c,)) in enumerate(zip(eval_set, groups))
    ]
    batch = build_batch(trajectories, engine.tokenizer.pad_token_id)
    batch["old_logp"] = engine.score(batch, 1.0)  # always dense
    mismatch = response_metrics(batch, trajectories)
    return {
        "accuracy": rewards.score(trajectories)["accuracy"],
        "density": engine.sparse.density if engine.sparse else 1.0,
        "logp_mismatch_mean": round(mismatch["rollout/logp_mismatch_mean"], 5),
        "gen_kl_error": round(mismatch["rollout/gen_kl_error"], 5),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:arith-3m")
    parser.add_argument("--setting", action="append", help=f"rollout.sparse keys, comma-separated (default {DEFAULT_SETTING})")
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--eval-size", type=int, default=250)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from rlcore.data import load_splits
    from rlcore.models import load_tokenizer
    from rlcore.reward import RewardRunner

    cfg = train_config(["recipe=opo_math", f"model.path={args.model}", f"data.eval_size={args.eval_size}", f"rollout={args.backend}"])
    _, eval_set = load_splits(cfg.data, load_tokenizer(cfg.model.path))
    settings = args.setting or [DEFAULT_SETTING]
    rows = {}
    with RewardRunner(cfg.reward) as rewards:
        rows["dense"] = accuracy(cfg, None, eval_set, rewards)
        for text in settings:
            rows[text] = accuracy(cfg, parse_setting(text), eval_set, rewards)
    print(f"{'setting':<52} {'accuracy':>8} {'density':>8} {'mismatch':>8} {'kl':>8} {'s':>6}")
    for name, r in rows.items():
        print(f"{name:<52} {r['accuracy']:>8.3f} {r['density']:>8.3f} {r['logp_mismatch_mean']:>8.4f} "
              f"{r['gen_kl_error']:>8.4f} {r['seconds']:>6}")
    dense, first = rows["dense"]["accuracy"], rows[settings[0]]["accuracy"]
    result = {
        "benchmark": "sparse_accuracy",
        "model": args.model,
        "backend": args.backend,
        "eval_prompts": len(eval_set),
        "settings": rows,
        "points": round(100 * (first - dense), 1),
        "ratio": round(first / dense, 3) if dense else None,
        "machine": machine(),
    }
    slug = args.model.split(":")[-1].replace("/", "_") + ("_vllm" if args.backend == "vllm" else "")
    write_result(result, args.out or HERE / "results" / f"sparse_accuracy_{slug}.json")


if __name__ == "__main__":
    main()
