"""AsyncThink (SPEC §6): the fork/join clock against SPEC's critical-path formula and a step
loop, the fork_join program on a scripted engine and on a real (tiny) model, the reward, the
unit advantages against a loop, and the batch rows of organizer/worker units."""

import random
import re

import pytest
import torch
from conftest import compose

from rlcore.algorithm import build_algorithm
from rlcore.algorithms.asyncthink import unit_advantages
from rlcore.algorithms.grpo import grpo_advantages
from rlcore.arith import column_addition_completion
from rlcore.asyncthink import TAG_TOKENS, ForkJoinTrace, final_text, fork_join_tags, organizer_completion
from rlcore.batch import Trajectory, build_batch
from rlcore.config import ConfigError
from rlcore.data import Prompt, apply_template
from rlcore.models import load_tokenizer
from rlcore.reward import Sample
from rlcore.rewards.asyncthink import asyncthink, organizer_correct
from rlcore.rollout.engine import Completion, RolloutEngine, SamplingParams
from rlcore.rollout.hf import HFRolloutEngine
from rlcore.rollout.programs import PROGRAMS, check_program
from rlcore.sft import with_added_tokens


@pytest.fixture(scope="module")
def organizer_model(tiny_model, tmp_path_factory):
    """The tiny model after the cold start's token step (the fork/join tags added)."""
    return with_added_tokens(tiny_model, TAG_TOKENS, tmp_path_factory.mktemp("organizer_model"))


@pytest.fixture(scope="module")
def tokenizer(organizer_model):
    return load_tokenizer(organizer_model)


# ---- the clock ------------------------------------------------------------------------------


def spec_critical_path(fragments, forks, joins_after):
    """SPEC's formula: end_i = max(end_{i−1} + len_i, fork_w + len_w) over workers w joined after fragment i.
    fragments: organizer tokens per fragment; forks: worker → (fork step, length); joins_after[i]: workers joined after fragment i."""
    end = 0
    for length, joined in zip(fragments, joins_after):
        end = max([end + length] + [forks[w][0] + forks[w][1] for w in joined])
    return end


def stepwise_concurrency(forks, T):
    """η by a loop over decoding steps: (1/T)·Σ_t workers running at t."""
    return sum(sum(start <= t < start + length for start, length in forks.values()) for t in range(T)) / T


def test_clock_hand_case():
    """Organizer: 14 tokens, fork 1 (36 tokens); 14, fork 2 (36); 1 (<JOIN-1>); 1 (<JOIN-2>); 40 to the end."""
    trace = ForkJoinTrace()
    trace.think(14), trace.fork(1, 36), trace.think(14), trace.fork(2, 36)
    trace.think(1), trace.join(1)  # waits for worker 1: max(29, 14 + 36) = 50
    trace.think(1), trace.join(2)  # max(51, 28 + 36) = 64
    trace.think(40)
    assert trace.clock == 104 == spec_critical_path([29, 1, 40], {1: (14, 36), 2: (28, 36)}, [[1], [2], []])
    assert trace.concurrency() == pytest.approx(72 / 104)
    assert trace.record() == {"critical_path": 104.0, "total_steps": 70.0 + 72, "concurrency": pytest.approx(72 / 104),
                              "workers": 2.0, "max_pool": 2.0, "format_error": ""}


@pytest.mark.parametrize("seed", range(20))
def test_clock_matches_spec_formula_and_step_loop(seed):
    """Random valid fork/join scripts (ids reused after their join, workers never joined)."""
    rng = random.Random(seed)
    trace, forks, fragments, joins_after = ForkJoinTrace(), {}, [0], [[]]
    running = {}  # worker id → key of its fork in `forks`
    for n in range(rng.randint(1, 12)):
        tokens = rng.randint(0, 20)
        trace.think(tokens)
        fragments[-1] += tokens
        free = [i for i in range(1, 4) if i not in running]
        if free and rng.random() < 0.5:
            worker, length = rng.choice(free), rng.randint(1, 60)
            trace.fork(worker, length)
            forks[n], running[worker] = (trace.clock, length), n
        elif running:
            worker = rng.choice(sorted(running))
            trace.join(worker)
            joins_after[-1].append(running.pop(worker))
            fragments.append(0), joins_after.append([])
    trace.think(1)
    fragments[-1] += 1
    assert not trace.error
    assert trace.clock == spec_critical_path(fragments, forks, joins_after)
    assert trace.concurrency() == pytest.approx(stepwise_concurrency(forks, trace.clock))


