"""RPT next-token reasoning (SPEC §5): held-out next-token accuracy before and after RL, per entropy bucket.

Real runs, each its own process:
  0. `python -m rlcore.rpt` — positions cut from the Python Language Reference, bucketed by
     SmolLM2-135M's top-16 entropy, with its three likeliest next tokens per row;
  1. `rlcore sft recipe=sft_rpt` — the format cold start (`<think>…the text's last words a</think> \\boxed{a}`,
     a the model's own likeliest next token, never the true one);
  2. `rlcore train recipe=rpt_nexttoken` — GRPO on the prefix-match reward.
From the train run's metrics.jsonl: held-out accuracy (greedy, 150 positions from topics training
never sees) at step 0 (= after the cold start) and at the end. Then `rlcore eval` of the RL start and
result on RL's own 300 training positions: what the policy knows there beside what it can do on new
text (a cold start trained on those positions knew their answers by heart: its training reward said
nothing about held-out accuracy; the cold start now has its own positions, data/rpt/sft.jsonl).
For reference, from the data file:
how often the proxy's likeliest token is right (plain next-token prediction, no reasoning) and
how often one of its three candidates is (what choosing among them could reach).
`ratio` = accuracy after / before.

    .venv/bin/python bench/rpt_nexttoken.py                # ~65 min on 2 quiet CPU cores
    .venv/bin/python bench/rpt_nexttoken.py --reuse-runs   # summarise data/rpt, runs/sft_rpt, runs/rpt_nexttoken
    # RL with other train overrides, its own run and result → bench/results/rpt_nexttoken_lr3e-5.json
    .venv/bin/python bench/rpt_nexttoken.py --name rpt_nexttoken_lr3e-5 learner.lr=3e-5

bench/results/rpt_nexttoken_v1.json and rpt_nexttoken_sft50.json come from the earlier cold start,
trained on RL's own positions (recipes/sft_rpt.yaml before it had data/rpt/sft.jsonl).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from statistics import mean

from common import ROOT, held_out_curve, machine, run_rlcore, sft_then_train, train_config, write_result

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
    its samples, the mean share of groups whose samples were not all equally rewarded, the share
    of steps whose gradient was exactly 0 (no such group: GRPO's advantages all 0), and the mean
    training reward over the first and the last quarter of the steps. (Runs from before
    sampling/informative_frac was logged have no informative_groups.)"""
    steps = [m for m in metrics if "grad_norm" in m]
    quarter = max(1, len(steps) // 4)
    informative = [m["sampling/informative_frac"] for m in steps if "sampling/informative_frac" in m]
    return {"entropy_mean": mean(m["entropy"] for m in steps),
            **({"informative_groups": mean(informative)} if informative else {}),
            "steps_without_gradient": mean(m["grad_norm"] == 0 for m in steps),
            "reward_first_quarter": mean(m["reward/mean"] for m in steps[:quarter]),
            "reward_last_quarter": mean(m["reward/mean"] for m in steps[-quarter:])}


def on_training_positions(models: dict[str, str], reuse_runs: bool) -> dict[str, float]:
    """label → greedy accuracy of that model on RL's training positions (`rlcore eval` on
    data/rpt/train.jsonl, run as runs/<label>_on_training_positions; with reuse_runs, only where
    that run is missing)."""
    out = {}
    for label, model in models.items():
        name = f"{label}_on_training_positions"
        result = ROOT / "runs" / name / "eval.json"
        if not reuse_runs or not result.exists():
            run_rlcore(["eval", "model=smollm2_135m", f"model.path={model}", "data=rpt", "reward=rpt",
                        "data.eval_path=data/rpt/train.jsonl", f"name={name}"])
        out[label] = json.loads(result.read_text())["eval/accuracy"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse-runs", action="store_true", help="summarise existing data and runs instead of making them")
    parser.add_argument("--name", default="rpt_nexttoken", help="the train run's name (runs/<name>)")
    parser.add_argument("--sft-name", default="sft_rpt", help="the cold start run's name (runs/<name>)")
    parser.add_argument("--out", type=Path, help="default: bench/results/<name>.json")
    parser.add_argument("overrides", nargs="*",
                        help="extra `rlcore train` overrides, e.g. model.path=runs/sft_rpt/checkpoints/step_50/model")
    args = parser.parse_args()

    if not args.reuse_runs:
        print("$ python -m rlcore.rpt", flush=True)
        subprocess.run([sys.executable, "-m", "rlcore.rpt"], cwd=ROOT, check=True)
    runs = sft_then_train("sft_rpt", "rpt_nexttoken", args.reuse_runs, args.name, tuple(args.overrides), args.sft_name)
    train_dir = ROOT / "runs" / args.name
    curve = held_out_curve(train_dir)
    before, after = curve[min(curve)], curve[max(curve)]
    start = train_config(["recipe=rpt_nexttoken", *args.overrides]).model.path
    # the run directory's final/, not the summary's absolute final_model: a run directory may have been renamed since
    training_positions = on_training_positions({f"{args.name}_start": start, args.name: str(train_dir / "final")},
                                               args.reuse_runs)
    eval_rows = [json.loads(line) for line in (ROOT / "data/rpt/eval.jsonl").read_text().splitlines()]
    result = {
        "bench": "rpt_nexttoken",
        "machine": machine(),
        **runs,
        "runs": ["python -m rlcore.rpt", *runs["runs"]],
        "sft_curve": held_out_curve(ROOT / "runs" / args.sft_name),
        "held_out_positions": len(eval_rows),
        "proxy_reference": proxy_reference(eval_rows),
        "before": before,
        "after": after,
        "curve": curve,
        "training_signal": training_signal(read_metrics(train_dir)),
        "on_training_positions": {"before": training_positions[f"{args.name}_start"], "after": training_positions[args.name]},
        "ratio": after["eval/accuracy"] / before["eval/accuracy"],
    }
    for bucket in ("easy", "medium", "hard"):
        key = f"eval/accuracy/{bucket}"
        print(f"{bucket:>6}: {before[key]:.1%} → {after[key]:.1%}  (proxy top-1 {result['proxy_reference'][f'proxy/top1/{bucket}']:.1%})")
    print("training signal: " + ", ".join(f"{k} {v:.3f}" for k, v in result["training_signal"].items()))
    print("on RL's training positions: {before:.1%} → {after:.1%}".format(**result["on_training_positions"]))
    print(f"held-out next-token accuracy {before['eval/accuracy']:.1%} → {after['eval/accuracy']:.1%} (ratio {result['ratio']:.2f})")
    write_result(result, args.out or ROOT / "bench/results" / f"{args.name}.json")


if __name__ == "__main__":
    main()
