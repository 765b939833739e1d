"""Hybrid thinking (SPEC §2) around HGPO: the mixed task, the HFT cold start (completions, added
tokens), the forced-mode rollout programs on a real (tiny) model, and the eval's Hybrid Accuracy."""

import re
from types import SimpleNamespace

import pytest
import torch
from conftest import compose
from omegaconf import OmegaConf

from rlcore.arith import column_addition_completion
from rlcore.batch import Trajectory, build_batch
from rlcore.config import ConfigError, DataConfig, HybridEvalSettings, validate_hybrid_eval
from rlcore.data import Prompt, apply_template, load_splits, reasoning_gym_rows
from rlcore.evaluate import held_out_metrics
from rlcore.hybrid import NO_MODE, NO_THINK, THINK, hft_completion, mode_tag_ids, response_mode
from rlcore.hybrid_eval import hybrid_evaluate, right_modes
from rlcore.metrics import means_by_label
from rlcore.models import load_model, load_tokenizer, response_logprobs
from rlcore.reward import Sample
from rlcore.rewards.math import math_correct
from rlcore.rollout.engine import SamplingParams
from rlcore.rollout.programs import PROGRAMS, check_program
from rlcore.sft import with_added_tokens
from rlcore.trainer import evaluate, greedy_responses

NO_THINK_TOKENS = ["<no_think>", "</no_think>"]


@pytest.fixture(scope="module")
def hybrid_model(tiny_model, tmp_path_factory):
    """The tiny model after the HFT cold start's token step."""
    return with_added_tokens(tiny_model, NO_THINK_TOKENS, tmp_path_factory.mktemp("hybrid_model"))


# ---- the mixed task ---------------------------------------------------------------------------


def terms(question):
    return re.findall(r"\d+", question)


def test_arith_mix_labels_difficulty_by_digits():
    rows = reasoning_gym_rows("arith_mix", 400, 1, {})
    easy = [r for r in rows if r["metadata"]["difficulty"] == "easy"]
    hard = [r for r in rows if r["metadata"]["difficulty"] == "hard"]
    assert len(easy) + len(hard) == 400 and 160 < len(easy) < 240
    # reasoning-gym's d digits: terms in 0..10^d
    assert {r["metadata"]["num_digits"] for r in easy} == {1} and all(int(t) <= 10 for r in easy for t in terms(r["question"]))
    assert {r["metadata"]["num_digits"] for r in hard} == {2, 3} and max(int(t) for r in hard for t in terms(r["question"])) > 100
    assert all(2 <= len(terms(r["question"])) <= 3 and int(r["answer"]) == sum(map(int, terms(r["question"]))) for r in rows)
    # The difficulty draw is independent of the parts' own (number of terms): both counts occur in easy.
    two_terms = sum(len(terms(r["question"])) == 2 for r in easy) / len(easy)
    assert 0.35 < two_terms < 0.65


@pytest.mark.parametrize("share, label", [(0.0, "hard"), (1.0, "easy")])
def test_arith_mix_share(share, label):
    assert {r["metadata"]["difficulty"] for r in reasoning_gym_rows("arith_mix", 50, 1, {"easy_share": share})} == {label}


@pytest.mark.parametrize("args, message", [
    ({"easy_share": 1.5}, "easy_share=1.5 must be in"),
    ({"hard_min_digits": 1}, "hard_min_digits=1"),
    ({"nope": 1}, "data.task='arith_mix'"),
])
def test_arith_mix_bad_args(args, message):
    with pytest.raises(ConfigError, match=message):
        reasoning_gym_rows("arith_mix", 10, 1, args)


def test_arith_mix_config_gives_tagged_disjoint_splits(tiny_model):
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load("configs/data/arith_mix.yaml"), {"train_size": 600, "eval_size": 100})
    train, held_out = load_splits(cfg, load_tokenizer(tiny_model))
    assert not {p.text for p in train} & {p.text for p in held_out}
    assert {p.metadata["difficulty"] for p in held_out} == {"easy", "hard"}


# ---- HFT cold start ---------------------------------------------------------------------------


def test_hft_completion_by_difficulty():
    hard = Prompt("h", "Calculate 814 + 707.", "1521", metadata={"difficulty": "hard"})
    easy = Prompt("e", "Calculate 4 + 1 + 7.", "12", metadata={"difficulty": "easy"})
    assert hft_completion(hard) == column_addition_completion(hard)
    assert hft_completion(easy) == "<no_think>\\boxed{12}</no_think>"
    assert math_correct(Sample(easy.text, hft_completion(easy), "12")) == 1.0
    with pytest.raises(ConfigError, match="needs prompts tagged metadata"):
        hft_completion(Prompt("x", "Calculate 1 + 2.", "3", metadata={"difficulty": {"num_digits": (1, 1)}}))


