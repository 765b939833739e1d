"""THE loop. Every algorithm runs it; algorithms change numbers, never the loop.

One step: sample prompts → rollout workers generate K samples per prompt →
rewards → learner recomputes old (and reference) log-probs → advantages → update → weights
synced to the rollout workers → metrics → checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from statistics import mean
from omegaconf import OmegaConf

from rlcore.algorithm import build_algorithm
from rlcore.batch import Trajectory, build_batch
from rlcore.checkpoint import Checkpointer
from rlcore.dynamic_sampling import informative_frac, refill_groups
from rlcore.cluster import ray_session, thread_counts
from rlcore.config import longest_request, validate_train
from rlcore.data import PromptSampler, load_splits
from rlcore.learner.group import LearnerGroup
from rlcore.logging import PeakMemory, RunLogger, StepTimer
from rlcore.metrics import means_by_label
from rlcore.models import check_routers, load_tokenizer, resolve_model_path
from rlcore.placement import plan_placement
from rlcore.reward import RewardRunner
from rlcore.rollout.engine import SamplingParams
from rlcore.rollout.programs import check_program
from rlcore.rollout.worker import RolloutGroup


def train(cfg) -> dict:
    algorithm = build_algorithm(cfg.algorithm)
    validate_train(cfg, algorithm)
    run_dir = Path(cfg.run_dir)
    checkpoints = Checkpointer(run_dir, cfg.trainer.checkpoint_every, cfg.trainer.keep_last)
    resume_from = checkpoints.resume_point(cfg.resume, cfg.learner)
    model_path = resolve_model_path(cfg.model.path)  # zoo models are built here, once, not in each actor
    tokenizer = load_tokenizer(model_path)
    check_program(algorithm.program, tokenizer)
    check_program(cfg.rollout.eval_program, tokenizer)
    if algorithm.needs_router:
        check_routers(model_path, f"algorithm.router_shift=true ({algorithm.name})")
    train_set, eval_set = load_splits(cfg.data, tokenizer)
    sampler = PromptSampler(len(train_set), cfg.trainer.seed)
    state = {"step": 0, "accuracy_before": None}
    if resume_from:
        state = Checkpointer.load_state(resume_from)
        sampler.load_state_dict(state["sampler"])
    policy_path = str(resume_from / "model") if resume_from else model_path
    sampling = SamplingParams(algorithm.samples_per_prompt, cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p)
    steps, started = cfg.trainer.steps, time.time()

    with PeakMemory() as memory, RewardRunner(cfg.reward) as rewards, ray_session(cfg.cluster), checkpoints.stop_on_signal():
        rollout, learner = start_actors(cfg, policy_path, **rl_learner_settings(cfg, algorithm, model_path))
        if resume_from:
            learner.load_optimizer(str(resume_from))
            rewards.load_state_dict(state["reward"])
        log = RunLogger(run_dir, cfg.logger, OmegaConf.to_container(cfg, resolve=True), cfg.name, state["step"], steps)
        if resume_from:
            log.write(f"resumed from {resume_from} (step {state['step']})")
        elif cfg.trainer.eval_before:
            before = evaluate(rollout, rewards, eval_set, cfg.rollout)
            log.log(0, before)  # step 0 of the held-out curve
            state["accuracy_before"] = before["eval/accuracy"]
            log.write(f"held-out accuracy before training: {state['accuracy_before']:.1%}")

        for step in range(state["step"] + 1, steps + 1):
            timer = StepTimer()
            prompts = [train_set[i] for i in sampler.take(cfg.trainer.prompts_per_step)]
            seed = cfg.trainer.seed * 100_003 + step
            trajectories, metrics = generate_and_score(rollout, rewards, algorithm.program, dataclasses.replace(sampling, seed=seed), prompts, timer)
            if algorithm.sampling_rounds > 1:  # dynamic sampling (DAPO): refill dropped groups
                def sample_more(n: int, round_: int) -> list[Trajectory]:
                    more = [train_set[i] for i in sampler.take(n)]
                    extra = dataclasses.replace(sampling, seed=seed + round_ * 1_000_000_007)
                    return generate_and_score(rollout, rewards, algorithm.program, extra, more, timer)[0]

                trajectories, filled = refill_groups(trajectories, sample_more, cfg.trainer.prompts_per_step, algorithm.sampling_rounds)
                metrics |= filled
            batch = build_batch(trajectories, tokenizer.pad_token_id, cfg.learner.num_ranks * algorithm.mini_batches)
            with rollout.asleep():
                with timer("old_logprob"):
                    metrics |= learner.compute_logprobs(batch, algorithm)
                batch["advantages"] = algorithm.advantages(batch)  # may read ref_logp (REINFORCE++'s KL in the reward)
                with timer("update"):
                    metrics |= learner.update(batch, algorithm)
                if cfg.trainer.log_policy_shift:
                    with timer("policy_shift"):
                        metrics |= learner.policy_shift(batch)
            with timer("sync"):
                rollout.load_weights(learner.export_weights())
            metrics |= response_metrics(batch, trajectories) | timer.metrics(tokens=float(batch["response_mask"].sum()))
            if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 and step < steps:
                metrics |= evaluate(rollout, rewards, eval_set, cfg.rollout)
            log.log(step, metrics)
            if checkpoints.due(step, steps):
                checkpoints.save(step, learner, {"sampler": sampler.state_dict(), "reward": rewards.state_dict(), "accuracy_before": state["accuracy_before"]}, model_path)
                checkpoints.stop_if_asked()

        summary = {"steps": steps, "eval/accuracy_before": state["accuracy_before"],
                   "actor_nodes": {"rollout": rollout.nodes(), "learner": learner.nodes()}}
        if cfg.trainer.eval_after:
            after = evaluate(rollout, rewards, eval_set, cfg.rollout)
            log.log(steps, after)
            summary |= {"eval/accuracy_after": after["eval/accuracy"], "eval/length_after": after["eval/length_mean"]}
            log.write(f"held-out accuracy after training:  {after['eval/accuracy']:.1%} (before: {fmt_pct(state['accuracy_before'])})")
        log.close()
    summary |= {"final_model": str(checkpoints.publish_final()), "wall_time_s": round(time.time() - started, 1),
                "peak_memory_gib": round(memory.peak_gib, 2)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def generate_and_score(rollout, rewards, program: str, sampling: SamplingParams, prompts, timer) -> tuple[list[Trajectory], dict]:
    """K samples per prompt, with their rewards filled in; the reward metrics and the share of
    groups whose rewards differ (all-equal groups give GRPO nothing to learn from)."""
    with timer("generate"):
        trajectories = rollout.generate(prompts, program, sampling)
    with timer("reward"):
        metrics = rewards.score(trajectories)
    return trajectories, metrics | {"sampling/informative_frac": informative_frac(trajectories)}


def start_actors(cfg, policy_path: str, **learner_settings) -> tuple[RolloutGroup, LearnerGroup | None]:
    """Rollout workers, then learner ranks, both on policy_path, where plan_placement puts them,
    with thread_counts' threads; `rlcore train`, `sft` and `eval` start theirs here. Rollout first:
    vLLM sizes its memory from what is free. `learner_settings`: the rest of LearnerGroup's
    arguments, which differ by command (ref_path, temperature, batch_size, mini_batches,
    total_optimizer_steps, seed); none (`rlcore eval`): rollout workers only, learner None."""
    ranks = cfg.learner.num_ranks if learner_settings else 0
    rollout_threads, learner_threads = thread_counts(cfg.cluster, cfg.rollout.num_workers, max(ranks, 1))
    placement = plan_placement(cfg.cluster, cfg.rollout.num_workers, cfg.rollout.vllm.tensor_parallel_size, ranks)
    rollout = RolloutGroup(
        policy_path, cfg.model.dtype, cfg.rollout, cfg.cluster, longest_request(cfg), rollout_threads, placement.rollout
    )
    if not learner_settings:
        return rollout, None
    learner = LearnerGroup(
        model_path=policy_path, dtype=cfg.model.dtype, learner_cfg=cfg.learner, cluster_cfg=cfg.cluster,
        threads=learner_threads, actor_options=placement.learner, **learner_settings,
    )
    return rollout, learner


def rl_learner_settings(cfg, algorithm, model_path: str) -> dict:
    """start_actors' learner settings for `rlcore train`: the reference (the starting model)
    when the algorithm needs one, and a schedule of steps × mini-batches × epochs optimizer steps."""
    return dict(
        ref_path=model_path if algorithm.needs_reference else None, temperature=cfg.rollout.temperature,
        batch_size=cfg.trainer.prompts_per_step * algorithm.samples_per_prompt, mini_batches=algorithm.mini_batches,
        total_optimizer_steps=cfg.trainer.steps * algorithm.mini_batches * algorithm.epochs, seed=cfg.trainer.seed,
    )


def evaluate(rollout, rewards, prompts, rollout_cfg) -> dict:
    """Greedy held-out accuracy (one sample per prompt), per bucket too, and mean response length."""
    return greedy_metrics(greedy_responses(rollout, rewards, prompts, rollout_cfg))


def greedy_responses(rollout, rewards, prompts, rollout_cfg, program: str | None = None) -> list[Trajectory]:
    """One greedy response per prompt from `program` (default: rollout.eval_program), scored (the
    accuracy gate left alone), in prompt order."""
    greedy = SamplingParams(n=1, max_new_tokens=rollout_cfg.eval_max_new_tokens, temperature=0.0)
    responses = rollout.generate(prompts, program or rollout_cfg.eval_program, greedy)
    rewards.score(responses, train=False)
    return sorted(responses, key=lambda t: t.group_id)


def greedy_metrics(responses: list[Trajectory]) -> dict:
    """eval/accuracy, eval/accuracy/<bucket> for prompts whose metadata names a bucket (RPT's
    entropy buckets, rlcore.rpt; data.bucket_by), length_metrics("eval", …) and trace_metrics("eval", …)."""
    buckets = [t.prompt.metadata.get("bucket") for t in responses]
    accuracy = means_by_label("eval/accuracy", [t.accuracy for t in responses], buckets)
    return accuracy | length_metrics("eval", responses) | trace_metrics("eval", responses)


def length_metrics(prefix: str, trajectories: list[Trajectory]) -> dict:
    """<prefix>/length_mean and <prefix>/truncated_frac (the share cut at the token limit); with
    stated target lengths (L1, data.target_length) also <prefix>/length_mean/target_<n> and
    <prefix>/target_error = mean |length − target|."""
    lengths = [len(t.response_ids) for t in trajectories]
    truncated = {f"{prefix}/truncated_frac": mean(t.finish_reason == "length" for t in trajectories)}
    targets = [t.prompt.metadata.get("target_length") for t in trajectories]
    if any(target is None for target in targets):
        return {f"{prefix}/length_mean": mean(lengths)} | truncated
    by_target = means_by_label(f"{prefix}/length_mean", lengths, [f"target_{n}" for n in targets])
    return by_target | truncated | {f"{prefix}/target_error": mean(abs(n - target) for n, target in zip(lengths, targets))}


def trace_metrics(prefix: str, trajectories: list[Trajectory]) -> dict:
    """<prefix>/<key>: the mean of each number the rollout program recorded in Trajectory.trace
    (fork_join: critical_path, total_steps, concurrency, workers, max_pool; also per bucket, as
    accuracy), and <prefix>/format_error_frac."""
    buckets = [t.prompt.metadata.get("bucket") for t in trajectories]
    metrics = {}
    for key, value in trajectories[0].trace.items():
        if key == "format_error":
            metrics[f"{prefix}/format_error_frac"] = mean(bool(t.trace[key]) for t in trajectories)
        elif isinstance(value, float):
            metrics |= means_by_label(f"{prefix}/{key}", [t.trace[key] for t in trajectories], buckets)
    return metrics


def response_metrics(batch, trajectories) -> dict:
    """The training batch's lengths and share cut at max_new_tokens (length_metrics: per stated
    target too, sampled, where eval/ is greedy), trace_metrics, and how far the engine's
    log-probs are from the learner's."""
    mask = batch["response_mask"]
    diff = batch["old_logp"] - batch["rollout_logp"]  # learner − engine, same weights, same tokens
    mismatch = diff.abs() * mask
    return length_metrics("response", trajectories) | trace_metrics("response", trajectories) | {
        "response/length_max": float(batch["response_lengths"].max()),
        "rollout/logp_mismatch_mean": float(mismatch.sum() / mask.sum().clamp(min=1)),
        "rollout/logp_mismatch_max": float(mismatch.max()),
        # KL(engine ‖ learner) on the engine's own samples (k3 estimator): ~0 when the weight
        # sync worked and both compute the same distribution.
        "rollout/gen_kl_error": float(((diff.exp() - 1 - diff) * mask).sum() / mask.sum().clamp(min=1)),
    }


def fmt_pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"
