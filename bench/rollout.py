"""Generation throughput of the rollout backends on the same prompts: transformers vs vLLM.

What is measured
    Each backend's engine (rlcore.rollout.hf / rlcore.rollout.vllm), in this process,
    generates K samples for each of the same P prompts (the arithmetic task's, through
    the model's chat template), temperature 1.0, up to N new tokens. After one warm-up
    call, `--repeats` calls are timed; tokens/s = generated tokens / wall time, median
    over the calls. Both run in float32 by default (`--dtype`) with all cores.

Output
    A table, and a JSON file (default bench/results/rollout_<model>.json) whose one-line
    form is the last line printed; `ratio` = vLLM tokens/s / transformers tokens/s.

    python bench/rollout.py                     # the embedded arith-3m model
    python bench/rollout.py --model zoo:smollm2-135m-instruct --max-new-tokens 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from common import machine, train_config, write_result

HERE = Path(__file__).resolve().parent


def prompts(model_path: str, count: int) -> list[list[int]]:
    from rlcore.data import load_splits
    from rlcore.models import load_tokenizer

    cfg = train_config(["recipe=opo_math", f"model.path={model_path}", f"data.train_size={count}"])
    train_set, _ = load_splits(cfg.data, load_tokenizer(model_path))
    return [p.token_ids for p in train_set[:count]]


def make_engine(backend: str, model_path: str, dtype: str, max_model_len: int):
    from omegaconf import OmegaConf

    from rlcore.config import RolloutConfig
    from rlcore.rollout import worker

    return worker.make_engine(OmegaConf.structured(RolloutConfig(backend=backend)), model_path, dtype, max_model_len, colocated=False)


def measure(engine, prompt_ids, samples: int, max_new_tokens: int, repeats: int) -> dict:
    from rlcore.rollout.engine import SamplingParams

    def once(seed: int) -> tuple[float, int]:
        started = time.perf_counter()
        groups = engine.generate(prompt_ids, SamplingParams(samples, max_new_tokens, 1.0, 1.0, seed))
        return time.perf_counter() - started, sum(len(c.token_ids) for g in groups for c in g)

    once(0)  # warm-up
    runs = [once(seed) for seed in range(1, repeats + 1)]
    rates = [tokens / seconds for seconds, tokens in runs]
    return {
        "tokens_per_s": statistics.median(rates),
        "call_s": [round(s, 3) for s, _ in runs],
        "tokens": [t for _, t in runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded:arith-3m")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from rlcore.models import resolve_model_path

    model_path = resolve_model_path(args.model)
    torch.set_num_threads(os.cpu_count() or 1)
    prompt_ids = prompts(args.model, args.prompts)
    max_model_len = max(len(p) for p in prompt_ids) + args.max_new_tokens
    results = {}
    for backend in ("hf", "vllm"):
        print(f"{backend}: loading ...", flush=True)
        engine = make_engine(backend, model_path, args.dtype, max_model_len)
        results[backend] = measure(engine, prompt_ids, args.samples, args.max_new_tokens, args.repeats)
        del engine

    result = {
        "benchmark": "rollout",
        "model": args.model,
        "dtype": args.dtype,
        "workload": f"{args.prompts} prompts x {args.samples} samples, <= {args.max_new_tokens} new tokens, temperature 1.0",
        "statistic": f"median tokens/s over {args.repeats} calls after one warm-up",
        "ratio": results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"],
        **results,
        "machine": machine(),
    }
    print(f"\n{result['workload']} on {result['machine']['device']}")
    for backend in ("hf", "vllm"):
        print(f"  {backend:6} {results[backend]['tokens_per_s']:10.1f} tokens/s")
    print(f"  ratio vLLM / transformers: {result['ratio']:.2f}\n")
    out = args.out or HERE / "results" / f"rollout_{args.model.split(':')[-1]}.json"
    write_result(result, out)


if __name__ == "__main__":
    main()
