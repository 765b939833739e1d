"""Data loading errors name the file, row and field; the sampler resumes exactly; the task's working is right."""

import json

import pytest
from omegaconf import OmegaConf

from rlcore.arith import (
    AFTERWORD,
    AFTERWORD_SHARE_BY_TARGET,
    VERBOSE_SHARE,
    column_addition_completion,
    column_addition_completion_afterword,
    column_addition_completion_afterword_tied,
    column_addition_completion_verbose,
    column_addition_working,
    verbose_question,
)
from rlcore.config import ConfigError, DataConfig
from rlcore.data import Prompt, PromptSampler, hf_rows, load_splits
from rlcore.models import load_tokenizer
from rlcore.reward import Sample
from rlcore.rewards.math import math_correct


def data_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), {"source": "hf", "eval_size": 1, **kw})


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model)


def test_missing_field_names_file_row_and_field(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "1+1", "answer": "2"}, {"question": "2+2"}, {"question": "3+3", "answer": "6"}])
    with pytest.raises(ConfigError) as e:
        load_splits(data_cfg(path=path), tokenizer)
    msg = str(e.value)
    assert "d.jsonl" in msg and "row 1" in msg and "'answer'" in msg and "\n" not in msg


def test_skip_mode_counts_bad_rows(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "1+1", "answer": "2"}, {"question": "2+2"}, {"question": "3+3", "answer": "6"}])
    train, held_out = load_splits(data_cfg(path=path, on_invalid="skip"), tokenizer)
    assert [p.ground_truth for p in train] == ["2"] and [p.ground_truth for p in held_out] == ["6"]


def test_too_long_prompt(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "1 " * 300, "answer": "2"}, {"question": "3+3", "answer": "6"}])
    with pytest.raises(ConfigError, match=r"row 0: the prompt \(field 'question', templated\) is \d+ tokens, over data.max_prompt_tokens=64"):
        load_splits(data_cfg(path=path, max_prompt_tokens=64), tokenizer)


