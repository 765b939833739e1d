"""RPT next-token reasoning (SPEC §5): held-out next-token accuracy before and after RL, per entropy bucket.

Real runs, each its own process:
  0. `python -m rlcore.rpt` — positions cut from the Python Language Reference, bucketed by
     SmolLM2-135M's top-16 entropy, with its three likeliest next tokens per row;
  1. `rlcore sft recipe=sft_rpt` — the format cold start (`<think>…the text's last words a</think> \\boxed{a}`,
     a the model's own likeliest next token, never the true one);
  2. `rlcore train recipe=rpt_nexttoken` — GRPO on the prefix-match reward.
From the train run's metrics.jsonl: held-out accuracy (greedy, 150 positions from topics training
never sees) at step 0 (= after the cold start) and at the end. For reference, from the data file:
how often the proxy's likeliest token is right (plain next-token prediction, no reasoning) and
how often one of its three candidates is (what choosing among them could reach).
`ratio` = accuracy after / before.

    .venv/bin/python bench/rpt_nexttoken.py                # ~60 min on 2 quiet CPU cores
    .venv/bin/python bench/rpt_nexttoken.py --reuse-runs   # only summarise data/rpt, runs/sft_rpt, runs/rpt_nexttoken
    # RL from the cold start's step-50 checkpoint (less sure of itself) → bench/results/rpt_nexttoken_sft50.json
    .venv/bin/python bench/rpt_nexttoken.py --name rpt_nexttoken_sft50 model.path=runs/sft_rpt/checkpoints/step_50/model
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from statistics import mean

from common import ROOT, held_out_curve, machine, sft_then_train, write_result

from rlcore.logging import read_metrics
from rlcore.metrics import means_by_label
from rlcore.rewards.rpt import prefix_match


def proxy_reference(rows: list[dict]) -> dict[str, float]:
    """Accuracy of the proxy's likeliest token, and of the best of its candidates, overall and per bucket."""
    def right(row, guess):
        return float(prefix_match(guess, row["metadata"]["continuation"], row["metadata"]["boundaries"]))

    buckets = [r["metadata"]["bucket"] for r in rows]
    top1 = [right(r, r["metadata"]["proxy_top"][0]) for r in rows]
    any_top = [max(right(r, guess) for guess in r["metadata"]["proxy_top"]) for r in rows]
    return means_by_label("proxy/top1", top1, buckets) | means_by_label("proxy/any_candidate", any_top, buckets)


def training_signal(metrics: list[dict]) -> dict[str, float]:
    """How much RL had to learn from, over the training steps: the policy's mean token entropy on
    its samples, the mean share of groups whose samples were not all equally rewarded, and the
    share of steps whose gradient was exactly 0 (no such group: GRPO's advantages all 0)."""
    steps = [m for m in metrics if "grad_norm" in m]
    return {"entropy_mean": mean(m["entropy"] for m in steps),
            "informative_groups": mean(m["sampling/informative_frac"] for m in steps),
            "steps_without_gradient": mean(m["grad_norm"] == 0 for m in steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse-runs", action="store_true", help="summarise existing data and runs instead of making them")
    parser.add_argument("--name", default="rpt_nexttoken", help="the train run's name (runs/<name>)")
    parser.add_argument("--out", type=Path, help="default: bench/results/<name>.json")
    parser.add_argument("overrides", nargs="*",
                        help="extra `rlcore train` overrides, e.g. model.path=runs/sft_rpt/checkpoints/step_50/model")
    args = parser.parse_args()

    if not args.reuse_runs:
        print("$ python -m rlcore.rpt", flush=True)
        subprocess.run([sys.executable, "-m", "rlcore.rpt"], cwd=ROOT, check=True)
    runs = sft_then_train("sft_rpt", "rpt_nexttoken", args.reuse_runs, args.name, tuple(args.overrides))
    train_dir = ROOT / "runs" / args.name
    curve = held_out_curve(train_dir)
    before, after = curve[min(curve)], curve[max(curve)]
    eval_rows = [json.loads(line) for line in (ROOT / "data/rpt/eval.jsonl").read_text().splitlines()]
    result = {
        "bench": "rpt_nexttoken",
        "machine": machine(),
        **runs,
        "runs": ["python -m rlcore.rpt", *runs["runs"]],
        "sft_curve": held_out_curve(ROOT / "runs/sft_rpt"),
        "held_out_positions": len(eval_rows),
        "proxy_reference": proxy_reference(eval_rows),
        "before": before,
        "after": after,
        "curve": curve,
        "training_signal": training_signal(read_metrics(train_dir)),
        "ratio": after["eval/accuracy"] / before["eval/accuracy"],
    }
    for bucket in ("easy", "medium", "hard"):
        key = f"eval/accuracy/{bucket}"
        print(f"{bucket:>6}: {before[key]:.1%} → {after[key]:.1%}  (proxy top-1 {result['proxy_reference'][f'proxy/top1/{bucket}']:.1%})")
    print("training signal: " + ", ".join(f"{k} {v:.3f}" for k, v in result["training_signal"].items()))
    print(f"held-out next-token accuracy {before['eval/accuracy']:.1%} → {after['eval/accuracy']:.1%} (ratio {result['ratio']:.2f})")
    write_result(result, args.out or ROOT / "bench/results" / f"{args.name}.json")


if __name__ == "__main__":
    main()
