"""Weight sync as a share of the RL step: `rlcore train` with each rollout backend.

What is measured
    `rlcore train recipe=opo_math` (the embedded model by default; `--model` for
    another) for `--steps` steps, as a subprocess; from its metrics.jsonl, the
    median over steps 2..N of `time/sync` (learner export → Ray object store →
    every rollout engine loaded) and of `time/step`. Goal: sync < 5% of the step.

Output
    A table, and a JSON file (default bench/results/sync.json) whose one-line form is
    the last line printed, with `share` per backend.

    python bench/sync.py --backends hf vllm
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import machine, write_result
from step_vs_trl import median_after_warmup, run_rlcore

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded:arith-3m")
    parser.add_argument("--backends", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "sync.json")
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_sync_") as tmp:
        for backend in args.backends:
            run_dir = Path(tmp) / backend
            overrides = [
                "recipe=opo_math", f"model.path={args.model}", f"rollout={backend}", f"run_dir={run_dir}",
                f"trainer.steps={args.steps}", "trainer.eval_before=false", "trainer.eval_after=false",
                "trainer.checkpoint_every=0", "logger.wandb=false", "logger.progress=false",
            ]
            print(f"rlcore train, rollout={backend} ({args.steps} steps) ...", flush=True)
            rows = run_rlcore(overrides, run_dir)
            sync = median_after_warmup([r["time/sync"] for r in rows])
            step = median_after_warmup([r["time/step"] for r in rows])
            results[backend] = {"sync_s": sync, "step_s": step, "share": sync / step, "overrides": overrides}

    result = {
        "benchmark": "sync",
        "model": args.model,
        "steps": args.steps,
        "statistic": "median over steps 2..N",
        "goal": "share < 0.05",
        **results,
        "machine": machine(),
    }
    print(f"\nweight sync share of the step ({args.model}, {result['machine']['device']})")
    for backend, r in results.items():
        print(f"  {backend:6} sync {r['sync_s']:.3f} s of {r['step_s']:.3f} s  = {r['share']:.1%}")
    write_result(result, args.out)


if __name__ == "__main__":
    main()