def test_added_tokens_resize_the_model(tiny_model, hybrid_model):
    old_tok, new_tok = load_tokenizer(tiny_model), load_tokenizer(hybrid_model)
    assert len(new_tok) == len(old_tok) + 2
    ids = [new_tok(t, add_special_tokens=False)["input_ids"] for t in NO_THINK_TOKENS]
    assert all(len(i) == 1 and i[0] >= len(old_tok) for i in ids)
    text = "<no_think>\\boxed{12}</no_think>"
    assert new_tok.decode(new_tok(text, add_special_tokens=False)["input_ids"], skip_special_tokens=True) == text
    old, new = load_model(tiny_model).get_input_embeddings().weight, load_model(hybrid_model).get_input_embeddings().weight
    assert new.shape == (len(new_tok), old.shape[1])
    torch.testing.assert_close(new[: len(old_tok)], old)
    assert load_model(hybrid_model).get_output_embeddings().weight.shape[0] == len(new_tok)
    # a model that has them already is used as it is
    assert with_added_tokens(hybrid_model, NO_THINK_TOKENS, hybrid_model + "_unused") == hybrid_model


def test_added_tokens_refuse_empty(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="sft.add_tokens"):
        with_added_tokens(tiny_model, ["<a>", " "], tmp_path)


def test_sft_recipe_composes():
    cfg = compose("sft", ["recipe=sft_hybrid"])
    assert list(cfg.sft.add_tokens) == NO_THINK_TOKENS and cfg.sft.completion_fn == "rlcore.hybrid:hft_completion"
    assert cfg.data.task == "arith_mix" and cfg.learner.lr_schedule == "cosine" and not cfg.sft.from_scratch


# ---- modes and the forced-mode rollout programs ----------------------------------------------


def test_mode_tags(tiny_model, hybrid_model):
    tok = load_tokenizer(hybrid_model)
    tags = mode_tag_ids(tok)
    assert tok.convert_ids_to_tokens([tags[THINK], tags[NO_THINK]]) == ["<think>", "<no_think>"]
    assert [response_mode(r, tags) for r in ([tags[THINK], 5], [tags[NO_THINK]], [5, tags[THINK]], [])] == [THINK, NO_THINK, NO_MODE, NO_MODE]
    with pytest.raises(ConfigError, match="splits the mode tag '<no_think>'"):
        mode_tag_ids(load_tokenizer(tiny_model))


def test_check_program(tiny_model, hybrid_model):
    for name in ("hybrid", "think", "no_think"):
        with pytest.raises(ConfigError, match="start from an HFT model"):
            check_program(name, load_tokenizer(tiny_model))
        check_program(name, load_tokenizer(hybrid_model))
    check_program("single", load_tokenizer(tiny_model))


@pytest.fixture(scope="module")
def engine(hybrid_model):
    from rlcore.rollout.hf import HFRolloutEngine

    return HFRolloutEngine(hybrid_model)


def prompts_for(engine, texts):
    cfg = OmegaConf.structured(DataConfig)
    return [Prompt(str(i), t, "0", token_ids=apply_template(engine.tokenizer, t, cfg)) for i, t in enumerate(texts)]


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_hybrid_program_forces_half_of_each_group_into_each_mode(engine, temperature):
    prompts = prompts_for(engine, ["Calculate 4 + 1.", "Calculate 814 + 707 + 965.", "Calculate 12 + 3."])
    sampling = SamplingParams(n=4, max_new_tokens=6, temperature=temperature, seed=3)
    trajectories = PROGRAMS["hybrid"](engine, prompts, sampling)
    tags = mode_tag_ids(engine.tokenizer)
    assert [(t.group_id, t.mode) for t in trajectories] == [(g, m) for g in range(3) for m in (THINK, THINK, NO_THINK, NO_THINK)]
    assert all(t.response_ids[0] == tags[t.mode] and 1 < len(t.response_ids) <= 6 for t in trajectories)
    assert all(t.text.startswith({THINK: "<think>", NO_THINK: "<no_think>"}[t.mode]) for t in trajectories)
    # The forced tag's rollout log-prob is the engine's score of it, so every response token's,
    # tag included, matches the learner's recomputation (greedy: at temperature 1, like the engine's).
    batch = build_batch(trajectories, engine.tokenizer.pad_token_id)
    assert batch["modes"].tolist() == [t.mode for t in trajectories]
    learner = response_logprobs(engine.model, batch, temperature or 1.0)[0]
    mask = batch["response_mask"]
    torch.testing.assert_close(batch["rollout_logp"] * mask, learner * mask, atol=1e-4, rtol=1e-4)
    assert torch.all(batch["rollout_logp"][:, 0] < 0)


