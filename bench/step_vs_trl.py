"""Time one RL step of rlcore against TRL's GRPOTrainer on the same workload (W1 or W2).

What is measured
    The wall time of one RL step (generate → reward → loss/backward → optimizer
    step, plus whatever each framework does around that) on CPU, for:
      * rlcore: the real trainer, `rlcore train recipe=grpo_math ...`, run as a
        subprocess; its per-step `time/step` and phase times (`time/generate`,
        `time/reward`, `time/old_logprob`, `time/update`, `time/sync`) are read
        back from `<run_dir>/metrics.jsonl`.
      * TRL: `trl.GRPOTrainer`, in this process; the step time is taken between
        a TrainerCallback's `on_step_begin` and `on_step_end` (generation runs
        inside that window), and generation / reward calls are timed by
        wrapping two trainer methods.
    Both report the median over the steps after the first (warm-up).

Workloads (identical for both frameworks)
  W1: a Qwen2 model (4 layers, hidden 256, 4 heads / 2 KV heads, intermediate 768),
    randomly initialised with a fixed seed, with the tokenizer of rlcore's embedded
    model; saved once to a temporary directory that both frameworks load.
    8 prompts × 8 samples per step, up to 64 new tokens, temperature 1.0, one
    optimizer step per RL step, no KL / reference model, lr 5e-5 constant,
    reward = rlcore.rewards.math:math_correct (wrapped as a TRL reward function).
    Prompts: rlcore's arithmetic task (reasoning-gym basic_arithmetic,
    configs/data/arith.yaml); the TRL dataset is exactly the prompts rlcore's
    sampler picks for steps 1..N, in that order, unshuffled.
    Both get the same number of torch threads (`--threads`, default: all cores).
    rlcore generates with the transformers backend, as TRL does.
  W2: SmolLM2-135M-Instruct (`model=smollm2_135m`, bfloat16), the same prompts and
    settings but up to 256 new tokens; rlcore generates with vLLM (`rollout=vllm`),
    TRL with transformers generate (its non-vLLM path). Goal: ratio ≤ 0.5.

Output
    A table on stdout, and a JSON file (default bench/results/step_vs_trl_w1.json)
    whose one-line form is the last line printed; `ratio` = rlcore / TRL step time.

    python bench/step_vs_trl.py --steps 6
    python bench/step_vs_trl.py --workload W2 --steps 3
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import train_config, write_result

from rlcore.logging import read_metrics

HERE = Path(__file__).resolve().parent
PROMPTS_PER_STEP = 8
SAMPLES_PER_PROMPT = 8
TEMPERATURE = 1.0
LR = 5e-5
SEED = 0
RLCORE_PHASES = ("generate", "reward", "old_logprob", "update", "sync")

# The W1 model: a small Qwen2.
W1_ARCH = dict(
    hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=768, max_position_embeddings=512, tie_word_embeddings=True,
)


# ---- shared workload -------------------------------------------------------------------------


def wait_for(path: Path, timeout_s: float, every_s: float = 30.0) -> None:
    """The embedded model may still be being produced by another job: poll for it."""
    deadline = time.time() + timeout_s
    while not path.exists():
        if time.time() > deadline:
            sys.exit(f"step_vs_trl: {path} did not appear within {timeout_s:.0f}s")
        print(f"waiting for {path} ...", flush=True)
        time.sleep(every_s)


def build_model_dir(tokenizer_spec: str, out_dir: Path) -> Path:
    """Save a seeded, randomly initialised W1 Qwen2 and the tokenizer to out_dir."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from rlcore.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_spec)
    tokenizer.save_pretrained(out_dir)
    config = Qwen2Config(
        vocab_size=len(tokenizer), **W1_ARCH,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )
    config.save_pretrained(out_dir)
    # AutoTokenizer picks the tokenizer class by model type, and for qwen2 it adds an unk token
    # (<|endoftext|>) the source tokenizer lacks: size the embeddings for what both frameworks load.
    config.vocab_size = len(AutoTokenizer.from_pretrained(out_dir))
    torch.manual_seed(SEED)
    Qwen2ForCausalLM(config).save_pretrained(out_dir)
    return out_dir