def test_clock_format_errors():
    trace = ForkJoinTrace()
    trace.fork(1, 5)
    assert not trace.fork_refused(2) and trace.fork_refused(1) and "duplicate id" in trace.error
    trace = ForkJoinTrace()
    trace.join(3)
    assert "unknown id" in trace.error


# ---- the cold start -------------------------------------------------------------------------


def test_organizer_completion_forks_long_questions_into_halves():
    text = organizer_completion(Prompt("", "Calculate 814 + 707 + 965 + 861.", "3347"))
    assert text.startswith("<FORK-1>Calculate 814 + 707.</FORK-1><FORK-2>Calculate 965 + 861.</FORK-2><JOIN-1>")
    assert "\\boxed{1521}</JOIN-1><JOIN-2>" in text and "\\boxed{1826}</JOIN-2>" in text
    assert final_text(text) == column_addition_completion(Prompt("", "Calculate 1521 + 1826.", ""))
    assert organizer_correct(Sample("", text, "3347")) == 1.0
    short = Prompt("", "Calculate 814 + 707.", "1521")
    assert organizer_completion(short) == column_addition_completion(short)


def test_tags_are_single_tokens_after_the_cold_start(tiny_model, organizer_model, tokenizer):
    tags = fork_join_tags(tokenizer)
    assert len({t for by_worker in tags.ids.values() for t in by_worker.values()}) == len(TAG_TOKENS)
    assert tags.kind_of(tags.ids["JOIN"][3]) == ("JOIN", 3) and tags.kind_of(5) is None
    assert set(tags.stops) == set(tags.ids["/FORK"].values()) | set(tags.ids["JOIN"].values())
    with pytest.raises(ConfigError, match="AsyncThink tag '<FORK-1>'.*recipe=sft_asyncthink"):
        check_program("fork_join", load_tokenizer(tiny_model))
    check_program("fork_join", tokenizer)
    tokenizer.chat_template, template = None, tokenizer.chat_template
    try:
        with pytest.raises(ConfigError, match="^model.path: the tokenizer has no chat template"):
            check_program("fork_join", tokenizer)
    finally:
        tokenizer.chat_template = template


# ---- the program on a scripted engine -------------------------------------------------------


class ScriptedEngine(RolloutEngine):
    """An engine that writes a fixed text for each question and honours the engine contract
    (continue from the given tokens, stop after a stop token or EOS, at most max_new_tokens).
    Default script: organizer_completion — the cold start's organizer and workers."""

    def __init__(self, tokenizer, scripts=None):
        self.tokenizer, self.scripts, self.calls = tokenizer, scripts or {}, []
        self.assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")

    def generate(self, prompts, sampling):
        self.calls.append((len(prompts), sampling))
        out = []
        for ids in prompts:
            start = ids.index(self.assistant) + 1
            question = re.search(r"<\|user\|>(.*?)<\|assistant\|>", self.tokenizer.decode(ids[:start])).group(1)
            text = self.scripts.get(question) or organizer_completion(Prompt("", question, ""))
            full = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            rest, reason = full[len(ids) - start :], "stop"
            stop = next((i + 1 for i, t in enumerate(rest) if t in sampling.stop_token_ids), len(rest))
            rest = rest[:stop]
            if len(rest) > sampling.max_new_tokens:
                rest, reason = rest[: sampling.max_new_tokens], "length"
            out.append([Completion(rest, [-0.5] * len(rest), reason)])
        return out

    def decode(self, token_ids):
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def question(tokenizer, text):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"template": "chat", "system_prompt": None})
    return Prompt("q", text, "", apply_template(tokenizer, text, cfg))


