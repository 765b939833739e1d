"""`rlcore sft`: supervised fine-tuning on the same learner ranks RL uses.

The loss is completion-only NLL (token mean over the batch). With
`sft.from_scratch=true` it first builds a tokenizer from the task's text and
a fresh Llama-architecture model; that is how the embedded default model
(rlcore/assets/arith-3m) was made. `sft.add_tokens` adds tokens to the tokenizer and
resizes the embeddings first (the hybrid-thinking cold start adds its <no_think> tags).
Checkpoints, `resume` and SIGUSR1 work as in `rlcore train` (rlcore.checkpoint), every
`sft.checkpoint_every` steps, the newest `sft.keep_last` kept.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from omegaconf import OmegaConf

from rlcore.algorithm import LossNorm, aggregate
from rlcore.batch import Trajectory, build_batch
from rlcore.checkpoint import Checkpointer
from rlcore.cluster import ray_session
from rlcore.config import ConfigError, import_function, validate_sft
from rlcore.data import Prompt, PromptSampler, load_splits, reasoning_gym_rows
from rlcore.logging import PeakMemory, RunLogger, StepTimer
from rlcore.models import load_model, load_tokenizer, resolve_model_path
from rlcore.reward import RewardRunner
from rlcore.rollout.programs import check_program
from rlcore.trainer import evaluate, start_actors

SPECIAL_TOKENS = ["<|pad|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Ordinary (not special) tokens, so decoded responses keep them for the format reward.
TAG_TOKENS = ["<think>", "</think>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}<|eos|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass
class CompletionNLL:
    """The SFT 'algorithm': mean negative log-likelihood of the completion tokens."""

    epochs: int = 1
    needs_router: ClassVar[bool] = False  # no MoE routing records (LearnerRank.update)

    def loss(self, logp, batch, norm: LossNorm):
        loss = aggregate(-logp, batch["response_mask"], "token-mean", norm)
        return loss, {"nll_loss": loss.detach()}  # a "loss" share: adds up over micro-batches


def build_scratch_model(texts: list[str], arch, out_dir: Path, seed: int) -> str:
    """Train a byte-level BPE tokenizer (digits split one per token) on `texts` and save it
    with a Llama model freshly initialised from `seed` to out_dir (the caller's RNG state is
    left as it was)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>", chat_template=CHAT_TEMPLATE)
    tokenizer.add_tokens(TAG_TOKENS)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=arch.hidden_size, num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_heads, intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_position_embeddings, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def with_added_tokens(model_path: str, tokens: list[str], out_dir: Path) -> str:
    """The model at model_path with `tokens` added to its tokenizer as ordinary tokens (like
    TAG_TOKENS) and its embeddings resized, saved to out_dir; model_path itself when it has
    them all already. New rows are drawn around the old embeddings' mean (transformers'
    mean_resizing), so the new tokens start as typical, not random, inputs."""
    if not all(t.strip() for t in tokens):
        raise ConfigError(f"sft.add_tokens={tokens}: a token is empty")
    tokenizer = load_tokenizer(model_path)
    if not tokenizer.add_tokens(tokens):
        return model_path
    model = load_model(model_path)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def sft(cfg) -> dict:
    validate_sft(cfg)
    run_dir = Path(cfg.run_dir)
    checkpoints = Checkpointer(run_dir, cfg.sft.checkpoint_every, cfg.sft.keep_last)
    resume_from = checkpoints.resume_point(cfg.resume, cfg.learner)
    completion_of = import_function(cfg.sft.completion_fn, "sft.completion_fn")
    model_path = starting_model(cfg, completion_of, run_dir)
    tokenizer = load_tokenizer(model_path)
    check_program(cfg.rollout.eval_program, tokenizer)
    train_set, eval_set = load_splits(cfg.data, tokenizer)
    sampler = PromptSampler(len(train_set), cfg.seed)
    state = {"step": 0}
    if resume_from:  # after starting_model: a scratch model's init draws from the RNG this restores
        state = Checkpointer.load_state(resume_from)
        sampler.load_state_dict(state["sampler"])
    policy_path = str(resume_from / "model") if resume_from else model_path
    steps, started, metrics = cfg.sft.steps, time.time(), {}
    with PeakMemory() as memory, RewardRunner(cfg.reward) as rewards, ray_session(cfg.cluster), checkpoints.stop_on_signal():
        rollout, learner = start_actors(cfg, policy_path, ref_path=None, temperature=1.0, batch_size=cfg.sft.batch_size,
                                        mini_batches=1, total_optimizer_steps=steps, seed=cfg.seed)
        if resume_from:
            learner.load_optimizer(str(resume_from))
        log = RunLogger(run_dir, cfg.logger, OmegaConf.to_container(cfg, resolve=True), cfg.name, state["step"], steps)
        if resume_from:
            log.write(f"resumed from {resume_from} (step {state['step']})")
        objective = CompletionNLL()
        for step in range(state["step"] + 1, steps + 1):
            timer = StepTimer()
            prompts = [train_set[i] for i in sampler.take(cfg.sft.batch_size)]
            batch = build_batch([demonstration(p, completion_of(p), tokenizer) for p in prompts], tokenizer.pad_token_id)
            with timer("update"):
                metrics = learner.update(batch, objective)
            metrics |= timer.metrics(tokens=float(batch["response_mask"].sum()))
            if step % cfg.sft.eval_every == 0 or step == steps:
                rollout.load_weights(learner.export_weights())
                metrics |= evaluate(rollout, rewards, eval_set, cfg.rollout)
                log.write(f"step {step}: held-out accuracy {metrics['eval/accuracy']:.1%}")
            log.log(step, metrics)
            if checkpoints.due(step, steps):
                checkpoints.save(step, learner, {"sampler": sampler.state_dict()}, model_path)
                checkpoints.stop_if_asked()
        if not metrics:  # resumed from the last checkpoint: nothing left to train; evaluate what it holds
            metrics = evaluate(rollout, rewards, eval_set, cfg.rollout)
        log.close()
    summary = {"steps": steps, "eval/accuracy": metrics["eval/accuracy"], "final_model": str(checkpoints.publish_final()),
               "wall_time_s": round(time.time() - started, 1), "peak_memory_gib": round(memory.peak_gib, 2)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def starting_model(cfg, completion_of, run_dir: Path) -> str:
    """The model SFT starts from: model.path, or a fresh one (sft.from_scratch), with sft.add_tokens added."""
    if cfg.sft.from_scratch:
        rows = reasoning_gym_rows(cfg.data.task, 2000, cfg.data.train_seed, dict(cfg.data.task_args))
        texts = [r["question"] + " " + completion_of(Prompt("", r["question"], r["answer"], metadata=r["metadata"])) for r in rows]
        model_path = build_scratch_model(texts, cfg.sft.scratch, run_dir / "init", cfg.seed)
    else:
        model_path = resolve_model_path(cfg.model.path)  # zoo models are built here, once, not in each actor
    if cfg.sft.add_tokens:
        model_path = with_added_tokens(model_path, list(cfg.sft.add_tokens), run_dir / "init")
    return model_path


def demonstration(prompt, completion: str, tokenizer) -> Trajectory:
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Trajectory(prompt, ids, [0.0] * len(ids), completion, "stop")
