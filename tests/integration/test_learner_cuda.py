"""One learner rank on a GPU: a DeepSpeed engine on CUDA over NCCL, in bf16, in-process.

The CPU suite runs the learners with gloo (test_learner_scale, test_ray_learner); this file
checks the GPU path of the same code: LearnerRank.setup brings up an NCCL process group
(world size 1) and a DeepSpeed engine on CUDA in bfloat16 (fp32 master weights), then one
old-log-prob pass, one update and the weight export the rollout workers receive, for ZeRO-2
and ZeRO-3, token-budget micro-batches and gradient checkpointing.

Needs CUDA (skipped otherwise) and nothing from tests/conftest.py: the model is a random
Llama written to a temporary folder, the batch is made here like test_learner_scale's.
The GPU runs bf16, so the comparisons between runs are loose (bf16 rounding moves the
gradient norm by ~1%, see test_learner_scale.test_bf16_trains_with_fp32_master_weights).
"""

from __future__ import annotations

import gc
import math
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if CUDA:
    # tests/conftest.py defaults DS_ACCELERATOR to cpu for the CPU suite (setdefault, at
    # conftest import); DeepSpeed reads it once, at its first get_accelerator().
    os.environ["DS_ACCELERATOR"] = "cuda"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]

from rlcore.algorithm import LossNorm, build_algorithm  # noqa: E402
from rlcore.batch import Trajectory, build_batch, micro_batches, plan_micro_batches  # noqa: E402
from rlcore.config import LearnerConfig  # noqa: E402
from rlcore.data import Prompt  # noqa: E402
from rlcore.learner.rank import LearnerRank, free_port  # noqa: E402
from rlcore.models import load_model, response_logprobs  # noqa: E402

ALGO = build_algorithm({"name": "grpo", "samples_per_prompt": 4})
ROWS, TOKENS = 16, 64  # the batch; the token budget of the token-budget run
VOCAB, HIDDEN = 1024, 128  # embed_tokens / lm_head: 131k weights, above ZeRO-3's persistence threshold (1e5)
DTYPE = "bfloat16"
# Expected device and process-group backend. A CPU dry run of this file (gloo, DeepSpeed's CPU
# accelerator) may patch these two; nothing else here depends on CUDA.
EXPECT = {"device": "cuda", "backend": "nccl"}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    """A random 2-layer Llama (head size 32), float32 safetensors; the ranks load it in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def batch():
    """16 rows in groups of 4: 8 long then 8 short (so a token budget packs them unevenly)."""
    g = torch.Generator().manual_seed(0)

    def row(i, prompt, response):
        p, r = (int(torch.randint(lo, hi + 1, (1,), generator=g)) for lo, hi in (prompt, response))
        ids = torch.randint(3, VOCAB, (p + r,), generator=g).tolist()
        return Trajectory(Prompt(str(i), "", "", token_ids=ids[:p]), ids[p:], [0.0] * r, "", "stop", group_id=i // 4,
                          reward=float(torch.rand(1, generator=g)))

    rows = [row(i, (10, 14), (12, 20)) for i in range(8)] + [row(i, (3, 5), (1, 4)) for i in range(8, 16)]
    b = build_batch(rows, pad_id=0)
    b["advantages"] = ALGO.advantages(b)
    return b


@pytest.fixture(scope="module", autouse=True)
def process_group():
    """The ranks' setup creates the process group (the first one; later ones find it up);
    it goes when the module's tests are done."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run(model_path, batch, inspect=None, **settings) -> dict:
    """A fresh rank: setup, old log-probs, one update (one optimizer step), export; then
    `inspect(rank, plan)` on the live rank, then the engine goes. The rank's cfg: one rank,
    micro-batches of 4 rows, lr 1e-3, plus `settings`."""
    cfg = LearnerConfig(**({"num_ranks": 1, "micro_batch_size": 4, "lr": 1e-3} | settings))
    b = batch.clone()
    plan = plan_micro_batches([b], cfg.micro_batch_size, cfg.micro_batch_tokens)[0]
    rank = LearnerRank(rank=0, world_size=1, threads=4)
    rank.setup(("127.0.0.1", free_port()), model_path, None, DTYPE, cfg, temperature=1.0, total_optimizer_steps=10,
               grad_accum=math.ceil(ROWS / cfg.micro_batch_size), seed=0)
    layer_inputs = record_layer_inputs(rank)
    try:
        out = rank.logprobs(b, plan, old=True)
        b["old_logp"] = out["old_logp"]
        norm = LossNorm(tokens=float(b["response_mask"].sum().clamp(min=1)), seqs=float(ROWS))
        metrics, seen = rank.update([(b, norm, plan)], ALGO)
        assert not seen  # old_logp was given: the update takes none from its own pass
        weights = rank.export_weights()
        result = dict(metrics=metrics, weights=weights, old_logp=out["old_logp"], entropy=out["entropy"], plan=plan,
                      layer_inputs=list(layer_inputs), batch=b)
        result["inspected"] = inspect(rank, plan) if inspect else None
        return result
    finally:
        engine = rank.engine
        if hasattr(engine, "destroy"):
            engine.destroy()
        del rank, engine
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()