def n_tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_fork_join_program_runs_workers_and_pastes_their_text(tokenizer):
    q = "Calculate 11 + 22 + 33 + 44."
    engine = ScriptedEngine(tokenizer)
    [organizer] = PROGRAMS["fork_join"](engine, [question(tokenizer, q)], SamplingParams(n=1, max_new_tokens=192))
    script = organizer_completion(Prompt("", q, ""))
    assert organizer.response_ids == tokenizer(script, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert organizer.finish_reason == "stop" and organizer.text == script
    # The workers: their sub-queries as prompts, their own responses.
    w1, w2 = organizer.workers
    assert (w1.prompt.text, w2.prompt.text) == ("Calculate 11 + 22.", "Calculate 33 + 44.")
    assert w1.text == column_addition_completion(Prompt("", "Calculate 11 + 22.", "")) and w1.finish_reason == "stop"
    assert w1.prompt.token_ids == question(tokenizer, "Calculate 11 + 22.").token_ids
    # Loss mask 0 exactly on the pasted worker text and </JOIN-i>; log-prob 0 there.
    pasted = [w1.response_ids[:-1] + [tokenizer.convert_tokens_to_ids("</JOIN-1>")],
              w2.response_ids[:-1] + [tokenizer.convert_tokens_to_ids("</JOIN-2>")]]
    masked = [t for t, m in zip(organizer.response_ids, organizer.loss_mask) if not m]
    assert masked == pasted[0] + pasted[1]
    assert all((lp == 0.0) == (not m) for lp, m in zip(organizer.rollout_logp, organizer.loss_mask))
    # The clock: fork 1 after its fork text, fork 2 after its own, a join token each, then the final working.
    f1, f2 = n_tokens(tokenizer, "<FORK-1>Calculate 11 + 22.</FORK-1>"), n_tokens(tokenizer, "<FORK-2>Calculate 33 + 44.</FORK-2>")
    final = n_tokens(tokenizer, final_text(script)) + 1  # + EOS
    L1, L2 = len(w1.response_ids), len(w2.response_ids)
    expected = spec_critical_path([f1 + f2 + 1, 1, final], {1: (f1, L1), 2: (f1 + f2, L2)}, [[1], [2], []])
    assert organizer.trace["critical_path"] == expected
    assert organizer.trace["concurrency"] == pytest.approx(stepwise_concurrency({1: (f1, L1), 2: (f1 + f2, L2)}, expected))
    assert organizer.trace["total_steps"] == f1 + f2 + 2 + final + L1 + L2  # nothing concurrent
    assert organizer.trace["workers"] == 2 and organizer.trace["max_pool"] == 2 and organizer.trace["format_error"] == ""
    # Rounds: organizer (→ </FORK-1>), worker 1, organizer (→ </FORK-2>), worker 2, organizer (→ <JOIN-1>),
    # organizer (→ <JOIN-2>), organizer (→ EOS); every call with its own seed.
    assert len(engine.calls) == 7 and len({s.seed for _, s in engine.calls}) == 7


def test_fork_join_program_groups_and_sequential_questions(tokenizer):
    prompts = [question(tokenizer, "Calculate 11 + 22."), question(tokenizer, "Calculate 1 + 2 + 3 + 4.")]
    out = PROGRAMS["fork_join"](ScriptedEngine(tokenizer), prompts, SamplingParams(n=3, max_new_tokens=192))
    assert [t.group_id for t in out] == [0, 0, 0, 1, 1, 1]
    assert [len(t.workers) for t in out] == [0, 0, 0, 2, 2, 2]
    assert all(w.group_id == t.group_id for t in out for w in t.workers)
    assert out[0].loss_mask == [1] * len(out[0].response_ids) and out[0].trace["critical_path"] == len(out[0].response_ids)
    assert out[0].trace["concurrency"] == 0.0


@pytest.mark.parametrize("script, error", [
    ("<FORK-1>Calculate 1 + 2.</FORK-1><FORK-1>Calculate 3 + 4.</FORK-1> \\boxed{10}", "duplicate id"),
    ("<JOIN-2> \\boxed{10}", "unknown id"),
    ("Calculate 1 + 2.</FORK-1> \\boxed{10}", "must close the one <FORK-1>"),
    ("<FORK-1>Calculate <FORK-2>1 + 2.</FORK-2> \\boxed{10}", "must close the one <FORK-2>"),
    ("<FORK-1>Calculate 1 + 2.</FORK-2> \\boxed{10}", "must close the one <FORK-2>"),
    ("<FORK-1>Calculate 1 + 2.<JOIN-1> \\boxed{10}", "before <JOIN-1>"),
])
def test_fork_join_program_stops_at_format_errors(tokenizer, script, error):
    q = "Calculate 1 + 2 + 3 + 4."
    [t] = PROGRAMS["fork_join"](ScriptedEngine(tokenizer, {q: script}), [question(tokenizer, q)], SamplingParams(max_new_tokens=192))
    assert error in t.trace["format_error"] and t.finish_reason == "stop"
    assert "boxed" not in t.text  # stopped at the error, before the answer
    assert asyncthink(t.sample())["score"] == -1.0


def test_fork_join_program_keeps_the_trace_within_max_new_tokens(tokenizer):
    q = "Calculate 11 + 22 + 33 + 44."
    engine = ScriptedEngine(tokenizer)
    limit = n_tokens(tokenizer, "<FORK-1>Calculate 11 + 22.</FORK-1><FORK-2>Calculate 33 + 44.</FORK-2><JOIN-1>") + 5
    [t] = PROGRAMS["fork_join"](engine, [question(tokenizer, q)], SamplingParams(max_new_tokens=limit))
    assert len(t.response_ids) == limit and t.finish_reason == "length" and t.loss_mask[-5:] == [0] * 5  # the paste, cut


def test_fork_join_program_keeps_workers_within_the_longest_organizer_request(tokenizer):
    """A worker whose prompt is longer than the organizer's writes that much less."""
    q, sub_query = "Calculate 1 + 2 + 3 + 4.", "Calculate 111 + 222 + 333 + 444 + 555."
    engine = ScriptedEngine(tokenizer, {q: f"<FORK-1>{sub_query}</FORK-1><JOIN-1> \\boxed{{10}}"})
    prompt = question(tokenizer, q)
    [t] = PROGRAMS["fork_join"](engine, [prompt], SamplingParams(max_new_tokens=40))
    [worker] = t.workers
    assert worker.finish_reason == "length"
    assert len(worker.prompt.token_ids) + len(worker.response_ids) == len(prompt.token_ids) + 40


# ---- the program on a real model ------------------------------------------------------------


def test_hf_engine_stops_at_stop_tokens(organizer_model, tokenizer):
    engine = HFRolloutEngine(organizer_model)
    prompt = question(tokenizer, "Calculate 11 + 22.").token_ids
    [[free]] = engine.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0.0))
    stop = free.token_ids[4]
    [[stopped]] = engine.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=(stop,)))
    cut = free.token_ids.index(stop) + 1
    assert stopped.token_ids == free.token_ids[:cut] and stopped.finish_reason == "stop"
    assert stopped.logprobs == pytest.approx(free.logprobs[:cut], abs=1e-5)


