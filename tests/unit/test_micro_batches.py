"""Micro-batching by token budget, padding trimming, and the learner's DeepSpeed config:
plain loops over real tensor shapes as the reference, no Ray, no DeepSpeed engine."""

import types

import pytest
import torch

from rlcore.batch import (Trajectory, build_batch, equalise_counts, micro_batches, pad_response, plan_micro_batches, split_even,
                          trim_padding)
from rlcore.config import ConfigError, LearnerConfig, validate_learner
from rlcore.data import Prompt
from rlcore.learner.rank import deepspeed_config


def random_batch(seed, rows=12, vocab=40, prompt=(1, 9), response=(0, 12)):
    """Rows of random prompt and response lengths (inclusive ranges), padded as build_batch pads them."""
    g = torch.Generator().manual_seed(seed)
    return build_batch([random_trajectory(g, i, vocab, prompt, response) for i in range(rows)], pad_id=0)


def random_trajectory(g, i, vocab, prompt, response):
    p = int(torch.randint(prompt[0], prompt[1] + 1, (1,), generator=g))
    r = int(torch.randint(response[0], response[1] + 1, (1,), generator=g))
    prompt_ = Prompt(str(i), "", "", token_ids=torch.randint(3, vocab, (p,), generator=g).tolist())
    return Trajectory(prompt_, torch.randint(3, vocab, (r,), generator=g).tolist(), torch.randn(r, generator=g).tolist(), "", "stop")


def slots(batch) -> int:
    """Token slots the forward of a micro-batch really processes: its trimmed input_ids."""
    return trim_padding(batch)["input_ids"].numel()


def plan_loop(batch, budget):
    """The reference: from each start, the longest run of rows whose trimmed tensor fits."""
    sizes, start, rows = [], 0, batch.batch_size[0]
    while start < rows:
        end = start + 1
        while end < rows and slots(batch[start : end + 1]) <= budget:
            end += 1
        sizes.append(end - start)
        start = end
    return sizes


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [1, 15, 40, 90, 10_000])
def test_token_packing_matches_a_plain_loop_and_keeps_the_budget(seed, budget):
    batch = random_batch(seed)
    [sizes] = plan_micro_batches([batch], rows=0, tokens=budget)
    assert sizes == plan_loop(batch, budget)
    assert sum(sizes) == batch.batch_size[0]
    start = 0
    for n in sizes:
        mb = batch[start : start + n]
        assert n == 1 or slots(mb) <= budget  # a longer sample goes alone
        if start + n < batch.batch_size[0]:  # greedy: the next row would not have fitted
            assert slots(batch[start : start + n + 1]) > budget
        start += n


@pytest.mark.parametrize("seed", range(4))
def test_all_ranks_get_the_same_number_of_micro_batches_within_the_budget(seed):
    # Long rows on rank 0, short ones on rank 1: rank 0 packs into more micro-batches.
    g = torch.Generator().manual_seed(seed)
    long = [random_trajectory(g, i, 40, (6, 9), (8, 12)) for i in range(8)]
    short = [random_trajectory(g, i, 40, (1, 3), (0, 3)) for i in range(8)]
    shards, budget = split_even(build_batch(long + short, pad_id=0), 2), 30
    alone = [plan_micro_batches([s], rows=0, tokens=budget)[0] for s in shards]
    assert len(alone[0]) > len(alone[1])  # the case that would deadlock ZeRO-2/3
    plans = plan_micro_batches(shards, rows=0, tokens=budget)
    assert plans[0] == alone[0] and len(plans[1]) == len(alone[0])
    for shard, plan in zip(shards, plans):
        assert sum(plan) == shard.batch_size[0] and min(plan) >= 1
        pieces = micro_batches(shard, plan)
        for mb in pieces:
            assert mb.batch_size[0] == 1 or mb["input_ids"].numel() <= budget
        # consecutive rows, in order: padded back, the micro-batches are the shard
        R = shard["response_ids"].shape[1]
        assert torch.equal(torch.cat([pad_response(mb["rollout_logp"], R) for mb in pieces]), shard["rollout_logp"])


def test_equalise_counts_splits_the_largest_micro_batch():
    # 5 → 3+2, then 3 → 2+1, then the first 2 → 1+1
    assert equalise_counts([[5, 1], [1, 1, 1, 1, 2]]) == [[1, 1, 1, 2, 1], [1, 1, 1, 1, 2]]
    assert equalise_counts([[6], [6]]) == [[6], [6]]


def test_fixed_micro_batches_by_rows():
    shards = split_even(random_batch(0, rows=10), 2)
    assert plan_micro_batches(shards, rows=2, tokens=0) == [[2, 2, 1], [2, 2, 1]]