def record_layer_inputs(rank) -> list:
    """(rows, tokens) of every call of the first decoder layer (a pre-hook: recomputes count)."""
    calls = []

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        calls.append(tuple(hidden.shape[:2]))

    rank.engine.module.model.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    return calls


def initial_weights(model_path) -> dict[str, torch.Tensor]:
    return load_model(model_path, DTYPE).state_dict()


def assert_sane_step(result, model_path):
    """Finite, non-zero loss and gradient; every matrix moved; the export is full, bf16, on CPU."""
    m = result["metrics"]
    assert math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0, m
    assert math.isfinite(m["policy_loss"]) and m["policy_loss"] != 0, m
    # old log-probs came from the same weights: the update's ratio is 1 up to bf16 noise
    assert m["ratio_max_dev"] < 0.05, m
    mask = result["batch"]["response_mask"]
    old = result["old_logp"]
    assert torch.isfinite(old).all() and old[mask.bool()].max() < 0
    initial = initial_weights(model_path)
    exported = result["weights"]
    assert set(exported) == set(initial)
    for name, tensor in initial.items():
        assert exported[name].shape == tensor.shape, name  # full shapes, also under ZeRO-3
        assert exported[name].dtype == torch.bfloat16 and exported[name].device.type == "cpu", name
        assert torch.isfinite(exported[name].float()).all(), name
    # every matrix moves by ~lr=1e-3 (bf16 spacing at the init scale ~1e-4); norm weights (1.0,
    # bf16 spacing 2^-7) may keep their value while their fp32 master moves
    unmoved = [k for k, v in initial.items() if v.dim() == 2 and torch.equal(exported[k], v)]
    assert not unmoved, unmoved


def assert_logp_near_fp32(result, model_path):
    """The GPU bf16 old log-probs against the float32 model on CPU (bf16 logits: ~1e-2)."""
    b = result["batch"]
    with torch.no_grad():
        ref, _ = response_logprobs(load_model(model_path, "float32").eval(), b, 1.0)
    mask = b["response_mask"]
    torch.testing.assert_close(result["old_logp"] * mask, ref * mask, atol=0.05, rtol=0)


