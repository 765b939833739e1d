"""RPT (SPEC §5): the byte-level next-token reward against hand-computed cases, the data pipeline
(entropy, buckets, cuts, determinism, held-out topics) and per-bucket eval accuracy."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import load_bench_script
from omegaconf import OmegaConf

from rlcore import rpt
from rlcore.batch import Trajectory
from rlcore.config import DataConfig, RewardConfig
from rlcore.data import Prompt, load_splits
from rlcore.models import load_tokenizer
from rlcore.reward import RewardRunner, Sample, resolve
from rlcore.rewards.rpt import rpt_prefix
from rlcore.trainer import evaluate


def score_response(response: str, continuation: str, boundaries: list[int]) -> float:
    return rpt_prefix(Sample("q", response, "", {"continuation": continuation, "boundaries": boundaries}))


def score(boxed: str, continuation: str, boundaries: list[int]) -> float:
    return score_response(f"<think>which word comes next?</think> \\boxed{{{boxed}}}", continuation, boundaries)


# The true next tokens " the", " cat", "." → x̄ = " the cat.", L = [4, 8, 9].
THE_CAT = (" the cat.", [4, 8, 9])


@pytest.mark.parametrize("boxed, want", [
    ("the", 1.0),          # one token; its leading space is implied
    (" the", 1.0),         # ... or written
    ("the cat", 1.0),      # two tokens, ends on a boundary (1 + 7 = 8 ∈ L)
    ("the cat.", 1.0),     # three tokens (9 ∈ L)
    ("th", 0.0),           # part of a token (3 ∉ L)
    ("the c", 0.0),        # a token and a part (6 ∉ L)
    ("the ", 0.0),         # trailing space: part of " cat" (5 ∉ L)
    ("cat", 0.0),          # a later token, not a prefix
    ("dog", 0.0),          # wrong
    ("The", 0.0),          # bytes, so case counts
    ("the cat. It", 0.0),  # longer than x̄
    ("", 0.0),             # empty
    ("  ", 0.0),           # only spaces: empty after the leading ones go
])
def test_prefix_reward(boxed, want):
    assert score(boxed, *THE_CAT) == want


def test_leading_space_is_ignored_on_both_sides():
    # After "(" the next token has no space: "the" then ")" → x̄ = "the)", L = [3, 4].
    assert score("the", "the)", [3, 4]) == 1.0
    assert score(" the", "the)", [3, 4]) == 1.0
    assert score("the)", "the)", [3, 4]) == 1.0
    # A whitespace-only first token: " ", "2" → x̄ = " 2024", L = [1, 2, 3, 4, 5]; "2" is 2 tokens, ends on a boundary.
    assert score("2", " 2024", [1, 2, 3, 4, 5]) == 1.0
    assert score("20", " 2024", [1, 2, 3, 4, 5]) == 1.0


def test_non_ascii_bytes_and_a_boundary_inside_a_character():
    # "é" is 2 bytes (c3 a9). Tokens "caf", b"\xc3", b"\xa9", " au": x̄ = "café au", L = [3, 4, 5, 8].
    assert score("caf", "café au", [3, 4, 5, 8]) == 1.0
    assert score("café", "café au", [3, 4, 5, 8]) == 1.0       # 5 bytes: the boundary after the second half of é
    assert score("café au", "café au", [3, 4, 5, 8]) == 1.0
    assert score("cafe", "café au", [3, 4, 5, 8]) == 0.0       # e ≠ é
    # Tokens b"caf\xc3", b"\xa9 au": L = [4, 8]. No whole-character prediction ends at 4, and "café" (5) is mid-token.
    assert score("caf", "café au", [4, 8]) == 0.0
    assert score("café", "café au", [4, 8]) == 0.0
    assert score("café au", "café au", [4, 8]) == 1.0
    # A 3-byte character as its own token: " €" is 4 bytes; " 5", " €" → L = [2, 6].
    assert score("5 €", " 5 €", [2, 6]) == 1.0
    assert score("5 ", " 5 €", [2, 6]) == 0.0


@pytest.mark.parametrize("response", [
    "the answer is the",                                # no box
    "<think>it is the</think> the",                     # no box after </think>
    "\\boxed{the}",                                     # no </think>: never finished reasoning
    "<think>maybe \\boxed{the}</think> not sure",       # the box is inside the reasoning
    "<think>it is \\boxed{the",                         # cut off
    "<think>x</think> \\boxed{the",                     # unclosed box
])
def test_no_final_box_scores_zero(response):
    assert rpt_prefix(Sample("q", response, " the", {"continuation": " the cat.", "boundaries": [4, 8, 9]})) == 0.0


def test_last_box_after_last_think_end_counts():
    response = "<think>\\boxed{dog}</think> \\boxed{dog} then \\boxed{the}"
    assert rpt_prefix(Sample("q", response, " the", {"continuation": " the cat.", "boundaries": [4, 8, 9]})) == 1.0
    response = "<think>a</think> \\boxed{dog} <think>b</think> \\boxed{the}"
    assert rpt_prefix(Sample("q", response, " the", {"continuation": " the cat.", "boundaries": [4, 8, 9]})) == 1.0


def test_without_metadata_the_ground_truth_is_one_token():
    assert rpt_prefix(Sample("q", "<think>x</think> \\boxed{the}", " the")) == 1.0
    assert rpt_prefix(Sample("q", "<think>x</think> \\boxed{th}", " the")) == 0.0


def test_registered_as_rpt():
    assert resolve("rpt") is rpt_prefix


# ---- data pipeline ------------------------------------------------------------------------------


def test_top_k_entropy_is_renormalised_over_the_top_16():
    uniform_16 = torch.cat([torch.zeros(16), torch.full((4,), -1e4)])
    assert rpt.top_k_entropy(uniform_16).item() == pytest.approx(math.log(16))
    # Uniform over 20: the 4 tokens outside the top 16 do not count, and the top 16 renormalise to uniform.
    assert rpt.top_k_entropy(torch.zeros(20)).item() == pytest.approx(math.log(16))
    # Two of the top 16 share all the mass: ln 2.
    two = torch.cat([torch.zeros(2), torch.full((30,), -1e4)])
    assert rpt.top_k_entropy(two).item() == pytest.approx(math.log(2))
    # p = (0.5, 0.25, 0.25) on top of negligible others: 1.5·ln 2.
    three = torch.cat([torch.tensor([0.5, 0.25, 0.25]).log(), torch.full((20,), -1e4)])
    assert rpt.top_k_entropy(three).item() == pytest.approx(1.5 * math.log(2), abs=1e-5)


@pytest.mark.parametrize("entropy, bucket", [(0.0, None), (0.49, None), (0.5, "easy"), (0.99, "easy"), (1.0, "medium"),
                                             (1.49, "medium"), (1.5, "hard"), (2.7, "hard")])
def test_buckets(entropy, bucket):
    assert rpt.bucket_of(entropy) == bucket


class ByteTokenizer:
    """Token i is PIECES[i]; decode joins the bytes, a partial character becoming U+FFFD, as byte-level BPE does."""

    PIECES = [b"The", b" caf", b"\xc3", b"\xa9", b" au", b" lait", b" ", b"2", b"."]

    def decode(self, ids, clean_up_tokenization_spaces=False):
        return b"".join(self.PIECES[i] for i in ids).decode("utf-8", errors="replace")


def test_cut_rows_carry_the_truth_the_reward_needs():
    tok, ids = ByteTokenizer(), [0, 1, 2, 3, 4, 5, 6, 7, 8]  # "The café au lait 2."
    row = rpt.cut(tok, ids, 2)  # before b"\xc3": the boundary inside é is left out of L
    assert row["answer"] == "é"
    assert row["metadata"] == {"continuation": "é au lait 2.", "boundaries": [2, 5, 10, 11, 12, 13]}
    assert "The caf\n" in row["question"]
    assert rpt.cut(tok, ids, 3) is None  # the context would end inside é
    assert rpt.cut(tok, ids, 6) is None  # the next token is only a space
    row = rpt.cut(tok, ids, 4)
    assert (row["answer"], row["metadata"]["boundaries"]) == (" au", [3, 8, 9, 10, 11])
    # The answer scores, and so does the whole continuation; a part of a token does not.
    for boxed, want in [(row["answer"], 1.0), ("au lait 2.", 1.0), ("au l", 0.0)]:
        assert rpt_prefix(Sample(row["question"], f"<think></think>\\boxed{{{boxed}}}", row["answer"], row["metadata"])) == want


def test_candidates_by_bucket_skip_short_contexts():
    entropies = [float("nan")] + [2.0] * (rpt.MIN_CONTEXT - 1) + [0.2, 0.7, 1.2, 1.8, 0.6]
    m = rpt.MIN_CONTEXT
    assert rpt.candidates(entropies) == {"easy": [m + 1, m + 4], "medium": [m + 2], "hard": [m + 3]}


class WordVocab:
    """A tokenizer stand-in for proxy_candidates: id → text, id 0 special, id 6 half a character."""

    words = ["<s>", " the", "the", "{x", "a\\b", "  ", "\ufffd", " cat", " dog", "."]
    all_special_ids = [0]

    def decode(self, ids, clean_up_tokenization_spaces=False):
        return "".join(self.words[i] for i in ids)


def test_proxy_candidates_keep_the_likeliest_that_can_be_boxed():
    ranked = list(range(10))
    # special, the same word without its leading space, braces, backslash, blank and partial characters
    # are skipped; each keeps the spelling that continues the text
    assert rpt.proxy_candidates(WordVocab(), ranked) == [" the", " cat", " dog"]
    assert rpt.proxy_candidates(WordVocab(), ranked, n=4) == [" the", " cat", " dog", "."]
    assert rpt.proxy_candidates(WordVocab(), [9, 8, 7]) == [".", " dog", " cat"]  # likeliest first, as given
    assert rpt.proxy_candidates(WordVocab(), [2, 7, 1]) == ["the", " cat"]  # the likelier spelling of "the"


def test_cold_start_continues_the_text_end_with_the_proxys_guess_not_the_truth():
    context = "one two three four five six seven eight nine ten"
    question = rpt.PROMPT.format(context=context)
    assert rpt.context_of(question) == context
    completion = rpt.cold_start_completion(Prompt("", question, " cat", metadata={"proxy_top": [" the", " cat", "."]}))
    assert completion == "<think>…three four five six seven eight nine ten the</think> \\boxed{the}"
    glued = rpt.cold_start_completion(Prompt("", question, " cat", metadata={"proxy_top": [".", " cat"]}))
    assert glued == "<think>…three four five six seven eight nine ten.</think> \\boxed{.}"
    assert score_response(completion, *THE_CAT) == 1.0      # the guess is right here ...
    assert score_response(completion, " cat.", [4, 5]) == 0.0  # ... and wrong here: the truth is " cat"
    with pytest.raises(ValueError, match="python -m rlcore.rpt"):
        rpt.cold_start_completion(Prompt("", question, " cat"))


class CyclingProxy:
    """A proxy whose next-token entropy cycles by position: ~0.0 (dropped), easy, medium, hard."""

    TOP_LOGIT = [12.0, 5.0, 4.0, 0.0]

    def __call__(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, 32)
        logits[..., 0] = torch.tensor(self.TOP_LOGIT).repeat(input_ids.shape[1] // 4 + 1)[: input_ids.shape[1]]
        return SimpleNamespace(logits=logits)


def test_cycling_proxy_covers_every_bucket():
    logits = torch.zeros(4, 32)
    logits[:, 0] = torch.tensor(CyclingProxy.TOP_LOGIT)
    entropies = rpt.top_k_entropy(logits)
    assert [rpt.bucket_of(e) for e in entropies.tolist()] == [None, "easy", "medium", "hard"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def built(tokenizer):
    return rpt.build(CyclingProxy(), tokenizer, {"train": 12, "eval": 6}, seed=3)


def test_build_fills_each_bucket_equally_from_disjoint_topics(built):
    paragraphs = rpt.corpus()
    for split, n in [("train", 12), ("eval", 6)]:
        rows = built[split]
        assert len(rows) == n
        assert sorted(r["metadata"]["bucket"] for r in rows) == sorted(["easy", "medium", "hard"] * (n // 3))
        for r in rows:
            m = r["metadata"]
            assert rpt.bucket_of(m["entropy"]) == m["bucket"] and m["position"] >= rpt.MIN_CONTEXT
            # the question holds a paragraph of the topic up to the cut, and the truth continues it there
            context = r["question"].split("\n\n")[1]
            assert any((context + m["continuation"]) in text for text in paragraphs[m["topic"]])
            assert r["answer"].strip() and m["continuation"].startswith(r["answer"])
            assert rpt_prefix(Sample(r["question"], f"<think>…</think> \\boxed{{{r['answer']}}}", r["answer"], m)) == 1.0
            assert 1 <= len(m["proxy_top"]) <= rpt.CANDIDATES
    assert not {r["metadata"]["topic"] for r in built["train"]} & {r["metadata"]["topic"] for r in built["eval"]}


def test_build_is_deterministic_given_the_seed(built, tokenizer):
    assert rpt.build(CyclingProxy(), tokenizer, {"train": 12, "eval": 6}, seed=3) == built
    assert rpt.build(CyclingProxy(), tokenizer, {"train": 12, "eval": 6}, seed=4) != built


def test_sft_split_cuts_training_topics_elsewhere_and_leaves_the_other_splits_alone(built, tokenizer):
    with_sft = rpt.build(CyclingProxy(), tokenizer, {"train": 12, "eval": 6, "sft": 6}, seed=3)
    assert with_sft["train"] == built["train"] and with_sft["eval"] == built["eval"]
    sft = with_sft["sft"]
    assert sorted(r["metadata"]["bucket"] for r in sft) == sorted(["easy", "medium", "hard"] * 2)
    eval_topics = {r["metadata"]["topic"] for r in built["eval"]}
    assert not {r["metadata"]["topic"] for r in sft} & eval_topics
    assert not {r["question"] for r in sft} & {r["question"] for r in built["train"]}  # no training cut
    assert "sft" not in built


def test_rows_load_with_the_rpt_data_config(built, tokenizer, tmp_path):
    for split, rows in built.items():
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load("configs/data/rpt.yaml"),
                          {"path": str(tmp_path / "train.jsonl"), "eval_path": str(tmp_path / "eval.jsonl"), "max_prompt_tokens": 4096})
    train, held_out = load_splits(cfg, tokenizer)
    assert len(train) == 12 and len(held_out) == 6
    assert held_out[0].metadata == built["eval"][0]["metadata"] and held_out[0].ground_truth == built["eval"][0]["answer"]


def test_cli_writes_jsonl(tiny_model, tmp_path, capsys):
    # One position per split goes to the hard bucket, where a random tiny model's entropy (~ln 16) lies.
    rpt.main(["--out", str(tmp_path), "--proxy", tiny_model, "--train", "1", "--eval", "1", "--sft", "1", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert "train.jsonl: 1 positions (easy 0, medium 0, hard 1)" in out and "eval.jsonl: 1 positions" in out
    assert "sft.jsonl: 1 positions" in out
    for split in ("train", "eval", "sft"):
        [row] = [json.loads(line) for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
        assert set(row) == {"question", "answer", "metadata"} and row["metadata"]["bucket"] == "hard"


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        rpt.main(["--out", str(tmp_path), "--train", "0"])
    assert e.value.code == 2 and "--train=0 must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        rpt.main(["--out", str(tmp_path), "--sft", "-1"])
    assert e.value.code == 2 and "--sft=-1 must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        rpt.main(["--out", str(tmp_path), "--proxy", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--proxy" in err and len(err.strip().splitlines()) == 1


# ---- per-bucket eval accuracy ---------------------------------------------------------------


class ScriptedRollout:
    """Answers each prompt with a fixed response."""

    def __init__(self, responses):
        self.responses = responses

    def generate(self, prompts, program, sampling):
        return [Trajectory(p, [1, 2], [0.0, 0.0], self.responses[p.id], "stop") for p in prompts]


def test_evaluate_reports_accuracy_per_bucket():
    truth = {"continuation": " the cat.", "boundaries": [4, 8, 9]}
    prompts = [Prompt(f"p{i}", "q", " the", metadata={**truth, "bucket": b}) for i, b in enumerate(["easy", "easy", "hard", "hard", "hard"])]
    right, wrong = "<think>x</think> \\boxed{the}", "<think>x</think> \\boxed{dog}"
    rollout = ScriptedRollout({"p0": right, "p1": right, "p2": right, "p3": wrong, "p4": wrong})
    cfg = OmegaConf.structured(RewardConfig(fns=["rpt"], accuracy="rpt", num_workers=1))
    with RewardRunner(cfg) as rewards:
        result = evaluate(rollout, rewards, prompts, SimpleNamespace(eval_max_new_tokens=8, eval_program="single"))
    assert result["eval/accuracy"] == pytest.approx(3 / 5)
    assert result["eval/accuracy/easy"] == 1.0 and result["eval/accuracy/hard"] == pytest.approx(1 / 3)
    assert "eval/accuracy/medium" not in result


def test_bench_proxy_reference_hand_values():
    bench = load_bench_script("rpt_nexttoken")
    cat = {"continuation": " cat sat", "boundaries": [4, 8]}
    rows = [{"metadata": cat | {"bucket": "easy", "proxy_top": ["cat", "dog"]}},     # top-1 right
            {"metadata": cat | {"bucket": "easy", "proxy_top": ["dog", "cat sat"]}},  # a later candidate right
            {"metadata": cat | {"bucket": "hard", "proxy_top": ["ca", "dog"]}}]       # none (a partial token)
    assert bench.proxy_reference(rows) == pytest.approx({
        "proxy/top1": 1 / 3, "proxy/top1/easy": 0.5, "proxy/top1/hard": 0.0,
        "proxy/any_candidate": 2 / 3, "proxy/any_candidate/easy": 1.0, "proxy/any_candidate/hard": 0.0})


def test_bench_training_signal_hand_values():
    bench = load_bench_script("rpt_nexttoken")
    metrics = [{"step": 0, "eval/accuracy": 0.3},  # an eval row: no training step
               {"step": 1, "grad_norm": 0.0, "entropy": 0.1, "sampling/informative_frac": 0.0, "reward/mean": 0.0},
               {"step": 2, "grad_norm": 0.5, "entropy": 0.3, "sampling/informative_frac": 0.5, "reward/mean": 0.25},
               {"step": 3, "grad_norm": 0.0, "entropy": 0.2, "sampling/informative_frac": 0.0, "reward/mean": 1.0},
               {"step": 4, "grad_norm": 1.2, "entropy": 0.2, "sampling/informative_frac": 1.0, "reward/mean": 0.5}]
    assert bench.training_signal(metrics) == pytest.approx(
        {"entropy_mean": 0.2, "informative_groups": 0.375, "steps_without_gradient": 0.5,
         "reward_first_quarter": 0.0, "reward_last_quarter": 0.5})  # a quarter of 4 steps: 1
    older = [{k: v for k, v in m.items() if k != "sampling/informative_frac"} for m in metrics]
    assert "informative_groups" not in bench.training_signal(older)