@dataclass(frozen=True)
class Workload:
    name: str
    max_new_tokens: int
    dtype: str
    rlcore_backend: str  # rollout config group for rlcore
    micro_batch: int  # rows per forward/backward (both frameworks); gradients accumulate to one step
    description: dict


WORKLOADS = {
    "W1": Workload("W1", 64, "float32", "hf", 64, {"type": "qwen2", **W1_ARCH, "init": f"random, seed {SEED}"}),
    # 64 rows × ~300 tokens × a 49k vocabulary is ~4 GB of logits per copy: W2 goes 8 rows at a time.
    "W2": Workload("W2", 256, "bfloat16", "vllm", 8, {"name": "SmolLM2-135M-Instruct", "path": "zoo:smollm2-135m-instruct"}),
}


def workload_model(workload: Workload, tokenizer_spec: str, work: Path) -> Path:
    if workload.name == "W1":
        return build_model_dir(tokenizer_spec, work / "model")
    from rlcore.models import resolve_model_path

    return Path(resolve_model_path(workload.description["path"]))


def rlcore_overrides(workload: Workload, model_dir: Path, run_dir: Path, steps: int, threads: int) -> list[str]:
    """The `rlcore train` overrides of this benchmark (also used to compose the same data config here)."""
    return [
        "recipe=grpo_math",
        f"rollout={workload.rlcore_backend}",
        f"model.path={model_dir}",
        f"model.dtype={workload.dtype}",
        f"run_dir={run_dir}",
        f"trainer.steps={steps}",
        f"trainer.prompts_per_step={PROMPTS_PER_STEP}",
        f"trainer.seed={SEED}",
        "trainer.eval_before=false",
        "trainer.eval_after=false",
        "trainer.checkpoint_every=0",
        f"algorithm.samples_per_prompt={SAMPLES_PER_PROMPT}",
        "algorithm.kl_coef=0.0",
        f"rollout.max_new_tokens={workload.max_new_tokens}",
        f"rollout.temperature={TEMPERATURE}",
        f"learner.lr={LR}",
        "learner.lr_schedule=constant",
        f"learner.micro_batch_size={workload.micro_batch}",
        "reward.fns=[math]",
        f"cluster.threads_per_actor={threads}",
        "logger.wandb=false",
        "logger.progress=false",
    ]


def rlcore_step_prompts(overrides: list[str], steps: int) -> list[dict]:
    """The prompts rlcore's trainer takes at steps 1..steps, in order, as {"question", "answer"} rows."""
    from rlcore.data import PromptSampler, load_splits
    from rlcore.models import load_tokenizer

    cfg = train_config(overrides)
    train_set, _ = load_splits(cfg.data, load_tokenizer(cfg.model.path))
    sampler = PromptSampler(len(train_set), cfg.trainer.seed)
    picked = [train_set[i] for _ in range(steps) for i in sampler.take(cfg.trainer.prompts_per_step)]
    return [{"question": p.text, "answer": p.ground_truth} for p in picked]


def median_after_warmup(values: list[float]) -> float:
    return statistics.median(values[1:] if len(values) > 1 else values)


# ---- rlcore ----------------------------------------------------------------------------------


def run_rlcore(overrides: list[str], run_dir: Path) -> list[dict]:
    """`rlcore train` as a subprocess; returns the rows of its metrics.jsonl."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / "rlcore_train.log"
    cmd = [sys.executable, "-m", "rlcore.cli", "train", *overrides]
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-30:]
        sys.exit("step_vs_trl: rlcore train failed:\n" + "\n".join(tail))
    return [r for r in read_metrics(run_dir) if "time/step" in r]


def summarize_rlcore(rows: list[dict]) -> dict:
    """Median step time and phase split; `other` = step − Σ phases (Ray calls, batching, driver work)."""
    per_step = [r["time/step"] for r in rows]
    phases = {p: median_after_warmup([r.get(f"time/{p}", 0.0) for r in rows]) for p in RLCORE_PHASES}
    other = [r["time/step"] - sum(r.get(f"time/{p}", 0.0) for p in RLCORE_PHASES) for r in rows]
    return {
        "step_s": median_after_warmup(per_step),
        "phases_s": {**phases, "other": median_after_warmup(other)},
        "per_step_s": per_step,
        "response_length_mean": median_after_warmup([r.get("response/length_mean", 0.0) for r in rows]),
    }


# ---- TRL -------------------------------------------------------------------------------------


def math_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """rlcore's math reward as a TRL reward function (conversational prompts and completions)."""
    from rlcore.reward import Sample
    from rlcore.rewards.math import math_correct

    return [
        math_correct(Sample(prompt[-1]["content"], completion[-1]["content"], truth, {}))
        for prompt, completion, truth in zip(prompts, completions, answer)
    ]