def test_too_long_prompt_names_the_target_length_instruction(tmp_path, tokenizer):
    """The question fits; with the stated target appended, it does not."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "3+3", "answer": "6"}] * 2)
    fits = len(load_splits(data_cfg(path=path), tokenizer)[0][0].token_ids)
    target = {"choices": [32], "instruction": "Think for about {target} tokens."}
    with pytest.raises(ConfigError, match=r"field 'question' \+ data.target_length.instruction, templated\) is \d+ tokens"):
        load_splits(data_cfg(path=path, max_prompt_tokens=fits, target_length=target), tokenizer)


def test_bucket_by_labels_prompts_from_their_metadata(tmp_path, tokenizer):
    """data.bucket_by: held-out metrics split by a metadata field (rlcore.trainer.greedy_metrics)."""
    rows = [{"question": "1+1", "answer": "2", "metadata": {"num_terms": 2}}, {"question": "1+1+1", "answer": "3", "metadata": {"num_terms": 3}}]
    train, held_out = load_splits(data_cfg(path=write_jsonl(tmp_path / "d.jsonl", rows), bucket_by="num_terms"), tokenizer)
    assert (train[0].metadata["bucket"], held_out[0].metadata["bucket"]) == ("num_terms_2", "num_terms_3")
    with pytest.raises(ConfigError, match=r"row 0: metadata has no field 'digits' \(fields: num_terms\); set data.bucket_by"):
        load_splits(data_cfg(path=write_jsonl(tmp_path / "d.jsonl", rows), bucket_by="digits"), tokenizer)


def test_empty_dataset(tmp_path, tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(ConfigError, match="empty.jsonl"):
        load_splits(data_cfg(path=str(path), eval_size=0, eval_path=str(path)), tokenizer)


def test_missing_file(tokenizer):
    with pytest.raises(ConfigError, match="no such file"):
        load_splits(data_cfg(path="/nonexistent/x.jsonl"), tokenizer)


def test_reasoning_gym_held_out_is_disjoint(tokenizer):
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load("configs/data/arith.yaml"), {"train_size": 3000, "eval_size": 200})
    train, held_out = load_splits(cfg, tokenizer)
    assert not {p.text for p in train} & {p.text for p in held_out}
    assert len(held_out) == 200 and train[0].token_ids and train[0].text.startswith("Calculate")


def test_sampler_resumes_exactly():
    a = PromptSampler(size=7, seed=3)
    first = a.take(10)  # crosses an epoch boundary
    state = a.state_dict()
    rest = a.take(12)
    b = PromptSampler(size=7, seed=3)
    b.load_state_dict(state)
    assert b.take(12) == rest
    assert sorted(first[:7]) == list(range(7))  # each pass is a permutation


def test_sampler_refuses_other_data():
    a = PromptSampler(size=7, seed=3)
    with pytest.raises(ConfigError, match="same data"):
        PromptSampler(size=8, seed=3).load_state_dict(a.state_dict())


@pytest.mark.parametrize("terms", [[814, 707, 965], [45, 312], [99, 1], [5, 5, 5]])
def test_column_working_is_correct_and_scores(terms):
    working = column_addition_working(terms)
    # the last column's sum followed by the earlier columns' ones digits spells the answer
    sums = [int(c.split("=")[1]) for c in working.split(", ")]
    spelled = str(sums[-1]) + "".join(str(s % 10) for s in reversed(sums[:-1]))
    assert int(spelled) == sum(terms)
    prompt = Prompt("", "Calculate " + " + ".join(map(str, terms)) + ".", str(sum(terms)))
    assert math_correct(Sample(prompt.text, column_addition_completion(prompt), prompt.ground_truth)) == 1.0


def test_working_format_example():
    assert column_addition_working([814, 707, 965]) == "4+7+5=16, 1+0+6+1=8, 8+7+9+0=24"


def test_verbose_variants_add_length_on_a_fixed_share_and_stay_correct():
    """The length-reward starts: ~VERBOSE_SHARE of questions get the extra text, always the
    same ones; the re-check repeats the working; the afterword follows a still-correct answer."""
    prompts = [Prompt("", f"Calculate {a} + {b}.", str(a + b)) for a in range(10, 60) for b in range(100, 120)]
    chosen = [verbose_question(p) for p in prompts]
    assert abs(sum(chosen) / len(prompts) - VERBOSE_SHARE) < 0.05
    assert chosen == [verbose_question(Prompt("", p.text, "")) for p in prompts]
    for p, verbose in zip(prompts[:40], chosen):
        concise = column_addition_completion(p)
        recheck, afterword = column_addition_completion_verbose(p), column_addition_completion_afterword(p)
        assert (recheck != concise) == verbose and ("; check: " in recheck) == verbose
        assert afterword == concise + (AFTERWORD if verbose else "")
        for text in (recheck, afterword):
            assert math_correct(Sample(p.text, text, p.ground_truth)) == 1.0


def test_tied_afterword_share_follows_the_stated_target():
    """sft_arith_l1_tied's start: the afterword's share is the target's (0.6 for 32, 0.9 for 60),
    on the same questions in every run; a target without a share is a one-line error."""
    questions = [f"Calculate {a} + {b}." for a in range(10, 60) for b in range(100, 120)]
    for target, share in AFTERWORD_SHARE_BY_TARGET.items():
        prompts = [Prompt("", q, "", metadata={"target_length": target}) for q in questions]
        texts = [column_addition_completion_afterword_tied(p) for p in prompts]
        assert abs(sum(t.endswith(AFTERWORD) for t in texts) / len(texts) - share) < 0.05
        assert all(t.removesuffix(AFTERWORD) == column_addition_completion(p) for t, p in zip(texts, prompts))
    with pytest.raises(ConfigError, match="data.target_length.choices=\\[32, 60\\]"):
        column_addition_completion_afterword_tied(Prompt("", questions[0], "", metadata={"target_length": 40}))


def test_a_format_name_is_not_taken_for_a_dataset(tmp_path, monkeypatch):
    """`data=csv`: datasets would load every csv file of the current folder as one dataset."""
    (tmp_path / "unrelated.csv").write_text("a,b\n1,2\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^data.path=csv names a format, not a file: give the file, e.g. data=train.csv$"):
        hf_rows("csv", "train")
