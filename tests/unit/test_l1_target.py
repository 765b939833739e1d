"""L1's target lengths (data.target_length, SPEC §3): drawn per row, fixed by the split's seed,
stated in the prompt, carried in metadata to the l1_length reward; bad settings are one-line errors."""

import json
from types import SimpleNamespace

import pytest
from conftest import compose
from omegaconf import OmegaConf

from rlcore.batch import Trajectory, build_batch
from rlcore.config import ConfigError, DataConfig, RewardConfig, validate_common
from rlcore.data import Prompt, load_splits
from rlcore.models import load_tokenizer
from rlcore.reward import RewardRunner
from rlcore.trainer import evaluate, response_metrics

CHOICES = [24, 40, 56]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def rows_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("l1") / "d.jsonl"
    path.write_text("".join(json.dumps({"question": f"Calculate {a} + 7.", "answer": str(a + 7)}) + "\n" for a in range(40)))
    return str(path)


def splits(tokenizer, path, **kw):
    """(train, held-out): the last 10 rows held out."""
    base = {"source": "hf", "path": path, "eval_size": 10, "target_length": {"choices": CHOICES}}
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), base, kw)
    return load_splits(cfg, tokenizer)


def targets(prompts):
    return [p.metadata["target_length"] for p in prompts]


def test_targets_deterministic_from_choices_and_per_split_seed(tokenizer, rows_path):
    train, held_out = splits(tokenizer, rows_path)
    assert len(train) == 30 and len(held_out) == 10  # every row, train and held out, has a target
    assert set(targets(train)) == set(CHOICES) and set(targets(held_out)) <= set(CHOICES)
    again_train, again_held_out = splits(tokenizer, rows_path)  # a resumed run, or `rlcore eval`
    assert targets(again_train) == targets(train) and targets(again_held_out) == targets(held_out)
    # the train split's seed draws the train targets only
    other_train, same_held_out = splits(tokenizer, rows_path, train_seed=2)
    assert targets(other_train) != targets(train) and targets(same_held_out) == targets(held_out)


def test_prompt_states_its_target(tokenizer, rows_path):
    train, held_out = splits(tokenizer, rows_path, target_length={"instruction": "Use {target} tokens."})
    for p in train + held_out:
        shown = tokenizer.decode(p.token_ids)
        assert f"{p.text} Use {p.metadata['target_length']} tokens." in shown
        assert p.text.startswith("Calculate") and "tokens" not in p.text  # the question alone, for completion fns


def test_off_by_default(tokenizer, rows_path):
    train, held_out = splits(tokenizer, rows_path, target_length={"choices": []})
    assert not any("target_length" in p.metadata or "tokens" in tokenizer.decode(p.token_ids) for p in train + held_out)


def test_cli_override_and_recipe():
    cfg = compose("train", ["recipe=l1_math", "data.target_length.choices=[16,32,64]"])
    assert list(cfg.data.target_length.choices) == [16, 32, 64] and list(cfg.reward.fns) == ["math", "l1_length"]
    assert cfg.reward.options.l1_length.alpha == 0.02
    validate_common(cfg)


def test_tied_start_recipes():
    """sft_arith_l1_tied writes the target-tied afterword; l1_math_tied trains from its model."""
    sft = compose("sft", ["recipe=sft_arith_l1_tied"])
    assert sft.sft.completion_fn == "rlcore.arith:column_addition_completion_afterword_tied"
    assert list(sft.data.target_length.choices) == [32, 60]
    train = compose("train", ["recipe=l1_math_tied"])
    assert train.model.path == "runs/sft_arith_l1_tied/final" and list(train.reward.fns) == ["math", "l1_length"]


@pytest.mark.parametrize("overrides, match", [
    (["data.target_length.choices=[0,32]"], r"data.target_length.choices=\[0, 32\]: each target must be in \[1, rollout.max_new_tokens=64\]"),
    (["data.target_length.choices=[100]"], r"rollout.max_new_tokens=64"),
    (["data.target_length.instruction=Be brief."], "data.target_length.instruction='Be brief.' must state the target"),
    (["data.target_length.instruction='About {n} tokens.'"], "data.target_length.instruction='About {n} tokens.' must state the target"),
    (["data.target_length.choices=[]"], "reward.fns has l1_length but data.target_length.choices is empty"),
])
def test_bad_settings_are_one_line_errors(overrides, match):
    cfg = compose("train", ["recipe=l1_math", *overrides])
    with pytest.raises(ConfigError, match=match) as e:
        validate_common(cfg)
    assert "\n" not in str(e.value)


def test_l1_reward_on_a_built_prompt(tokenizer, rows_path):
    prompt = splits(tokenizer, rows_path)[0][0]
    assert prompt.metadata["target_length"] == 56  # row 0's draw with train_seed 1
    trajs = [Trajectory(prompt, [1] * n, [0.0] * n, rf"\boxed{{{answer}}}", "stop") for n, answer in ((46, 7), (70, 7), (46, 8))]
    cfg = OmegaConf.structured(RewardConfig(fns=["math", "l1_length"], options={"l1_length": {"alpha": 0.02}}, num_workers=1))
    with RewardRunner(cfg) as runner:
        runner.score(trajs)
    # 1[correct] − 0.02·|56 − n|: right at 10 short, right at 14 long, wrong at 10 short
    assert [t.reward for t in trajs] == pytest.approx([0.8, 0.72, -0.2])


def test_evaluate_reports_length_per_stated_target():
    """L1 prompts (metadata.target_length): mean greedy length per target and the mean miss."""
    prompts = [Prompt(f"p{i}", "q", "1", metadata={"target_length": t}) for i, t in enumerate([2, 2, 8])]
    lengths = {"p0": 2, "p1": 4, "p2": 5}

    class Rollout:
        def generate(self, prompts, program, sampling):
            return [Trajectory(p, [7] * lengths[p.id], [0.0] * lengths[p.id], "\\boxed{1}", "stop") for p in prompts]

    with RewardRunner(OmegaConf.structured(RewardConfig(fns=["math"], num_workers=1))) as rewards:
        result = evaluate(Rollout(), rewards, prompts, SimpleNamespace(eval_max_new_tokens=8, eval_program="single"))
    assert result["eval/length_mean"] == pytest.approx(11 / 3)
    assert result["eval/length_mean/target_2"] == 3.0 and result["eval/length_mean/target_8"] == 5.0
    assert result["eval/target_error"] == pytest.approx((0 + 2 + 3) / 3)


def test_training_batch_reports_sampled_length_per_stated_target():
    """The same split for the sampled training batch (response/*), where the L1 signal shows
    before greedy eval crosses over; the engine/learner gap is read from the same batch."""
    prompts = [Prompt(f"p{i}", "q", "1", token_ids=[5, 6], metadata={"target_length": t}) for i, t in enumerate([2, 8])]
    trajs = [Trajectory(prompts[i], [7] * n, [-0.5] * n, "", "stop") for i, n in ((0, 1), (0, 5), (1, 6))]
    batch = build_batch(trajs, pad_id=0)
    batch["old_logp"] = batch["rollout_logp"] + 0.25 * batch["response_mask"]
    result = response_metrics(batch, trajs)
    assert result["response/length_mean"] == pytest.approx(4.0) and result["response/length_max"] == 6.0
    assert result["response/length_mean/target_2"] == 3.0 and result["response/length_mean/target_8"] == 6.0
    assert result["response/target_error"] == pytest.approx((1 + 3 + 2) / 3)
    assert result["rollout/logp_mismatch_mean"] == pytest.approx(0.25)
