"""ReSA selection and rectification, the shared selector machinery, and the sparse decode loop
inside a transformers model (rlcore.sparse.{resa,selection,attention,generate})."""

import math
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlcore.rollout.engine import SamplingParams
from rlcore.sparse.attention import dense, install
from rlcore.rollout.decode import preallocated_cache
from rlcore.sparse.generate import rectify, sparse_generate
from rlcore.sparse.resa import ReSASelector


@pytest.fixture(scope="module")
def gqa_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("overrides, message", [
    ({"sparse.method": "seer", "sparse.gate_path": "/nowhere/gates.safetensors"}, "rollout.sparse.method=seer: no gate file at /nowhere"),
    ({"sparse.method": "resa", "sparse.keep_ratio": 0.0}, "rollout.sparse.keep_ratio=0.0 must be in (0, 1]"),
    ({"sparse.method": "seer", "sparse.threshold": 2.0}, "rollout.sparse.threshold=2.0 is a gate probability"),
    ({"sparse.method": "seer", "sparse.budget_tokens": 8}, "rollout.sparse.budget_tokens=8 is less than one block"),
    ({"backend": "vllm", "sparse.method": "resa"}, "rollout.sparse.rectify_every=32: vLLM cannot re-run generated tokens densely; set rollout.sparse.rectify_every=0"),
])
def test_bad_sparse_settings_are_one_line_config_errors(overrides, message):
    from omegaconf import OmegaConf

    from rlcore.config import ConfigError, TrainConfig, validate_sparse

    cfg = OmegaConf.structured(TrainConfig)
    for key, value in overrides.items():
        OmegaConf.update(cfg.rollout, key, value)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_sparse(cfg)


def test_resa_score_bounds_every_key_of_its_block_and_matches_a_loop():
    torch.manual_seed(1)
    b, h_kv, g, d, bs, n = 2, 2, 3, 8, 4, 5
    keys = torch.randn(b, h_kv, n * bs, d)
    query = torch.randn(b, h_kv * g, d)
    sel = ReSASelector(block_size=bs)
    scores = sel.block_scores(0, query, sel.summaries(0, keys, n * bs), torch.full((query.shape[0],), n * bs - 1))
    for bi in range(b):
        for h in range(h_kv):
            q = query[bi, h * g : (h + 1) * g].mean(0) / math.sqrt(d)
            for j in range(n):
                block = keys[bi, h, j * bs : (j + 1) * bs]
                kmin, kmax = block.min(0).values, block.max(0).values
                expected = sum(max(q[i] * kmin[i], q[i] * kmax[i]) for i in range(d))
                assert scores[bi, h, j].item() == pytest.approx(float(expected), abs=1e-5)
                assert scores[bi, h, j] >= (block @ q).max() - 1e-5  # an upper bound of q·k


@pytest.mark.parametrize("kv_len", [16, 37, 64 * 4, 64 * 4 + 1])
def test_resa_keeps_the_newest_block_and_the_configured_count(kv_len):
    torch.manual_seed(2)
    bs, ratio, min_blocks = 4, 0.1, 3
    keys = torch.randn(2, 2, 300, 8)
    # the newest block scores lowest unless forced: negate it relative to the query
    query = torch.ones(2, 4, 8)
    n = math.ceil(kv_len / bs)
    keys[:, :, (n - 1) * bs : kv_len] = -10.0
    table = ReSASelector(bs, ratio, min_blocks).select(0, query, keys, kv_len)
    assert table.shape[-1] == min(n, max(min_blocks, math.ceil(n * ratio)))
    assert (table == n - 1).any(-1).all()
    assert (table[..., 1:] > table[..., :-1]).all()  # ascending, no repeats


