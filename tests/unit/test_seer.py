"""SeerAttention-R gates (rlcore/sparse/seer.py, distill.py) on tiny random GQA Llamas."""

import math

import pytest
import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rlcore.config import ConfigError
from rlcore.sparse.distill import capture_qk, distill_step, pack_texts, teacher_pass
from rlcore.sparse.seer import (
    AttnGate,
    SeerSelector,
    block_attention_target,
    build_gates,
    invert_model_rope,
    load_gates,
    model_rope,
    pool_blocks,
    save_gates,
)

BS = 4  # tiny blocks for a tiny model


def tiny_llama(layers=2, kv_heads=2, rope_parameters=None, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=kv_heads, head_dim=16, intermediate_size=128, max_position_embeddings=128,
                         rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("eager")
    model.requires_grad_(False)
    return model


def ids(batch=2, length=32, seed=1):
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_pool_blocks_matches_a_loop():
    x = torch.randn(2, 3, 5, BS, 8)
    out = pool_blocks(x)
    for b in range(2):
        for h in range(3):
            for j in range(5):
                block = x[b, h, j]  # [bs, D]
                expected = torch.cat([block.max(0).values, block.min(0).values, block.sum(0) / BS])
                torch.testing.assert_close(out[b, h, j], expected)


def rotate_pairs(x, position, theta):
    """Reference RoPE by explicit 2-D rotations of (x_i, x_{i+d/2}) pairs."""
    d = x.shape[-1]
    out = x.clone()
    for i in range(d // 2):
        angle = position * theta ** (-2 * i / d)
        c, s = math.cos(angle), math.sin(angle)
        out[..., i] = x[..., i] * c - x[..., i + d // 2] * s
        out[..., i + d // 2] = x[..., i] * s + x[..., i + d // 2] * c
    return out


def test_gate_keys_get_rope_at_each_blocks_first_position():
    gate = AttnGate(num_q_heads=4, num_kv_heads=2, head_dim=8, d_gate=16, block_size=BS, rope_theta=500.0)
    pooled = torch.randn(1, 2, 3, 24)
    first_block = 5
    out = gate.block_keys(pooled, torch.arange(first_block, first_block + 3))
    for h in range(2):
        for j in range(3):
            unrotated = pooled[0, h, j] @ gate.w_k[h]
            expected = rotate_pairs(unrotated.detach(), (first_block + j) * BS, 500.0)
            torch.testing.assert_close(out[0, h, j].detach(), expected, rtol=1e-4, atol=1e-5)


def test_gate_queries_concatenate_the_groups_heads():
    gate = AttnGate(num_q_heads=4, num_kv_heads=2, head_dim=8, d_gate=16, block_size=BS)
    q = torch.randn(1, 4, 3, 8)
    out = gate.queries(q, torch.arange(3)).detach()
    for h in range(2):
        concatenated = torch.cat([q[0, 2 * h], q[0, 2 * h + 1]], dim=-1)  # [T, g·D]
        for t in range(3):
            expected = rotate_pairs((concatenated[t] @ gate.w_q[h]).detach(), t, gate.rope_theta)
            torch.testing.assert_close(out[0, h, t], expected, rtol=1e-4, atol=1e-5)


def test_target_matches_a_hand_loop_on_a_gqa_llama():
    model = tiny_llama()
    _, _, probs = teacher_pass(model, ids(length=22))  # 22: the last block is partial
    p = probs[0]
    target = block_attention_target(p, num_kv_heads=2, block_size=BS)
    n = math.ceil(22 / BS)
    assert target.shape == (2, 2, 22, n)
    for b in range(2):
        for kv in range(2):
            for t in range(22):
                pooled = torch.zeros(n)
                for j in range(n):
                    for head in (2 * kv, 2 * kv + 1):  # the group's query heads
                        pooled[j] = max(pooled[j], p[b, head, t, j * BS : (j + 1) * BS].max())
                torch.testing.assert_close(target[b, kv, t], pooled / pooled.sum())


attention_inputs = []


def recording_attention(module, query, key, value, attention_mask, **kwargs):
    attention_inputs.append((query.detach().clone(), key.detach().clone()))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("seer_test_recording", recording_attention)


@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                                  {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 32}])
def test_inverting_the_models_rope_recovers_pre_rope_q_and_k(rope):
    model = tiny_llama(rope_parameters=rope)
    model.set_attn_implementation("seer_test_recording")
    attention_inputs.clear()
    with torch.no_grad(), capture_qk(model) as pre:
        model(input_ids=ids(length=40))
    positions = torch.arange(40)
    for layer, (q_post, k_post) in enumerate(attention_inputs):
        torch.testing.assert_close(invert_model_rope(q_post, positions, model.model.rotary_emb), pre["q"][layer], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(invert_model_rope(k_post, positions, model.model.rotary_emb), pre["k"][layer], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model_rope(pre["q"][layer], positions, model.model.rotary_emb), q_post, atol=1e-5, rtol=1e-4)


def test_gate_is_causal_over_blocks():
    gate = AttnGate(num_q_heads=4, num_kv_heads=2, head_dim=8, d_gate=16, block_size=BS)
    q, k = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8)
    probs = gate(q, k).exp().detach()
    for t in range(16):
        begun = t // BS + 1
        assert torch.all(probs[0, :, t, :begun] > 0) and torch.all(probs[0, :, t, begun:] == 0)
        torch.testing.assert_close(probs[0, :, t].sum(-1), torch.ones(2))
    later = k.clone()
    later[:, :, 8:] = torch.randn(1, 2, 8, 8)  # blocks 2 and 3 change: queries before position 8 must not notice
    torch.testing.assert_close(gate(q, later).exp().detach()[:, :, :8], probs[:, :, :8])


def test_distillation_lowers_the_loss_and_leaves_the_model_alone():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gates = build_gates(model.config, block_size=BS, d_gate=32)
    optimizer = torch.optim.AdamW(gates.parameters(), lr=1e-2)
    batch = ids(length=48)
    losses = [distill_step(model, gates, optimizer, batch) for _ in range(25)]
    assert losses[-1] < 0.6 * losses[0]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def decode_inputs(model, length):
    """Post-RoPE queries [B, H_q, T, D] and keys [B, H_kv, T, D] of layer 0, and the pre-RoPE ones."""
    with capture_qk(model) as pre:
        teacher_pass(model, ids(length=length))
    positions = torch.arange(length)
    q, k = pre["q"][0], pre["k"][0]
    return model_rope(q, positions, model.model.rotary_emb), model_rope(k, positions, model.model.rotary_emb), q, k


def test_selector_matches_the_gate_and_keeps_the_newest_block_within_budget():
    model = tiny_llama()
    gates = build_gates(model.config, block_size=BS, d_gate=32)
    q_post, k_post, q_pre, k_pre = decode_inputs(model, 40)
    trained_view = gates[0](q_pre, k_pre).exp().detach()  # [B, H_kv, T, n], the training path
    selector = SeerSelector(gates, model.model.rotary_emb, block_size=BS, budget_blocks=3)
    for t in range(40):
        table = selector.select(0, q_post[:, :, t], k_post, t + 1)
        n_blocks, complete = t // BS + 1, (t + 1) // BS
        assert table.dtype == torch.int32 and table.shape == (2, 2, min(3, n_blocks))
        assert torch.all(table[..., -1] == n_blocks - 1)  # the newest block, always
        assert torch.all(table[..., 1:] > table[..., :-1])
        if complete:  # decode-path scores = training-path gate over the complete blocks
            scores = selector.block_scores(0, q_post[:, :, t], selector.summaries(0, k_post, t + 1), torch.full((2,), t))
            expected = trained_view[:, :, t, :complete]
            torch.testing.assert_close(scores, expected / expected.sum(-1, keepdim=True), atol=1e-5, rtol=1e-4)
        if n_blocks > 3:  # the two best complete blocks besides the newest one
            older = scores[..., : n_blocks - 1].topk(2, dim=-1).indices.sort(-1).values
            assert torch.equal(table[..., :2].long(), older)


def test_threshold_selection_keeps_blocks_above_tau():
    model = tiny_llama()
    gates = build_gates(model.config, block_size=BS, d_gate=32)
    q_post, k_post, _, _ = decode_inputs(model, 40)
    selector = SeerSelector(gates, model.model.rotary_emb, threshold=0.1)
    table = selector.select(0, q_post[:, :, 39], k_post, 40)
    scores = selector.block_scores(0, q_post[:, :, 39], selector.summaries(0, k_post, 40), torch.full((2,), 39))
    for b in range(2):
        for h in range(2):
            kept = {int(j) for j in table[b, h] if j >= 0}
            assert kept == {j for j in range(9) if scores[b, h, j] > 0.1} | {9}


def test_gates_roundtrip_through_safetensors_and_refuse_another_model(tmp_path):
    model = tiny_llama()
    gates = build_gates(model.config, block_size=BS, d_gate=32)
    path = tmp_path / "seer_gates.safetensors"
    save_gates(gates, path)
    loaded = load_gates(model, path)
    assert loaded[0].block_size == BS and loaded[0].d_gate == 32
    for a, b in zip(gates.parameters(), loaded.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="do not fit this model: num_layers=2 \\(model: 3\\)"):
        load_gates(tiny_llama(layers=3), path)
    with pytest.raises(ConfigError, match="num_kv_heads=2 \\(model: 4\\)"):
        load_gates(tiny_llama(kv_heads=4), path)


def test_packing_lays_whole_texts_end_to_end():
    from rlcore.data import Prompt

    class CharTokenizer:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    prompts = [Prompt(str(i), f"q{i}", "", token_ids=[100 + i]) for i in range(3)]
    packed = pack_texts(prompts, lambda p: "ab", CharTokenizer(), seq_len=8, count=3, seed=0)
    assert packed.shape == (3, 8)
    stream = packed.flatten().tolist()
    for start in range(0, 20, 4):  # each text: its prompt token, 'a', 'b', EOS
        assert stream[start] in (100, 101, 102) and stream[start + 1 : start + 4] == [97, 98, 0]


def test_recipe_selects_gate_distillation():
    from hydra import compose, initialize_config_module

    import rlcore.cli  # noqa: F401  (registers the schemas and recipes)

    with initialize_config_module(config_module="rlcore.conf", version_base=None):
        distill = compose(config_name="sft", overrides=["recipe=seer_gate_distill", "sparse_distill.steps=3"])
        plain = compose(config_name="sft", overrides=["recipe=sft_arith"])
    assert distill.sparse_distill.block_size == 16 and distill.sparse_distill.steps == 3
    assert plain.sparse_distill is None


def test_block_recall_orders_gate_and_recency_under_the_oracle():
    from rlcore.sparse.distill import block_recall

    model = tiny_llama()
    gates = build_gates(model.config, block_size=BS, d_gate=32)
    recall = block_recall(model, gates, ids(length=40), budget_blocks=3)
    for layer in range(2):
        oracle = recall["oracle"]["per_layer"][layer]
        assert 0 < recall["recency"]["per_layer"][layer] <= oracle + 1e-4 <= 1 + 1e-4
        assert 0 < recall["gate"]["per_layer"][layer] <= oracle + 1e-4