def test_fork_join_program_on_a_real_model_is_consistent(organizer_model, tokenizer):
    """Whatever the untrained model writes: responses within budget, masks and workers consistent,
    and the engine's log-probs of the organizer's sampled tokens are those of a forward over the
    whole trace (prompt, sampled and pasted tokens): what the learner will compute."""
    from rlcore.models import response_logprobs

    engine = HFRolloutEngine(organizer_model)
    prompts = [question(tokenizer, f"Calculate {a} + {a + 1} + 7 + 8.") for a in range(10, 14)]
    out = PROGRAMS["fork_join"](engine, prompts, SamplingParams(n=4, max_new_tokens=24, seed=3))
    assert len(out) == 16 and all(len(t.response_ids) <= 24 for t in out)
    batch = build_batch(out, tokenizer.pad_token_id)
    learner = response_logprobs(engine.model, batch, 1.0)[0]
    mask = batch["response_mask"][: len(out) + sum(len(t.workers) for t in out)]
    assert (batch["response_mask"] * (learner - batch["rollout_logp"]).abs()).max() < 1e-4
    assert mask.sum() > 0


# ---- reward ---------------------------------------------------------------------------------


def trace(**kw):
    return {"critical_path": 100.0, "concurrency": 1.0, "workers": 2.0, "max_pool": 2.0, "format_error": ""} | kw