def test_summaries_are_made_once_per_block_and_truncate_drops_rewritten_ones():
    calls = []

    class Counting(ReSASelector):
        def summarize(self, layer_idx, key_blocks, block_ids):
            assert torch.equal(block_ids, torch.arange(int(block_ids[0]), int(block_ids[0]) + key_blocks.shape[2]))
            calls.append((int(block_ids[0]), key_blocks.shape[2]))
            return super().summarize(layer_idx, key_blocks, block_ids)

    keys = torch.randn(1, 1, 64, 4)
    sel = Counting(block_size=8, keep_ratio=0.5, min_blocks=1)
    for kv_len in range(20, 41):
        sel.select(0, torch.randn(1, 1, 4), keys, kv_len)
    assert calls == [(0, 2), (2, 1), (3, 1), (4, 1)]  # blocks 0-1 at prefill, then each as it fills
    sel.truncate(30)  # positions 30… rewritten: block 3 (24–31) and later must be rebuilt
    keys[:, :, 24:] = torch.randn(1, 1, 40, 4)
    sel.select(0, torch.randn(1, 1, 4), keys, 41)
    assert calls[-1] == (3, 2)
    assert torch.equal(sel.summaries(0, keys, 41)[:, :, 3], torch.stack([keys[:, :, 24:32].amin(2), keys[:, :, 24:32].amax(2)], 2))


def test_density_counts_the_rows_still_writing():
    """Two rows, one KV head, 4-token blocks, 10 keys (the newest block holds 2): row 0 reads
    blocks 0 and 2 (6 keys), row 1 all three (10): 16 of 20. With row 1 finished: 6 of 10."""
    from rlcore.sparse.attention import SparseDecoding

    table = torch.tensor([[[0, 2, -1]], [[0, 1, 2]]])
    state = SparseDecoding(ReSASelector(block_size=4))
    state.count(table, kv_len=10)
    assert (state.kept_keys, state.total_keys) == (16, 20)
    state = SparseDecoding(ReSASelector(block_size=4), live=torch.tensor([True, False]))
    state.count(table, kv_len=10)
    assert (state.kept_keys, state.total_keys) == (6, 10)


def test_sparse_loop_with_every_block_kept_equals_dense_generate(gqa_model):
    """min_blocks ≥ the number of blocks: the sparse path selects everything, so greedy decoding
    must equal transformers' own dense generate token for token (loop, cache and kernel right)."""
    prompt = [3, 14, 15, 9, 26, 5, 35, 8]
    state = install(gqa_model, ReSASelector(block_size=4, keep_ratio=0.1, min_blocks=64))
    try:
        ours = sparse_generate(gqa_model, [prompt], SamplingParams(n=2, max_new_tokens=24, temperature=0), {0}, state)[0]
        with dense(state):
            ref = gqa_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=0,
                                     pad_token_id=0)
    finally:
        gqa_model.set_attn_implementation("sdpa")
    assert state.density == 1.0
    assert ours[0].token_ids == ours[1].token_ids == ref[0, len(prompt):].tolist()[: len(ours[0].token_ids)]


def _dense_cache(model, tokens):
    cache = preallocated_cache(model, tokens.shape[1])
    model(input_ids=tokens, past_key_values=cache, use_cache=True)
    return cache


