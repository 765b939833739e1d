"""The transformers backend's decode loop (rlcore.rollout.decode): greedy output equals
transformers' own `generate`, sampled tokens' log-probs equal the learner's, and finished rows
really leave the batch (the speed-up) without changing any row's tokens."""

from contextlib import contextmanager

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rlcore.batch import Trajectory, build_batch
from rlcore.data import Prompt
from rlcore.models import response_logprobs
from rlcore.rollout.decode import COMPACT_AT, PreallocatedLayer, generate
from rlcore.rollout.engine import SamplingParams

VOCAB, PAD = 50, 0
EOS = {1, 2, 3, 4, 5}  # five of 49 real tokens end a row: rows finish at many different steps
PROMPTS = [[7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17], [20, 21, 22, 23, 24], [30, 31, 32, 33, 34, 35]]


@pytest.fixture(scope="module")
def model():
    """A random Qwen2 with grouped-query attention, in float64 so that padding or batch shape
    cannot flip a greedy choice."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return Qwen2ForCausalLM(config).double().eval()


@contextmanager
def batch_rows_seen(model):
    """Rows of every decoder call in the block (prefill first), recorded by a pre-hook on the decoder."""
    seen = []
    hook = model.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape[0]),
                                                 with_kwargs=True)
    try:
        yield seen
    finally:
        hook.remove()


def cut_at_eos(ids: list[int]) -> list[int]:
    end = next((i + 1 for i, t in enumerate(ids) if t in EOS), len(ids))
    return ids[:end]


def test_greedy_equals_transformers_generate_and_finished_rows_leave(model):
    """Each prompt alone through `generate` (no padding) is the reference for the padded,
    shared-prefill, compacting batch; log-probs are log-softmax of generate's own logits."""
    sampling = SamplingParams(n=2, max_new_tokens=30, temperature=0)
    with batch_rows_seen(model) as seen:
        ours = generate(model, PROMPTS, sampling, EOS, PAD)
    for prompt, group in zip(PROMPTS, ours):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=sorted(EOS),
                             pad_token_id=PAD, output_logits=True, return_dict_in_generate=True)
        tokens = cut_at_eos(ref.sequences[0, len(prompt):].tolist())
        logp = torch.log_softmax(torch.stack(ref.logits, 1)[0].float(), -1)[range(len(tokens)), tokens]
        for completion in group:
            assert completion.token_ids == tokens
            torch.testing.assert_close(torch.tensor(completion.logprobs), logp, atol=1e-5, rtol=0)
            assert completion.finish_reason == ("stop" if tokens[-1] in EOS else "length")
    lengths = sorted(len(g[0].token_ids) for g in ours)
    assert lengths[0] < lengths[-1], "the test needs rows that end at different steps"
    assert seen[0] == len(PROMPTS)  # one prefill row per prompt, not per sample
    assert seen[1] == len(PROMPTS) * 2 and min(seen[1:]) < seen[1]  # the batch shrank as rows finished


def test_sampled_logprobs_are_the_learners_and_rows_keep_their_tokens(model):
    """Sampled with temperature: each row's reported log-probs equal the learner's scoring of the
    finished sequences (so positions, padding and dropped rows were right at every step)."""
    torch.manual_seed(3)
    sampling = SamplingParams(n=6, max_new_tokens=25, temperature=0.8)
    with batch_rows_seen(model) as seen:
        groups = generate(model, PROMPTS, sampling, EOS, PAD)
    rows = [Trajectory(Prompt(str(i), "", "", token_ids=p), c.token_ids, c.logprobs, "", c.finish_reason)
            for i, (p, g) in enumerate(zip(PROMPTS, groups)) for c in g]
    batch = build_batch(rows, PAD)
    learner, _ = response_logprobs(model, batch, sampling.temperature)
    mask = batch["response_mask"].bool()
    torch.testing.assert_close(learner.float()[mask], batch["rollout_logp"][mask], atol=1e-5, rtol=0)
    lengths = batch["response_mask"].sum(1)
    assert lengths.min() < 25 and (lengths == 25).any()  # some rows stopped early, some ran to the limit
    assert any(s <= (1 - COMPACT_AT) * seen[1] for s in seen[2:])


def test_same_seed_same_samples(model):
    sampling = SamplingParams(n=3, max_new_tokens=12, temperature=1.0)

    def run(seed):
        torch.manual_seed(seed)
        return [c.token_ids for g in generate(model, PROMPTS, sampling, EOS, PAD) for c in g]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_preallocated_layer_repeats_and_keeps_rows():
    layer = PreallocatedLayer(capacity=6)
    keys = torch.arange(2 * 1 * 3 * 2, dtype=torch.float).reshape(2, 1, 3, 2)
    layer.update(keys, -keys)
    layer.batch_repeat_interleave(2)  # rows: a a b b
    layer.keep_rows(torch.tensor([3, 0]))  # b a
    assert layer.keys.shape == (2, 1, 3, 2)
    assert torch.equal(layer.keys, torch.stack([keys[1], keys[0]]))
    assert torch.equal(layer.values, -torch.stack([keys[1], keys[0]]))
    layer.update(torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2))  # writes go to the kept rows
    assert layer.get_seq_length() == 4 and torch.equal(layer.keys[:, :, 3], torch.ones(2, 1, 2))
    with pytest.raises(RuntimeError, match="exceed the capacity 6"):
        layer.update(torch.ones(2, 1, 3, 2), torch.ones(2, 1, 3, 2))