@pytest.mark.parametrize("seed", range(4))
def test_trimming_keeps_every_real_token_and_drops_all_pad_columns(seed):
    batch = random_batch(seed)
    R = batch["response_ids"].shape[1]
    for start in range(0, 12, 3):
        full = batch[start : start + 3]
        cut = trim_padding(full)
        mask, cut_mask = full["attention_mask"].bool(), cut["attention_mask"].bool()
        for i in range(3):
            assert torch.equal(full["input_ids"][i][mask[i]], cut["input_ids"][i][cut_mask[i]])
        r = cut["response_ids"].shape[1]
        P_cut = cut["input_ids"].shape[1] - r
        # no column is padding in every row (except the one response column kept when all are empty)
        assert cut_mask[:, 0].any() and (cut_mask[:, P_cut - 1].all())
        assert cut_mask[:, -1].any() or r == 1
        for key in ("response_mask", "rollout_logp", "response_ids"):
            assert torch.equal(cut[key], full[key][:, :r])
            assert not full[key][:, r:].any()
        assert full["response_ids"].shape[1] == R and torch.equal(cut["rewards"], full["rewards"])


def test_trimming_does_not_change_the_log_probs(tiny_model):
    """Left pads are masked and positions come from the attention mask: the trimmed micro-batch
    gives the response tokens the same log-probs (float32, different kernel shapes)."""
    from rlcore.models import load_model, response_logprobs

    model = load_model(tiny_model).eval()
    g, vocab = torch.Generator().manual_seed(0), model.config.vocab_size
    rows = [random_trajectory(g, 0, vocab, (12, 12), (12, 12))] + [random_trajectory(g, i, vocab, (2, 6), (1, 5)) for i in (1, 2, 3)]
    batch = build_batch(rows, pad_id=0)[1:]  # short rows, padded for the long one
    with torch.no_grad():
        full, _ = response_logprobs(model, batch, 1.0)
        cut, _ = response_logprobs(model, trim_padding(batch), 1.0)
    assert trim_padding(batch)["input_ids"].shape[1] < batch["input_ids"].shape[1]  # something was cut
    r, mask = cut.shape[1], batch["response_mask"]
    torch.testing.assert_close(cut * mask[:, :r], full[:, :r] * mask[:, :r], atol=1e-5, rtol=0)


# ---- the learner's DeepSpeed config and its checks ---------------------------------------


def test_deepspeed_config_maps_offload_and_bf16():
    cfg = LearnerConfig(zero_stage=3, micro_batch_size=4, offload_optimizer=True, offload_params=True)
    on_gpu = deepspeed_config(cfg, "bfloat16", world_size=2, grad_accum=3, cuda=True)
    assert on_gpu["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
    }
    assert on_gpu["bf16"] == {"enabled": True} and on_gpu["data_types"] == {"grad_accum_dtype": "fp32"}
    assert on_gpu["train_batch_size"] == 4 * 3 * 2
    on_cpu = deepspeed_config(cfg, "float32", world_size=1, grad_accum=1, cuda=False)
    assert on_cpu["zero_optimization"]["offload_param"]["pin_memory"] is False
    assert on_cpu["bf16"] == {"enabled": False} and "data_types" not in on_cpu
    plain = deepspeed_config(LearnerConfig(zero_stage=2), "float32", world_size=1, grad_accum=1, cuda=True)
    assert plain["zero_optimization"] == {"stage": 2}
    # ZeRO-0 with bf16: DeepSpeed accepts only bf16 gradient accumulation there
    assert "data_types" not in deepspeed_config(LearnerConfig(zero_stage=0), "bfloat16", world_size=1, grad_accum=1, cuda=True)


@pytest.mark.parametrize("settings, message", [
    ({"zero_stage": 2, "offload_params": True}, "learner.offload_params=true needs learner.zero_stage=3 (got 2)"),
    ({"zero_stage": 0, "offload_optimizer": True}, "learner.offload_optimizer=true needs learner.zero_stage 1, 2 or 3"),
    ({"micro_batch_tokens": -1}, "learner.micro_batch_tokens=-1 must be ≥ 0"),
])
def test_bad_learner_settings_are_one_line_errors(settings, message):
    with pytest.raises(ConfigError) as e:
        validate_learner(types.SimpleNamespace(learner=LearnerConfig(**settings)))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_good_learner_settings_pass():
    validate_learner(types.SimpleNamespace(learner=LearnerConfig(
        zero_stage=3, offload_params=True, offload_optimizer=True, micro_batch_tokens=512, gradient_checkpointing=True)))
    validate_learner(types.SimpleNamespace(learner=LearnerConfig(zero_stage=1, offload_optimizer=True)))