@pytest.mark.parametrize("response, record, score", [
    ("<JOIN-1>\\boxed{5}</JOIN-1> \\boxed{10}", trace(), 1 + 0.2 * min(1 / 4, 0.5) / 0.5),  # right, η = 1: R_η = 0.5
    ("<JOIN-1>\\boxed{5}</JOIN-1> \\boxed{11}", trace(concurrency=3.0), 0 + 0.2 * 1.0),     # wrong; η/c = 0.75, capped at τ
    ("\\boxed{10}", trace(concurrency=0.0, workers=0.0, max_pool=0.0), 1.0),               # sequential thinking
    ("<JOIN-1>\\boxed{10}</JOIN-1>", trace(), -1.0),                                        # the answer is the worker's
    ("\\boxed{10}", trace(max_pool=4.0), -1.0),                                            # pool overflow (c = 4)
    ("\\boxed{10}", trace(format_error="duplicate id: …"), -1.0),
])
def test_reward_hand_values(response, record, score):
    result = asyncthink(Sample("Calculate 1 + 2 + 3 + 4.", response, "10", trace=record))
    assert result["score"] == pytest.approx(score)
    assert result["format_error"] == float(score == -1.0)


def test_reward_options_and_missing_trace():
    sample = Sample("", "\\boxed{10}", "10", trace=trace(max_pool=4.0, concurrency=2.0))
    assert asyncthink(sample, capacity=5, concurrency_weight=1.0, concurrency_cap=0.2, format_penalty=-3)["score"] == 2.0
    assert asyncthink(sample, format_penalty=-3)["score"] == -3
    with pytest.raises(ValueError, match="algorithm=asyncthink"):
        asyncthink(Sample("", "\\boxed{10}", "10"))


# ---- advantages and batch rows --------------------------------------------------------------


def unit_advantages_loop(rewards, groups, units):
    """Per row: the GRPO advantage of its unit among the units of its group (loops, Bessel std)."""
    unit_reward, unit_group = {}, {}
    for r, g, u in zip(rewards.tolist(), groups.tolist(), units.tolist()):
        if u >= 0:
            unit_reward[u], unit_group[u] = r, g
    out = []
    for u in units.tolist():
        if u < 0:
            out.append(0.0)
            continue
        peers = [unit_reward[v] for v in unit_reward if unit_group[v] == unit_group[u]]
        m = sum(peers) / len(peers)
        std = (sum((x - m) ** 2 for x in peers) / max(len(peers) - 1, 1)) ** 0.5
        out.append(0.0 if len(peers) == 1 else (unit_reward[u] - m) / (std + 1e-6))
    return torch.tensor(out)


@pytest.mark.parametrize("seed", range(5))
def test_unit_advantages_match_loop(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 4, (12,), generator=g)  # rows per unit: organizer + 0–2 workers
    units = torch.arange(12).repeat_interleave(sizes)
    unit_rewards, unit_groups = torch.rand(12, generator=g), torch.arange(3).repeat_interleave(4)
    rewards, groups = unit_rewards[units], unit_groups[units]
    units = torch.cat([units, torch.tensor([-1, -1])])  # two padding rows
    rewards, groups = torch.cat([rewards, torch.tensor([9.0, 9.0])]), torch.cat([groups, torch.tensor([2, 2])])
    got = unit_advantages(rewards, groups, units)
    assert torch.allclose(got, unit_advantages_loop(rewards, groups, units), atol=1e-5)
    # Workers do not weigh in the group statistics: the same as GRPO over the organizers alone.
    assert torch.allclose(got[:-2], grpo_advantages(unit_rewards, unit_groups)[units[:-2]])