class StepClock:
    """Per-step wall time (on_step_begin → on_step_end) and, inside each step, the time spent in
    the trainer methods wrapped with `time_method`."""

    def __init__(self, phases: tuple[str, ...]):
        self.step_s: list[float] = []
        self.phases: dict[str, list[float]] = {p: [] for p in phases}
        self._t0 = 0.0

    def begin(self) -> None:
        for values in self.phases.values():
            values.append(0.0)
        self._t0 = time.perf_counter()

    def end(self) -> None:
        self.step_s.append(time.perf_counter() - self._t0)

    def time_method(self, obj, name: str, phase: str) -> None:
        method = getattr(obj, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.phases[phase][-1] += time.perf_counter() - t0

        setattr(obj, name, wrapper)

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class StepClockCallback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                clock.begin()

            def on_step_end(self, args, state, control, **kwargs):
                clock.end()

        return StepClockCallback()


def run_trl(workload: Workload, model_dir: Path, rows: list[dict], steps: int, output_dir: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]} for r in rows]
    )
    args = GRPOConfig(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=workload.dtype == "bfloat16",
        use_vllm=False,
        num_generations=SAMPLES_PER_PROMPT,
        per_device_train_batch_size=workload.micro_batch,
        # → one optimizer step per 64 completions, generated together (generation_batch_size = 8 prompts × 8)
        gradient_accumulation_steps=PROMPTS_PER_STEP * SAMPLES_PER_PROMPT // workload.micro_batch,
        max_completion_length=workload.max_new_tokens,
        temperature=TEMPERATURE,
        beta=0.0,
        learning_rate=LR,
        lr_scheduler_type="constant",
        gradient_checkpointing=False,  # TRL's default is True; rlcore keeps activations
        loss_type="dapo",  # token-mean over the batch, as rlcore's grpo (loss_agg: token-mean)
        scale_rewards="group",  # as rlcore's grpo scale_by_std: true
        shuffle_dataset=False,  # rows are already in rlcore's sampling order
        max_steps=steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=SEED,
        disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # fp32 master weights, as DeepSpeed keeps
    clock = StepClock(("generate", "reward"))
    trainer = GRPOTrainer(
        model=model, reward_funcs=math_reward, args=args, train_dataset=dataset,
        processing_class=tokenizer, callbacks=[clock.callback()],
    )
    clock.time_method(trainer, "_generate_single_turn", "generate")
    clock.time_method(trainer, "_calculate_rewards", "reward")
    trainer.remove_callback(PrinterCallback)  # per-step log dicts on stdout
    trainer.train()

    lengths = [x["completions/mean_length"] for x in trainer.state.log_history if "completions/mean_length" in x]
    step_s, phases = clock.step_s, clock.phases
    other = [s - phases["generate"][i] - phases["reward"][i] for i, s in enumerate(step_s)]
    return {
        "step_s": median_after_warmup(step_s),
        "phases_s": {
            "generate": median_after_warmup(phases["generate"]),
            "reward": median_after_warmup(phases["reward"]),
            "other": median_after_warmup(other),  # logprobs, loss, backward, optimizer, bookkeeping
        },
        "per_step_s": step_s,
        "response_length_mean": median_after_warmup(lengths) if lengths else None,
    }


# ---- report ----------------------------------------------------------------------------------


def machine_info(threads: int) -> dict:
    import transformers
    import trl

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "rlcore": importlib.metadata.version("rlcore"),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def print_table(result: dict) -> None:
    r, t = result["rlcore"], result["trl"]
    print()
    print(f"{result['workload']['name']} step time, median of steps 2..{result['steps']} ({result['workload']['batch']})")
    print(f"  {'':22}{'rlcore':>10}{'TRL':>10}")
    print(f"  {'step (s)':22}{r['step_s']:>10.3f}{t['step_s']:>10.3f}")
    print(f"  {'ratio rlcore/TRL':22}{result['ratio']:>10.2f}")
    print("  Phase times are medians per phase, so they need not add up to the median step.")
    print("  rlcore split (s; 'other' = step − phases: Ray / driver / batching):")
    for name, value in r["phases_s"].items():
        print(f"    {name:20}{value:>10.3f}  {value / r['step_s']:>5.0%}")
    print("  TRL split (s; 'other' = logprobs + loss + backward + optimizer + bookkeeping):")
    for name, value in t["phases_s"].items():
        print(f"    {name:20}{value:>10.3f}  {value / t['step_s']:>5.0%}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="RL steps per framework (the first is warm-up)")
    parser.add_argument("--workload", default="W1", choices=sorted(WORKLOADS))
    parser.add_argument("--out", type=Path, help="where to write the JSON result (default bench/results/step_vs_trl_<workload>.json)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for both frameworks")
    parser.add_argument("--tokenizer", default="embedded:arith-3m", help="model.path whose tokenizer W1 uses")
    parser.add_argument("--wait", type=float, default=1200, help="seconds to wait for the embedded model to appear")
    parser.add_argument("--work-dir", type=Path, help="keep the model, rlcore run dir and logs here (default: a temp dir)")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be ≥ 2 (the first step is warm-up)")

    import transformers

    if args.tokenizer.startswith("embedded:"):
        import rlcore

        wait_for(Path(rlcore.__file__).parent / "assets" / args.tokenizer.split(":", 1)[1] / "config.json", args.wait)
    torch.set_num_threads(args.threads)
    transformers.logging.disable_progress_bar()
    info = machine_info(args.threads)

    with tempfile.TemporaryDirectory(prefix="step_vs_trl_") as tmp:
        work = args.work_dir or Path(tmp)
        workload = WORKLOADS[args.workload]
        model_dir = workload_model(workload, args.tokenizer, work)
        overrides = rlcore_overrides(workload, model_dir, work / "rlcore_run", args.steps, args.threads)
        rows = rlcore_step_prompts(overrides, args.steps)
        print(f"rlcore train ({args.steps} steps) ...", flush=True)
        rlcore = summarize_rlcore(run_rlcore(overrides, work / "rlcore_run"))
        print(f"TRL GRPOTrainer ({args.steps} steps) ...", flush=True)
        trl_result = run_trl(workload, model_dir, rows, args.steps, work / "trl_out")

    result = {
        "benchmark": "step_vs_trl",
        "workload": {
            "name": workload.name,
            "model": workload.description,
            "dtype": workload.dtype,
            "rlcore_rollout": workload.rlcore_backend,
            "tokenizer": args.tokenizer if workload.name == "W1" else "the model's own",
            "batch": f"{PROMPTS_PER_STEP} prompts x {SAMPLES_PER_PROMPT} samples, <= {workload.max_new_tokens} new tokens",
            "temperature": TEMPERATURE,
            "lr": LR,
            "reward": "rlcore.rewards.math:math_correct",
            "prompts": "reasoning_gym basic_arithmetic (configs/data/arith.yaml), rlcore's sampler order",
        },
        "steps": args.steps,
        "statistic": "median over steps 2..N",
        "rlcore_overrides": overrides,
        "ratio": rlcore["step_s"] / trl_result["step_s"],
        "rlcore": rlcore,
        "trl": trl_result,
        "machine": {**info, "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
    }
    print_table(result)
    out = args.out or HERE / "results" / f"step_vs_trl_{workload.name.lower()}.json"
    write_result(result, out)


if __name__ == "__main__":
    main()