def on_gpu(rank, plan):
    """Where the rank runs, read on the live rank: backend, world size, devices, dtypes, ZeRO-3
    partitioning, and the full parameters (gathered under ZeRO-3) for the export check."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    module = rank.engine.module
    params = dict(module.named_parameters())
    info = {
        "backend": torch.distributed.get_backend(),
        "world_size": torch.distributed.get_world_size(),
        "accelerator": get_accelerator()._name,
        "engine_device": rank.engine.device.type,
        "devices": {p.device.type for p in params.values()},
        "dtypes": {p.dtype for p in params.values()},
        "checkpointing": module.is_gradient_checkpointing,
    }
    if rank.zero_stage == 3:
        info["ds_numel"] = {k: p.ds_numel for k, p in params.items()}
        info["partition_devices"] = {p.ds_tensor.device.type for p in params.values()}
        # released between uses: a non-persistent parameter holds no data outside a gather
        info["embed_local_numel"] = module.model.embed_tokens.weight.numel()
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=rank.zero_stage == 3):
        info["params"] = {k: p.detach().to("cpu", copy=True) for k, p in params.items()}
    info["master_dtype"] = master_dtype(rank)
    return info


def master_dtype(rank):
    opt = rank.engine.optimizer
    groups = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(opt, "fp32_partitioned_groups_flat", None)
    return groups[0].dtype if groups else None


def assert_on_gpu(info, zero_stage, initial):
    assert info["backend"] == EXPECT["backend"] and info["world_size"] == 1
    assert info["accelerator"] == EXPECT["device"] and info["engine_device"] == EXPECT["device"]
    assert info["devices"] == {EXPECT["device"]} and info["dtypes"] == {torch.bfloat16}
    assert info["master_dtype"] == torch.float32  # fp32 master weights in the ZeRO optimizer
    if zero_stage == 3:
        assert info["ds_numel"] == {k: v.numel() for k, v in initial.items()}
        assert info["partition_devices"] == {EXPECT["device"]}
        assert info["embed_local_numel"] == 0


@pytest.fixture(scope="module")
def plain(model_path, batch):
    """ZeRO-2, fixed micro-batches of 4 rows: the run the variants are compared with."""
    return run(model_path, batch, zero_stage=2)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_one_step_on_cuda_with_nccl(model_path, batch, plain, zero_stage):
    """Setup, old log-probs, one update and the export, on CUDA over NCCL in bf16; the export
    is the engine's full parameters (gathered under ZeRO-3, where the rank holds partitions)."""
    result = run(model_path, batch, inspect=on_gpu, zero_stage=zero_stage)
    initial = initial_weights(model_path)
    assert_on_gpu(result["inspected"], zero_stage, initial)
    assert_sane_step(result, model_path)
    assert_logp_near_fp32(result, model_path)
    params = result["inspected"]["params"]
    assert set(params) == set(result["weights"])  # no buffers in the state dict
    for name, tensor in params.items():
        assert torch.equal(result["weights"][name], tensor), name
    # ZeRO-3 runs the same step as ZeRO-2 (bf16 noise aside)
    assert result["metrics"]["grad_norm"] == pytest.approx(plain["metrics"]["grad_norm"], rel=0.05)
    assert result["metrics"]["policy_loss"] == pytest.approx(plain["metrics"]["policy_loss"], rel=0.05, abs=1e-4)
    # 4 micro-batches of 4 rows, each through the layer twice: the old-log-prob pass, the update
    assert [rows for rows, _ in result["layer_inputs"]] == [4] * 8


@pytest.mark.timeout(180)
def test_token_budget_micro_batches_on_cuda(model_path, batch, plain):
    """learner.micro_batch_tokens under ZeRO-3: the rank runs the planned, trimmed micro-batches
    (within the budget) in both passes, and the step is the fixed-micro-batch one."""
    result = run(model_path, batch, inspect=on_gpu, zero_stage=3, micro_batch_size=2, micro_batch_tokens=TOKENS)
    initial = initial_weights(model_path)
    assert_on_gpu(result["inspected"], 3, initial)
    assert_sane_step(result, model_path)
    planned = [tuple(mb["input_ids"].shape) for mb in micro_batches(batch, result["plan"])]
    assert len(planned) != ROWS // 2  # not the fixed micro_batch_size=2 plan
    assert all(rows == 1 or rows * width <= TOKENS for rows, width in planned)
    assert result["layer_inputs"] == planned * 2
    assert result["metrics"]["grad_norm"] == pytest.approx(plain["metrics"]["grad_norm"], rel=0.05)
    assert result["metrics"]["policy_loss"] == pytest.approx(plain["metrics"]["policy_loss"], rel=0.05, abs=1e-4)
    mask = batch["response_mask"]
    torch.testing.assert_close(result["old_logp"] * mask, plain["old_logp"] * mask, atol=0.05, rtol=0)


@pytest.mark.timeout(180)
def test_gradient_checkpointing_on_cuda(model_path, batch, plain):
    """learner.gradient_checkpointing under ZeRO-3 on CUDA: the backward recomputes each
    micro-batch's layers (non-reentrant, under ZeRO-3's gather hooks) and gives the same step."""
    result = run(model_path, batch, inspect=on_gpu, zero_stage=3, gradient_checkpointing=True)
    initial = initial_weights(model_path)
    info = result["inspected"]
    assert info["checkpointing"]
    assert_on_gpu(info, 3, initial)
    assert_sane_step(result, model_path)
    # 4 micro-batches: once in the old-log-prob pass (no grad: no recompute), twice in the update
    assert len(result["layer_inputs"]) == 4 + 2 * 4
    assert result["metrics"]["grad_norm"] == pytest.approx(plain["metrics"]["grad_norm"], rel=0.05)
    assert result["metrics"]["policy_loss"] == pytest.approx(plain["metrics"]["policy_loss"], rel=0.05, abs=1e-4)