def test_unit_advantages_hand_values():
    # Group 0: units 0 (reward 1, two workers) and 1 (reward 0); mean 0.5, std √0.5.
    a = unit_advantages(torch.tensor([1.0, 1, 1, 0]), torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1]))
    assert torch.allclose(a, torch.tensor([1, 1, 1, -1]) * 0.5 / 0.5**0.5, atol=1e-5)


def make_unit(prompt_ids, group, reward, workers):
    org = Trajectory(Prompt("o", "", "", prompt_ids), [5, 6, 7, 8], [-1.0, 0.0, 0.0, -1.0], "", "stop", group_id=group,
                     loss_mask=[1, 0, 0, 1], reward=reward)
    org.workers = [Trajectory(Prompt("w", "", "", [1, 2]), [9] * n, [-0.5] * n, "", "stop", group_id=99) for n in workers]
    return org


def test_build_batch_rows_of_units_and_padding():
    units = [make_unit([1, 2, 3], 0, 1.0, [2, 3]), make_unit([1], 1, 0.0, [])]
    batch = build_batch(units, pad_id=0, rows_multiple=4)
    assert batch["unit_ids"].tolist() == [0, 0, 0, 1]  # 4 rows already: no padding
    batch = build_batch(units, pad_id=0, rows_multiple=3)
    assert batch["unit_ids"].tolist() == [0, 0, 0, 1, -1, -1]
    assert batch["rewards"].tolist() == [1, 1, 1, 0, 0, 0] and batch["group_ids"].tolist() == [0, 0, 0, 1, 1, 1]
    assert batch["response_mask"][0, :4].tolist() == [1, 0, 0, 1]
    assert batch["response_mask"][1].tolist() == [1, 1, 0, 0] and batch["response_mask"][2].tolist() == [1, 1, 1, 0]
    assert batch["response_mask"][4:].sum() == 0 and batch["attention_mask"][4:].sum(-1).tolist() == [5, 5]  # copies of row 3
    assert batch["input_ids"][1, 1:3].tolist() == [1, 2]  # a worker's own prompt
    algorithm = build_algorithm({"name": "asyncthink", "samples_per_prompt": 2})
    adv = algorithm.advantages(batch)
    assert (adv[4:] == 0).all() and (adv[:4].sum(-1) == 0).all()  # one-unit groups: advantage 0


def test_recipes_compose():
    cfg = compose("train", ["recipe=asyncthink_math"])
    assert cfg.algorithm.name == "asyncthink" and cfg.rollout.eval_program == "fork_join"
    assert list(cfg.reward.fns) == ["asyncthink_correct", "asyncthink"] and cfg.reward.accuracy == "asyncthink_correct"
    assert cfg.data.task_args.max_terms == 4 and cfg.data.task_args.min_digits == 2
    sft = compose("sft", ["recipe=sft_asyncthink"])
    assert list(sft.sft.add_tokens) == TAG_TOKENS and sft.sft.completion_fn == "rlcore.asyncthink:organizer_completion"


def test_asyncthink_reward_without_the_fork_join_program_is_one_line():
    from rlcore.config import validate_train

    cfg = compose("train", ["recipe=opo_math", "reward=asyncthink"])
    with pytest.raises(ConfigError, match=r"^reward.fns: asyncthink scores the fork_join program's organizer traces, and "
                                          r"algorithm=opo runs the program 'single'; use algorithm=asyncthink"):
        validate_train(cfg, build_algorithm(cfg.algorithm))
    with pytest.raises(ConfigError, match=r"^rollout.eval_program="):
        validate_train(compose("train", ["recipe=asyncthink_math", "rollout.eval_program=fork"]), build_algorithm({"name": "asyncthink"}))