def test_single_mode_programs_and_odd_n(engine):
    prompts = prompts_for(engine, ["Calculate 4 + 1.", "Calculate 81 + 7."])
    tags = mode_tag_ids(engine.tokenizer)
    for name, mode in (("think", THINK), ("no_think", NO_THINK)):
        out = PROGRAMS[name](engine, prompts, SamplingParams(n=2, max_new_tokens=4, temperature=0.0))
        assert [(t.group_id, t.mode, t.response_ids[0]) for t in out] == [(g, mode, tags[mode]) for g in (0, 0, 1, 1)]
    with pytest.raises(ValueError, match="evenly between two modes; got n=3"):
        PROGRAMS["hybrid"](engine, prompts, SamplingParams(n=3))


def test_build_batch_modes_default_to_none():
    p = Prompt("p", "q", "a", token_ids=[5, 6])
    batch = build_batch([Trajectory(p, [1], [0.0], "", "stop"), Trajectory(p, [1, 2], [0.0, 0.0], "", "stop", mode=THINK)], pad_id=0)
    assert batch["modes"].tolist() == [NO_MODE, THINK]


# ---- Hybrid Accuracy --------------------------------------------------------------------------


def forced(group, mode, reward, length):
    t = Trajectory(Prompt("p", "q", "a"), [0] * length, [0.0] * length, "", "stop", group_id=group, mode=mode)
    t.reward = reward
    return t


def test_right_modes_hand_cases():
    samples = [
        forced(0, THINK, 1.0, 30), forced(0, THINK, 1.0, 30), forced(0, NO_THINK, 1.0, 5), forced(0, NO_THINK, 0.0, 5),  # think better
        forced(1, THINK, 0.0, 30), forced(1, THINK, 1.0, 30), forced(1, NO_THINK, 1.0, 5), forced(1, NO_THINK, 1.0, 5),  # no-think better
        forced(2, THINK, 1.0, 30), forced(2, THINK, 1.0, 30), forced(2, NO_THINK, 1.0, 5), forced(2, NO_THINK, 1.0, 5),  # tie → shorter
        forced(3, THINK, 0.0, 4), forced(3, THINK, 0.0, 6), forced(3, NO_THINK, 0.0, 9), forced(3, NO_THINK, 0.0, 9),   # tie → shorter
        forced(4, THINK, 0.0, 7), forced(4, NO_THINK, 0.0, 7),                                                          # all tie → no-think
    ]
    assert right_modes(samples, 5, tie_margin=0.0) == [THINK, NO_THINK, NO_THINK, THINK, NO_THINK]
    # a margin of 0.5 makes prompts 0 and 1 near-ties: the shorter mode (no-think) wins both
    assert right_modes(samples, 5, tie_margin=0.5) == [NO_THINK, NO_THINK, NO_THINK, THINK, NO_THINK]


def test_means_by_label():
    got = means_by_label("m", [0, 1, 1, 1, 0], ["hard", "easy", "hard", {"ranges": 1}, None])
    assert got == {"m": 0.6, "m/easy": 1.0, "m/hard": 0.5} and list(got) == ["m", "m/easy", "m/hard"]


