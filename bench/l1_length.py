"""L1's length-controlled reward: does the response length follow the target the prompt states?

Real runs, each its own `rlcore` process:
  0. `rlcore sft recipe=sft_arith_l1` — prompts that state a target of 32 or 60 tokens, answers
     that ignore it (a fixed sentence after the answer on 70% of them);
  1. `rlcore train recipe=l1_math` — OPO with reward = correctness − α·|target − length|.
From the train run's metrics.jsonl: held-out greedy length per stated target, mean miss
|length − target| and accuracy, before training and after. `ratio` = mean miss after / before
(the claim: well below 1, lengths apart by target, accuracy kept).

    .venv/bin/python bench/l1_length.py                # ~15 min on 2 quiet CPU cores
    .venv/bin/python bench/l1_length.py --reuse-runs   # only summarise runs/sft_arith_l1, runs/l1_math
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import ROOT, held_out_curve, machine, sft_then_train, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse-runs", action="store_true", help="summarise existing runs instead of running them")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/l1_length.json")
    args = parser.parse_args()

    runs = sft_then_train("sft_arith_l1", "l1_math", args.reuse_runs)
    curve = held_out_curve(ROOT / "runs/l1_math", "eval/target_error")
    before, after = curve[min(curve)], curve[max(curve)]
    result = {
        "bench": "l1_length",
        "machine": machine(),
        **runs,
        "before": before,
        "after": after,
        "curve": curve,
        "ratio": after["eval/target_error"] / before["eval/target_error"],
    }
    print(f"held-out mean |length − target|: {before['eval/target_error']:.1f} → {after['eval/target_error']:.1f} "
          f"(ratio {result['ratio']:.2f}); accuracy {before['eval/accuracy']:.1%} → {after['eval/accuracy']:.1%}")
    write_result(result, args.out)


if __name__ == "__main__":
    main()
