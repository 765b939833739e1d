"""End-to-end generation speed, dense vs ReSA, at a long context on CPU.

What is measured
    SmolLM2-135M-Instruct (the zoo model; `--model` for another) continues a long prompt
    (`--context` tokens of the model's own tokenisation of repeated English text) for
    `--new-tokens` tokens, `--batch` sampled rows, through rlcore's sparse decode loop
    (rlcore.sparse.generate) — once with every step dense, once with ReSA (block 16,
    keep ratio 0.1 ⇒ sparsity ≈ 0.9, dense rectification every 32 tokens, the SPEC §8
    defaults). Same loop, same preallocated cache, same sampling; only the attention of
    decode steps differs, and ReSA pays for its selection and its rectification forwards.
    Decode time = the generate call's wall time after its first forward (the prefill, dense in
    both) returned, so the prefill does not dilute the ratio; the total is reported too. EOS is
    ignored so every row generates N tokens.

    --backend vllm: the same through vLLM's CPU build (rlcore.sparse.vllm_cpu; ReSA without
    rectification there), one engine per setting, prefix caching off in both (sparse settings
    need it off; dense gets no head start). Decode time = the engine steps that decode only
    (one token per request), timed at the scheduler (StepClock); steps with a prefill are left out.

Output
    A table, and bench/results/resa_generate.json whose one-line form is the last line
    printed; `ratio` = ReSA decode tokens/s ÷ dense decode tokens/s (goal ≥ 2 at s = 0.9);
    --backend vllm writes resa_generate_vllm.json.

    python bench/resa_generate.py                     # 32k context, batch 4, 96 new tokens (~15 min)
    python bench/resa_generate.py --context 16384 --new-tokens 128
    python bench/resa_generate.py --backend vllm --context 8192 --batch 2 --new-tokens 64
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path

import torch

from common import machine, write_result

HERE = Path(__file__).resolve().parent
TEXT = ("The quick brown fox jumps over the lazy dog while the committee reviews the annual report "
        "on river levels, train timetables and the price of bread in seven neighbouring towns. ")


def long_prompt(tokenizer, length: int) -> list[int]:
    ids = tokenizer(TEXT * (length // 20 + 1))["input_ids"]
    return ids[:length]


def timed_generate(model, prompt, state, new_tokens: int, batch: int, rectify_every: int) -> tuple[float, float]:
    """(prefill seconds, total seconds) of one sparse_generate call."""
    from rlcore.rollout.engine import SamplingParams
    from rlcore.sparse.generate import sparse_generate

    forward, prefill_end = model.forward, []

    def clocked(*args, **kwargs):  # notes when the first forward (the prefill) returns
        out = forward(*args, **kwargs)
        if not prefill_end:
            prefill_end.append(time.perf_counter())
        return out

    sampling = SamplingParams(n=batch, max_new_tokens=new_tokens, temperature=1.0, seed=0)
    torch.manual_seed(0)
    model.forward = clocked
    try:
        started = time.perf_counter()
        # eos_ids={-1}: no token id is -1, so no row stops early and every row decodes N tokens
        sparse_generate(model, [prompt], sampling, {-1}, state, rectify_every)
        ended = time.perf_counter()
    finally:
        model.forward = forward
    return prefill_end[0] - started, ended - started


def hf_rows(args, path: str, prompt: list[int]) -> dict:
    from rlcore.models import load_model
    from rlcore.sparse.attention import dense, install
    from rlcore.sparse.resa import ReSASelector

    model = load_model(path, "float32").eval()
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, args.context + args.new_tokens)
    state = install(model, ReSASelector(args.block_size, args.keep_ratio, args.min_blocks))
    rows = {}
    for name in ("dense", "resa"):
        mode = dense(state) if name == "dense" else contextlib.nullcontext()
        rectify = 0 if name == "dense" else args.rectify_every
        with mode:
            state.kept_keys = state.total_keys = 0
            prefill, total = timed_generate(model, prompt, state, args.new_tokens, args.batch, rectify)
        rows[name] = {"prefill_s": round(prefill, 2), "total_s": round(total, 2), "decode_s": round(total - prefill, 2),
                      "decode_tokens_per_s": round(args.batch * (args.new_tokens - 1) / (total - prefill), 2),
                      "density": round(state.density, 4)}
        print(name, rows[name], flush=True)
    return rows


def vllm_rows(args, path: str, prompt: list[int]) -> dict:
    import gc

    from omegaconf import OmegaConf
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from rlcore.config import RolloutConfig
    from rlcore.rollout.vllm import VLLMRolloutEngine

    # Past the model's trained length, as the transformers run (hf_rows): speed, not text, is measured.
    os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    cfg = OmegaConf.structured(RolloutConfig(backend="vllm"))
    cfg.vllm.enable_prefix_caching = False
    cfg.vllm.cpu_kv_cache_gib = args.cpu_kv_cache_gib
    cfg.sparse.update(method="resa", block_size=args.block_size, keep_ratio=args.keep_ratio,
                      min_blocks=args.min_blocks, rectify_every=0)
    rows = {}
    for name in ("dense", "resa"):
        engine = VLLMRolloutEngine(path, "float32", cfg.vllm, max_model_len=args.context + args.new_tokens,
                                   sparse=cfg.sparse if name == "resa" else None)
        params = SamplingParams(n=args.batch, max_tokens=args.new_tokens, temperature=1.0, seed=0, ignore_eos=True,
                                detokenize=False)
        engine.llm.generate([TokensPrompt(prompt_token_ids=prompt[:256])], params, use_tqdm=False)  # warm-up, not counted
        steps = StepClock(engine.llm.llm_engine.engine_core.engine_core.scheduler)
        started = time.perf_counter()
        engine.llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
        ended = time.perf_counter()
        decode_s, decode_tokens = steps.decode(ended)
        rows[name] = {"total_s": round(ended - started, 2), "decode_s": round(decode_s, 2), "decode_tokens": decode_tokens,
                      "decode_tokens_per_s": round(decode_tokens / decode_s, 2),
                      "density": round(engine.sparse.density if engine.sparse else 1.0, 4)}
        print(name, rows[name], flush=True)
        engine = None  # the next setting's engine starts in a process without this one
        gc.collect()
    return rows


class StepClock:
    """Times vLLM's engine steps from its scheduler's side (the in-process engine core): each
    step runs from one `schedule()` call to the next. A decode step schedules one token per
    request; steps with a prefill in them are left out of the decode time."""

    def __init__(self, scheduler):
        self.marks: list[tuple[float, int, int]] = []  # (start, tokens, requests) per step
        schedule = scheduler.schedule

        def timed(*args, **kwargs):
            out = schedule(*args, **kwargs)
            self.marks.append((time.perf_counter(), out.total_num_scheduled_tokens, len(out.num_scheduled_tokens)))
            return out

        scheduler.schedule = timed

    def decode(self, ended: float) -> tuple[float, int]:
        """(seconds, tokens) of the decode-only steps."""
        ends = [m[0] for m in self.marks[1:]] + [ended]
        steps = [(end - start, tokens) for (start, tokens, requests), end in zip(self.marks, ends) if 0 < tokens == requests]
        return sum(s for s, _ in steps), sum(t for _, t in steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="zoo:smollm2-135m-instruct")
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--keep-ratio", type=float, default=0.1)
    parser.add_argument("--min-blocks", type=int, default=16)
    parser.add_argument("--rectify-every", type=int, default=32, help="transformers backend only (vLLM: 0)")
    parser.add_argument("--cpu-kv-cache-gib", type=int, default=8, help="vLLM's KV cache (whole GiB)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from rlcore.models import load_tokenizer, resolve_model_path

    path = resolve_model_path(args.model)
    prompt = long_prompt(load_tokenizer(path), args.context)
    rows = (hf_rows if args.backend == "hf" else vllm_rows)(args, path, prompt)
    ratio = rows["resa"]["decode_tokens_per_s"] / rows["dense"]["decode_tokens_per_s"]
    result = {
        "benchmark": "resa_generate",
        "model": args.model,
        "backend": args.backend,
        "context": len(prompt),
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "resa": {"block_size": args.block_size, "keep_ratio": args.keep_ratio, "min_blocks": args.min_blocks,
                 "rectify_every": args.rectify_every if args.backend == "hf" else 0},
        "sparsity": round(1 - rows["resa"]["density"], 4),
        "rows": rows,
        "total_ratio": round(rows["dense"]["total_s"] / rows["resa"]["total_s"], 3),
        "ratio": round(ratio, 3),
        "machine": machine(),
    }
    write_result(result, args.out or HERE / "results" / f"resa_generate{'_vllm' if args.backend == 'vllm' else ''}.json")


if __name__ == "__main__":
    main()