@torch.no_grad()
def test_rectification_restores_the_dense_kv(gqa_model):
    torch.manual_seed(3)
    prompt, f = torch.randint(1, 61, (2, 40)), 8
    state = install(gqa_model, ReSASelector(block_size=4, keep_ratio=0.1, min_blocks=1))
    try:
        cache = preallocated_cache(gqa_model, 64)
        with dense(state):
            gqa_model(input_ids=prompt, past_key_values=cache, use_cache=True)
        tokens = prompt
        for _ in range(f - 1):  # sparse steps write K/V that dense decoding would not
            nxt = torch.randint(1, 61, (2, 1))
            gqa_model(input_ids=nxt, past_key_values=cache, use_cache=True)
            tokens = torch.cat([tokens, nxt], 1)
        tokens = torch.cat([tokens, torch.randint(1, 61, (2, 1))], 1)
        reference = _dense_cache(gqa_model, tokens)
        sparse_k = cache.layers[1].keys.clone()
        assert state.density < 0.5
        assert not torch.allclose(sparse_k[:, :, 41:], reference.layers[1].keys[:, :, 41:47], atol=1e-4)
        logits = rectify(gqa_model, cache, tokens[:, -f:], state)
        dense_logits = gqa_model(input_ids=tokens).logits[:, -1]
    finally:
        gqa_model.set_attn_implementation("sdpa")
    assert cache.get_seq_length() == tokens.shape[1]
    for ours, ref in zip(cache.layers, reference.layers):
        torch.testing.assert_close(ours.keys, ref.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.values, ref.values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, dense_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sparse_loop_on_cuda_uses_the_triton_kernel_and_matches_dense_generate():
    """On CUDA block_sparse_decode dispatches to the Triton kernel, reading the preallocated
    cache's strided views in place: with every block kept, greedy decoding equals dense."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).cuda().eval()
    prompt = torch.randint(1, 97, (300,)).tolist()
    state = install(model, ReSASelector(block_size=16, keep_ratio=0.1, min_blocks=64))
    ours = sparse_generate(model, [prompt], SamplingParams(n=2, max_new_tokens=32, temperature=0), {0}, state)[0]
    with dense(state):
        ref = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=32, do_sample=False, eos_token_id=0, pad_token_id=0)
    assert state.density == 1.0
    assert ours[0].token_ids == ref[0, len(prompt):].tolist()[: len(ours[0].token_ids)]

    state = install(model, ReSASelector(block_size=16, keep_ratio=0.25, min_blocks=2))  # real sparsity: runs, is sparse
    sparse = sparse_generate(model, [prompt], SamplingParams(n=2, max_new_tokens=32, temperature=0), {0}, state, rectify_every=8)[0]
    assert len(sparse[0].token_ids) == 32 and state.density < 0.5


@pytest.mark.parametrize("rectify_every", [0, 8])
def test_batched_sparse_rollout_generates_and_counts_what_one_row_at_a_time_does(rectify_every):
    """The embedded model on held-out prompts: greedy answers end at different steps; the sparse
    loop keeps finished rows (fed EOS) until a quarter of its batch has finished, then drops
    them with their summaries and rectification tokens. Tokens and key counts must equal those
    of the same prompts generated one at a time (where a finished row ends its batch)."""
    from conftest import compose

    from rlcore.data import load_splits
    from rlcore.models import load_tokenizer
    from rlcore.rollout.hf import HFRolloutEngine

    cfg = compose("train", ["recipe=opo_math", "data.eval_size=24", "rollout.sparse.method=resa", "rollout.sparse.block_size=4",
                            "rollout.sparse.keep_ratio=0.5", "rollout.sparse.min_blocks=2",
                            f"rollout.sparse.rectify_every={rectify_every}"])
    _, held_out = load_splits(cfg.data, load_tokenizer(cfg.model.path))
    prompts = [p.token_ids for p in held_out]
    greedy = SamplingParams(n=1, max_new_tokens=64, temperature=0.0)
    engine = HFRolloutEngine(cfg.model.path, "float32", cfg.rollout.sparse)
    batched = [g[0].token_ids for g in engine.generate(prompts, greedy)]
    counts = (engine.sparse.kept_keys, engine.sparse.total_keys)
    engine.sparse.kept_keys = engine.sparse.total_keys = 0
    alone = [engine.generate([p], greedy)[0][0].token_ids for p in prompts]
    assert batched == alone
    lengths_by_prompt_length = {}
    for p, t in zip(prompts, batched):
        lengths_by_prompt_length.setdefault(len(p), set()).add(len(t))
    assert any(len(v) > 1 for v in lengths_by_prompt_length.values())  # a batch whose rows end apart
    assert counts == (engine.sparse.kept_keys, engine.sparse.total_keys)
