"""Short-RL's length-aware reward against correctness only, from the same verbose start.

Three real runs, each its own `rlcore` process:
  0. `rlcore sft recipe=sft_arith_<start>` — the verbose start (skipped when its model exists);
  1. `rlcore train recipe=opo_math_short` from it — OPO, reward = correctness + Short-RL length term;
  2. `rlcore train recipe=opo_math` from it, with opo_math_short's response lengths — OPO on
     correctness alone.
Starts (rlcore/arith.py): `afterword` — a fixed sentence after the answer on 70% of the
questions, harmless to accuracy; `verbose` — a re-check of the working on 70%, which costs
accuracy under sampling.
From each run's summary.json and metrics.jsonl: held-out greedy accuracy and mean response
length before and after, the mean training response length over the last steps, and how
often the accuracy gate was open. `ratio` = held-out response length after training,
length reward / correctness only (goal ≤ 0.75, accuracy within 2 points).

    .venv/bin/python bench/length_rewards.py --start afterword   # ~25 min on 2 quiet CPU cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import ROOT, machine, run_rlcore, train_config, write_result

from rlcore.logging import read_metrics



def run_summary(run_dir: Path, last_steps: int) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "response/length_mean" in r][-last_steps:]
    gate = [r["reward/gate_open"] for r in rows if "reward/gate_open" in r]
    return {
        "accuracy_before": summary["eval/accuracy_before"],
        "accuracy_after": summary["eval/accuracy_after"],
        "length_before": next(r["eval/length_mean"] for r in rows if "eval/length_mean" in r),
        "length_after": summary["eval/length_after"],
        f"train_length_last_{last_steps}_steps": sum(r["response/length_mean"] for r in train_rows) / len(train_rows),
        "gate_open_share": sum(gate) / len(gate) if gate else None,
        "wall_time_s": summary["wall_time_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="RL steps of each run (the recipes say 200)")
    parser.add_argument("--last-steps", type=int, default=20, help="training steps the length average covers")
    parser.add_argument("--start", choices=["afterword", "verbose"], default="afterword",
                        help="the verbose start: recipe sft_arith_<start>")
    parser.add_argument("--out", type=Path, help="default: bench/results/length_rewards_<start>.json")
    args = parser.parse_args()

    sft_name = f"sft_arith_{args.start}"
    start = Path(f"runs/{sft_name}/final")
    if not (ROOT / start).is_dir():
        run_rlcore(["sft", f"recipe={sft_name}"])
    short = train_config(["recipe=opo_math_short"])
    started = time.time()
    same_start = [f"model.path={start}", f"rollout.max_new_tokens={short.rollout.max_new_tokens}",
                  f"rollout.eval_max_new_tokens={short.rollout.eval_max_new_tokens}", f"trainer.steps={args.steps}"]
    runs = {"short": f"opo_math_short_{args.start}", "correctness": f"opo_math_{args.start}"}
    run_rlcore(["train", "recipe=opo_math_short", f"name={runs['short']}", *same_start])
    run_rlcore(["train", "recipe=opo_math", f"name={runs['correctness']}", *same_start])
    length_reward = run_summary(ROOT / "runs" / runs["short"], args.last_steps)
    correctness_only = run_summary(ROOT / "runs" / runs["correctness"], args.last_steps)
    result = {
        "bench": "length_rewards",
        "machine": machine(),
        "start_model": str(start),
        "steps": args.steps,
        "opo_math_short": length_reward,
        "opo_math_same_start": correctness_only,
        "accuracy_after_difference": length_reward["accuracy_after"] - correctness_only["accuracy_after"],
        "ratio": length_reward["length_after"] / correctness_only["length_after"],
        "wall_time_s": round(time.time() - started, 1),
    }
    print(f"held-out length after: {length_reward['length_after']:.1f} (length reward) vs "
          f"{correctness_only['length_after']:.1f} (correctness only): ratio {result['ratio']:.2f}; accuracy "
          f"{length_reward['accuracy_after']:.1%} vs {correctness_only['accuracy_after']:.1%}")
    write_result(result, args.out or ROOT / f"bench/results/length_rewards_{args.start}.json")


if __name__ == "__main__":
    main()
