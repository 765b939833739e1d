"""The whole loop through Ray: 1 rollout worker, 2 DeepSpeed ranks, 2 steps."""

import json

import pytest

from conftest import FAST, compose
from rlcore.trainer import train


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_steps_two_ranks(tiny_model, tmp_path, zero_stage):
    cfg = compose("train", [
        "recipe=grpo_math", f"model.path={tiny_model}", f"run_dir={tmp_path}", *FAST,
        "trainer.steps=2", "learner.num_ranks=2", f"learner.zero_stage={zero_stage}", "learner.micro_batch_size=4",
        "trainer.eval_before=false", "algorithm.kl_coef=0.01",  # exercises the reference model too
        "reward.fns=[user_rewards:varies_with_text]", "reward.accuracy=user_rewards:varies_with_text",
    ])
    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/step" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        # the rollout engine and the learner hold the same weights at every step (synced after each update)
        assert r["rollout/logp_mismatch_max"] < 1e-4
        assert r["grad_norm"] > 0 and "kl_ref" in r
    assert summary["eval/accuracy_after"] is not None
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_group_reward_gate_and_policy_shift_through_the_loop(tiny_model, tmp_path):
    """opo_math_short's reward (correctness + Short-RL group term + accuracy gate) and OPO's
    policy-shift metric in a real run; the gate's running maximum is saved in checkpoints."""
    cfg = compose("train", [
        "recipe=opo_math_short", f"model.path={tiny_model}", f"run_dir={tmp_path}", *FAST,
        "trainer.steps=2", "trainer.eval_before=false", "trainer.eval_every=0", "trainer.checkpoint_every=1",
        "reward.fns=[user_rewards:varies_with_text,short_rl]", "reward.accuracy=user_rewards:varies_with_text",
    ])
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/step" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert "reward/short_rl" in r and r["reward/gate_open"] in (0.0, 1.0)
        assert r["policy_shift"] > 0  # the update moved the policy
    state = json.loads((tmp_path / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert state["reward"]["max_accuracy"] == max(r["accuracy"] for r in steps)
