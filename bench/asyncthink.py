"""AsyncThink on 2–4-term addition: the format cold start, then RL (SPEC §6).

Real runs, each its own `rlcore` process:
  0. `rlcore sft recipe=sft_asyncthink` — the format cold start (skipped when its model exists);
  1. `rlcore train recipe=asyncthink_math [overrides]` — AsyncThink RL from it, held-out
     greedy evaluation (the fork_join program: the workers really run) every 25 steps.
From the held-out curve, per number of terms: accuracy, critical-path length, total decoding
steps (organizer + workers), concurrency, workers per question, format errors. `ratio` =
critical path / total decoding steps of the trained model on the 4-term questions: the share
of the same traces' work that concurrency leaves on the critical path (1 = sequential). Beside
it, the length of sequential thinking on those questions as the embedded model was taught it
(rlcore.arith's column working of all four terms, + EOS), counted in tokens, not generated.

    .venv/bin/python bench/asyncthink.py      # ~30 min on 2 quiet CPU cores (~6 more with the SFT)
"""

from __future__ import annotations

import argparse
import time
from statistics import mean

from common import ROOT, held_out_curve, machine, run_rlcore, run_summary, train_config, write_result

START = ROOT / "runs/sft_asyncthink/final"
KEYS = ("accuracy", "critical_path", "total_steps", "concurrency", "workers")


def by_terms(metrics: dict) -> dict:
    """{num_terms_N: {key: value}} from one held-out row's eval/<key>/num_terms_N metrics."""
    out: dict[str, dict] = {}
    for name, value in metrics.items():
        parts = name.split("/")
        if len(parts) == 3 and parts[1] in KEYS and parts[2].startswith("num_terms_"):
            out.setdefault(parts[2], {})[parts[1]] = value
    return dict(sorted(out.items()))


def sequential_working_tokens(overrides: list[str]) -> float:
    """Mean tokens of rlcore.arith's column working (+ EOS) over the held-out 4-term questions."""
    from rlcore.arith import column_addition_completion
    from rlcore.data import load_splits
    from rlcore.models import load_tokenizer

    tokenizer = load_tokenizer(str(START))
    _, held_out = load_splits(train_config(["recipe=asyncthink_math", *overrides]).data, tokenizer)
    four = [p for p in held_out if p.metadata["num_terms"] == 4]
    return mean(len(tokenizer(column_addition_completion(p), add_special_tokens=False)["input_ids"]) + 1 for p in four)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="asyncthink_math", help="run name (runs/<name>); bench/results/<name>.json")
    parser.add_argument("--reuse-runs", action="store_true", help="summarise runs/sft_asyncthink and runs/<name> as they are")
    parser.add_argument("overrides", nargs="*", help="extra `rlcore train` overrides, e.g. learner.lr=5e-5")
    args = parser.parse_args()

    started = time.time()
    if not args.reuse_runs:
        if not START.is_dir():
            run_rlcore(["sft", "recipe=sft_asyncthink"])
        run_rlcore(["train", "recipe=asyncthink_math", f"name={args.name}", *args.overrides])
    curve = held_out_curve(ROOT / "runs" / args.name)
    first, last = curve[min(curve)], curve[max(curve)]
    four = by_terms(last)["num_terms_4"]
    result = {
        "bench": "asyncthink",
        "machine": machine(),
        "runs": ["rlcore sft recipe=sft_asyncthink", "rlcore train recipe=asyncthink_math " + " ".join([f"name={args.name}", *args.overrides])],
        "sft_summary": run_summary("sft_asyncthink"),
        "train_summary": run_summary(args.name),
        "before": {"eval/accuracy": first["eval/accuracy"], "eval/format_error_frac": first["eval/format_error_frac"], **by_terms(first)},
        "after": {"eval/accuracy": last["eval/accuracy"], "eval/format_error_frac": last["eval/format_error_frac"], **by_terms(last)},
        "held_out_curve": {step: row["eval/accuracy"] for step, row in curve.items()},
        "ratio": four["critical_path"] / four["total_steps"],
        "sequential_working_tokens_4_terms": sequential_working_tokens(args.overrides),
        "wall_time_s": round(time.time() - started, 1),
    }
    for when in ("before", "after"):
        r = result[when]
        print(f"{when:>6}: held-out {r['eval/accuracy']:.1%}; 4 terms: {r['num_terms_4']['accuracy']:.1%}, "
              f"critical path {r['num_terms_4']['critical_path']:.1f} of {r['num_terms_4']['total_steps']:.1f} steps, "
              f"{r['num_terms_4']['workers']:.2f} workers")
    write_result(result, ROOT / f"bench/results/{args.name}.json")


if __name__ == "__main__":
    main()
