"""RSPO against GRPO on a mixture-of-experts model, from the same start, off-policy.

Real runs, each its own `rlcore train` process, all `recipe=rspo_math` (model=arith_moe:
the embedded arith-3m upcycled to 8 experts, 2 per token; 4 optimizer steps per rollout batch,
so the router moves between the rollout and the later steps):
  1. RSPO: router-shift γ on the ratio, token-clipped geometric-mean sequence objective;
  2. GRPO + router shift: γ on GRPO's token-level PPO ratio (the plug-in form, SPEC §4);
  3. GRPO: neither;
  4. dense (only with --runs): GRPO on the dense arith-3m the MoE was upcycled from, same settings.
`--runs` picks some of them (default: the first three).
From each run: held-out greedy accuracy before/after and its curve, mean clip fraction and
importance-ratio deviation, mean and lowest router-shift γ (runs 1–2), the share of tokens
at the γ floor, and wall time. `ratio` = RSPO's held-out accuracy after / GRPO's.

    .venv/bin/python bench/rspo_moe.py                 # ~35 min on 2 quiet CPU cores
    .venv/bin/python bench/rspo_moe.py --name rspo_moe_lr5e-5 learner.lr=5e-5   # a harsher off-policy setting
"""

from __future__ import annotations

import argparse
import json
import time

from common import ROOT, held_out_curve, machine, run_rlcore, train_config, write_result

from rlcore.logging import read_metrics

RUNS = {  # name suffix → its overrides of recipe=rspo_math
    "rspo": [],
    "grpo_router_shift": ["algorithm=grpo", "algorithm.router_shift=true"],
    "grpo": ["algorithm=grpo"],
    "dense": ["algorithm=grpo", "model=arith_3m"],
}
DEFAULT_RUNS = ["rspo", "grpo_router_shift", "grpo"]


def mean_of(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values) if values else None


def run_result(name: str) -> dict:
    run_dir = ROOT / "runs" / name
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [r for r in read_metrics(run_dir) if "time/step" in r]
    gammas = [r["router_shift_gamma"] for r in steps if "router_shift_gamma" in r]
    return {
        "accuracy_before": summary["eval/accuracy_before"],
        "accuracy_after": summary["eval/accuracy_after"],
        "held_out_curve": {step: row["eval/accuracy"] for step, row in held_out_curve(run_dir).items()},
        "clip_frac_mean": mean_of(steps, "clip_frac"),
        "ratio_max_dev_mean": mean_of(steps, "ratio_max_dev"),
        "router_shift_gamma_mean": sum(gammas) / len(gammas) if gammas else None,
        "router_shift_gamma_lowest_step": min(gammas) if gammas else None,
        "router_shift_floored_frac_mean": mean_of(steps, "router_shift_floored_frac"),
        "train_accuracy_last_20_steps": mean_of(steps[-20:], "accuracy"),
        "wall_time_s": summary["wall_time_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="rspo_moe", help="run names <name>_<algorithm>; bench/results/<name>.json")
    parser.add_argument("--reuse-runs", action="store_true", help="summarise runs/<name>_* as they are")
    parser.add_argument("--runs", type=lambda text: text.split(","), default=DEFAULT_RUNS,
                        help=f"which runs to make, comma-separated, of: {', '.join(RUNS)}")
    parser.add_argument("overrides", nargs="*", help="more overrides for every run (e.g. learner.lr=3e-4)")
    args = parser.parse_args()
    if unknown := set(args.runs) - set(RUNS):
        parser.error(f"--runs: no run named {', '.join(sorted(unknown))}; choose from {', '.join(RUNS)}")

    started = time.time()
    commands = {}
    for suffix in args.runs:
        commands[suffix] = ["train", "recipe=rspo_math", f"name={args.name}_{suffix}", "trainer.eval_every=50", *RUNS[suffix],
                            *args.overrides]
        if not args.reuse_runs:
            run_rlcore(commands[suffix])
    results = {suffix: run_result(f"{args.name}_{suffix}") for suffix in args.runs}
    result = {
        "bench": "rspo_moe",
        "machine": machine(),
        "runs": {suffix: "rlcore " + " ".join(command) for suffix, command in commands.items()},
        "learner_lr": train_config(["recipe=rspo_math", *args.overrides]).learner.lr,
        **results,
        "ratio": results["rspo"]["accuracy_after"] / max(results["grpo"]["accuracy_after"], 1e-9)
        if {"rspo", "grpo"} <= results.keys() else None,
        "wall_time_s": round(time.time() - started, 1),
    }
    for suffix, r in results.items():
        gamma = "" if r["router_shift_gamma_mean"] is None else f", mean γ {r['router_shift_gamma_mean']:.4f}"
        print(f"{suffix:>18}: held-out {r['accuracy_before']:.1%} → {r['accuracy_after']:.1%}, "
              f"clip frac {r['clip_frac_mean']:.4f}{gamma}")
    write_result(result, ROOT / f"bench/results/{args.name}.json")


if __name__ == "__main__":
    main()