class FakeRollout:
    """Scripted responses: per prompt, the free greedy response's tag, and which forced modes answer right."""

    def __init__(self, tags, free, right_in):
        self.tags, self.free, self.right_in, self.calls = tags, free, right_in, []

    def generate(self, prompts, program, sampling):
        self.calls.append((program, sampling.n, sampling.temperature))
        if program == "hybrid":
            return [self.response(g, m, m in self.right_in[g]) for g in range(len(prompts)) for m in (THINK, NO_THINK)
                    for _ in range(sampling.n // 2)]
        return [self.response(g, self.free[g] if program == "single" else {"think": THINK}[program], True) for g in range(len(prompts))][::-1]

    def response(self, group, mode, right):
        ids = [self.tags[mode]] + [7] * (20 if mode == THINK else 3)
        return Trajectory(Prompt("p", "q", "a"), ids, [0.0] * len(ids), "right" if right else "wrong", "stop", group_id=group, mode=mode)


class FakeRewards:
    def score(self, trajectories, train=True):
        assert not train
        for t in trajectories:
            t.reward = t.accuracy = float(t.text == "right")
        return {}


def eval_cfg(temperature, **hybrid):
    """What held_out_metrics reads of an `rlcore eval` config."""
    rollout = OmegaConf.create({"eval_max_new_tokens": 32, "eval_program": "single", "temperature": temperature, "top_p": 1.0})
    return SimpleNamespace(rollout=rollout, hybrid=HybridEvalSettings(enabled=True, **hybrid))


def test_hybrid_eval_hacc_from_the_one_free_greedy_pass():
    tags = {THINK: 281, NO_THINK: 283}
    prompts = [Prompt(str(i), "q", "a", metadata={"difficulty": d}) for i, d in enumerate(["easy", "hard", "hard"])]
    # p0: both modes right → tie → no-think (shorter) is right, chosen ✓; p1: only think right, chosen ✓;
    # p2: only think right, chose no-think ✗.
    rollout = FakeRollout(tags, free=[NO_THINK, THINK, NO_THINK], right_in=[{THINK, NO_THINK}, {THINK}, {THINK}])
    got = held_out_metrics(rollout, FakeRewards(), prompts, eval_cfg(0.7, samples_per_mode=3), tags)
    assert rollout.calls == [("single", 1, 0.0), ("hybrid", 6, 0.7)]  # one greedy pass, for eval/* and eval/hybrid/*
    assert got["eval/hacc"] == pytest.approx(2 / 3) and got["eval/hacc/easy"] == 1.0 and got["eval/hacc/hard"] == 0.5
    assert got["eval/hybrid/think_share/easy"] == 0.0 and got["eval/hybrid/think_share/hard"] == 0.5
    assert got["eval/hybrid/no_think_share"] == pytest.approx(2 / 3)
    assert got["eval/hybrid/length_mean/easy"] == 4 and got["eval/hybrid/length_mean/hard"] == 12.5
    assert got["eval/hybrid/accuracy"] == got["eval/accuracy"] == 1.0
    assert got["eval/hybrid/length_mean"] == got["eval/length_mean"] == pytest.approx(29 / 3)


def test_hybrid_eval_forced_mode_has_no_hacc():
    """eval/* stays the free greedy pass; eval/hybrid/* is the forced one."""
    tags = {THINK: 281, NO_THINK: 283}
    rollout = FakeRollout(tags, free=[NO_THINK], right_in=[set()])
    got = held_out_metrics(rollout, FakeRewards(), [Prompt("0", "q", "a", metadata={"difficulty": "easy"})],
                           eval_cfg(1.0, mode="think"), tags)
    assert rollout.calls == [("single", 1, 0.0), ("think", 1, 0.0)] and "eval/hacc" not in got
    assert got["eval/hybrid/think_share/easy"] == 1.0 and got["eval/hybrid/length_mean"] == 21
    assert got["eval/length_mean"] == 4


class InProcessRollout:
    """RolloutGroup's generate on one engine in this process."""

    def __init__(self, engine):
        self.engine = engine

    def generate(self, prompts, program, sampling):
        return PROGRAMS[program](self.engine, prompts, sampling)


def test_hybrid_eval_generates_the_greedy_pass_once(engine, monkeypatch):
    """On a real engine: one greedy engine call where there were two, and the metrics of the
    former separate passes (training's evaluate, then hybrid_evaluate's own greedy pass)."""
    prompts = prompts_for(engine, ["Calculate 4 + 1.", "Calculate 814 + 707 + 965.", "Calculate 12 + 3."])
    cfg, tags, rollout = eval_cfg(0.7, samples_per_mode=1), mode_tag_ids(engine.tokenizer), InProcessRollout(engine)
    cfg.rollout.eval_max_new_tokens = 8
    separate = evaluate(rollout, FakeRewards(), prompts, cfg.rollout) | hybrid_evaluate(
        rollout, FakeRewards(), prompts, greedy_responses(rollout, FakeRewards(), prompts, cfg.rollout), cfg.rollout, cfg.hybrid, tags)
    temperatures = []
    generate = engine.generate
    monkeypatch.setattr(engine, "generate", lambda ids, sampling: temperatures.append(sampling.temperature) or generate(ids, sampling))
    assert held_out_metrics(rollout, FakeRewards(), prompts, cfg, tags) == separate
    assert temperatures == [0.0, 0.7]  # the greedy pass, then HAcc's sampled one


@pytest.mark.parametrize("override, message", [
    ("hybrid.mode=sometimes", "hybrid.mode='sometimes' is not allowed"),
    ("hybrid.samples_per_mode=0", "hybrid.samples_per_mode=0 must be > 0"),
    ("hybrid.tie_margin=-0.1", "hybrid.tie_margin=-0.1 must be ≥ 0"),
])
def test_hybrid_eval_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        validate_hybrid_eval(compose("eval", ["hybrid.enabled=true", override]))
