"""L1's length-controlled reward: does the response length follow the target the prompt states?

Real runs, each its own `rlcore` process, from one of two starts (--start):
  0. `rlcore sft recipe=sft_arith_l1` (ignore) — prompts that state a target of 32 or 60 tokens,
     answers that ignore it (a fixed sentence after the answer on 70% of them);
     `rlcore sft recipe=sft_arith_l1_tied` (tied) — the sentence on 60% of the 32-token prompts
     and 90% of the 60-token ones: a weak tie that greedy decoding does not show;
  1. `rlcore train recipe=l1_math` (or l1_math_tied) — OPO with reward = correctness − α·|target − length|.
  2. with --control: the same train run with correctness alone (reward.fns=[math]): what RL
     does to the lengths without L1's term.
From the train run's metrics.jsonl: held-out greedy length per stated target, mean miss
|length − target| and accuracy, before training and after, and the sampled training lengths per
target. `ratio` = mean greedy miss after / before (the claim: well below 1, lengths apart by
target, accuracy kept).

    .venv/bin/python bench/l1_length.py --start tied --control   # ~30 min on 2 quiet CPU cores
    .venv/bin/python bench/l1_length.py --start tied --seed 1   # the L1 run again, another seed
    .venv/bin/python bench/l1_length.py --reuse-runs   # only summarise the runs under runs/
"""

from __future__ import annotations

import argparse
from pathlib import Path
from statistics import mean

from common import ROOT, held_out_curve, machine, run_rlcore, sft_then_train, write_result

from rlcore.logging import read_metrics


STARTS = {"ignore": ("sft_arith_l1", "l1_math"), "tied": ("sft_arith_l1_tied", "l1_math_tied")}
WINDOW = 20  # training steps averaged per point of the sampled-length curve


def sampled_lengths(run_dir: Path) -> dict[str, dict]:
    """Mean sampled training length per stated target over the first and last WINDOW steps
    (response/length_mean/target_<n>: what the policy does, where greedy eval shows its majority)."""
    rows = [r for r in read_metrics(run_dir) if "response/target_error" in r]
    keys = sorted({k for r in rows for k in r if k.startswith("response/length_mean/") or k == "response/target_error"})
    window = {"first": rows[:WINDOW], "last": rows[-WINDOW:]}
    # A step's 8 prompts may all state one target: its row then has no mean for the other.
    return {name: {k: round(mean(r[k] for r in part if k in r), 2) for k in keys} for name, part in window.items()}


def train_result(run_dir: Path) -> dict:
    """A train run's held-out curve (before, after, every eval) and sampled lengths per target."""
    curve = held_out_curve(run_dir, "eval/target_error")
    return {"before": curve[min(curve)], "after": curve[max(curve)], "curve": curve, "sampled_lengths": sampled_lengths(run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse-runs", action="store_true", help="summarise existing runs instead of running them")
    parser.add_argument("--start", choices=sorted(STARTS), default="ignore", help="the SFT start (see above)")
    parser.add_argument("--control", action="store_true", help="also train the start with correctness alone")
    parser.add_argument("--seed", type=int, default=0, help="trainer.seed of the train runs (the SFT start does not change)")
    parser.add_argument("--out", type=Path, help="default: bench/results/l1_length[_<start>][_seed<n>].json ('ignore', seed 0: no suffix)")
    args = parser.parse_args()

    sft_recipe, train_recipe = STARTS[args.start]
    seed_name, seed_args = (f"{train_recipe}_seed{args.seed}", (f"trainer.seed={args.seed}",)) if args.seed else (None, ())
    run = seed_name or train_recipe
    runs = sft_then_train(sft_recipe, train_recipe, args.reuse_runs, seed_name, seed_args)
    trained = train_result(ROOT / "runs" / run)
    before, after = trained["before"], trained["after"]
    result = {"bench": "l1_length", "start": args.start, "seed": args.seed, "machine": machine(), **runs, **trained}
    if args.control:
        control = [f"recipe={train_recipe}", f"name={run}_correctness", *seed_args, "reward.fns=[math]", "~reward.options.l1_length"]
        if not args.reuse_runs:
            run_rlcore(["train", *control])
        result["correctness_only"] = {"run": "rlcore train " + " ".join(control), **train_result(ROOT / f"runs/{run}_correctness")}
    result["ratio"] = after["eval/target_error"] / before["eval/target_error"]
    print(f"held-out mean |length − target|: {before['eval/target_error']:.1f} → {after['eval/target_error']:.1f} "
          f"(ratio {result['ratio']:.2f}); accuracy {before['eval/accuracy']:.1%} → {after['eval/accuracy']:.1%}")
    if args.control:
        alone = result["correctness_only"]["after"]
        print(f"correctness alone: {before['eval/target_error']:.1f} → {alone['eval/target_error']:.1f}; "
              f"accuracy → {alone['eval/accuracy']:.1%}")
    suffix = ("" if args.start == "ignore" else f"_{args.start}") + (f"_seed{args.seed}" if args.seed else "")
    write_result(result, args.out or ROOT / f"bench/results/l1_length{suffix}.json")


if __name__ == "__main__":
    main()
