"""HGPO hybrid thinking on the mixed easy/hard task, from the HFT cold start (SPEC §2).

Real runs, each its own `rlcore` process:
  0. `rlcore sft recipe=sft_hybrid` — the HFT cold start (skipped when its model exists);
  1. `rlcore train recipe=hgpo_hybrid [overrides]` — HGPO;
  2. `rlcore eval … data=arith_mix hybrid.enabled=true` on the HFT start and on the HGPO model,
     each in free mode (the model picks its mode: Hybrid Accuracy, mode chosen per difficulty)
     and forced into think mode (the always-think comparison).
Goal (issue): after HGPO, HAcc ≥ 70%, and free mode shorter than always-think at an accuracy
within 2 points. `ratio` = free-mode length / forced-think length of the HGPO model; the
accuracies sit beside it.

    .venv/bin/python bench/hgpo_hybrid.py --name hgpo_hybrid_lr1e-5 learner.lr=1e-5   # ~15 min
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import ROOT, machine, run_rlcore, run_summary, write_result

HFT = Path("runs/sft_hybrid/final")


def evaluate(model: Path, mode: str) -> dict:
    """eval.json of `rlcore eval` in hybrid `mode`; the hybrid pass's own metrics (eval/hybrid/*)
    describe that mode, eval/accuracy the free greedy pass (rlcore.evaluate.held_out_metrics)."""
    run_dir = ROOT / "runs" / f"eval_{model.parent.name}_{mode}"
    run_rlcore(["eval", f"model={model}", "data=arith_mix", "hybrid.enabled=true", f"hybrid.mode={mode}", f"run_dir={run_dir}"])
    return json.loads((run_dir / "eval.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="hgpo_hybrid", help="run name (runs/<name>)")
    parser.add_argument("--out", type=Path, help="default: bench/results/<name>_eval.json")
    parser.add_argument("overrides", nargs="*", help="extra `rlcore train` overrides, e.g. learner.lr=1e-5")
    args = parser.parse_args()

    if not (ROOT / HFT).is_dir():
        run_rlcore(["sft", "recipe=sft_hybrid"])
    started = time.time()
    run_rlcore(["train", "recipe=hgpo_hybrid", f"name={args.name}", *args.overrides])
    hgpo = Path("runs") / args.name / "final"
    result = {
        "bench": "hgpo_hybrid",
        "machine": machine(),
        "train_overrides": args.overrides,
        "train_summary": run_summary(args.name),
        "hft_start_free": evaluate(HFT, "free"),
        "hft_start_forced_think": evaluate(HFT, "think"),
        "hgpo_free": evaluate(hgpo, "free"),
        "hgpo_forced_think": evaluate(hgpo, "think"),
    }
    free, think = result["hgpo_free"], result["hgpo_forced_think"]
    result["ratio"] = free["eval/hybrid/length_mean"] / think["eval/hybrid/length_mean"]
    result["accuracy_free_minus_think"] = free["eval/hybrid/accuracy"] - think["eval/hybrid/accuracy"]
    result["wall_time_s"] = round(time.time() - started, 1)
    print(f"HGPO model: HAcc {free['eval/hacc']:.1%}; free {free['eval/hybrid/accuracy']:.1%} at "
          f"{free['eval/hybrid/length_mean']:.1f} tokens vs always-think {think['eval/hybrid/accuracy']:.1%} at "
          f"{think['eval/hybrid/length_mean']:.1f} (length ratio {result['ratio']:.2f})")
    write_result(result, args.out or ROOT / "bench/results" / f"{args.name}_eval.json")


if __name__ == "__main__":
    main()
