"""DeepSpeed learners at scale, on CPU with gloo: token-budget micro-batches, gradient
checkpointing, offload, bf16 and the reference model, each against a plain run on the same batch.

The plain run: one rank, ZeRO-2, fixed micro-batches of 2 rows, float32, torch AdamW.
What the comparisons can see: the gradient norm sees any loss-scaling error across ranks and
micro-batches (a dropped or doubled micro-batch, a wrong 1/world-size); the weights after one
Adam step (lr 1e-3, so each weight moves ~1e-3) see the gradient's direction. Tolerances:
grad_norm rel 1e-5, weights atol 2e-5 (2% of one step), log-probs atol 1e-5: the variants run
the same float32 math on differently shaped micro-batches.
"""

import pytest
import ray
import torch
from omegaconf import OmegaConf

from rlcore.algorithm import build_algorithm
from rlcore.batch import Trajectory, build_batch, micro_batches, plan_micro_batches, split_even
from rlcore.config import ClusterConfig, LearnerConfig
from rlcore.data import Prompt
from rlcore.learner.group import LearnerGroup
from rlcore.models import load_model, load_tokenizer

CLUSTER = OmegaConf.structured(ClusterConfig(cpus_per_actor=0.25))
ALGO = build_algorithm({"name": "grpo", "samples_per_prompt": 4})
ROWS, TOKENS = 16, 64  # the batch; the token budget of the token-budget runs


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def learners(model, ranks=2, dtype="float32", reference=False, **settings):
    cfg = OmegaConf.structured(LearnerConfig(num_ranks=ranks, micro_batch_size=2, lr=1e-3, **settings))
    return LearnerGroup(model_path=model, ref_path=model if reference else None, dtype=dtype, learner_cfg=cfg,
                        cluster_cfg=CLUSTER, threads=1, temperature=1.0, batch_size=ROWS, mini_batches=1,
                        total_optimizer_steps=10, seed=0)


def run(group, batch, algo=ALGO, inspect=None):
    """compute_logprobs + update + export, then `inspect` (on the live ranks), then the ranks
    go: (metrics, weights, the batch as updated), plus what `inspect` returned."""
    b = batch.clone()
    metrics = group.compute_logprobs(b, algo)
    metrics |= group.update(b, algo)
    weights = ray.get(group.export_weights())
    seen = inspect() if inspect else None
    for r in group.ranks:
        ray.kill(r)
    return (metrics, weights, b) if inspect is None else ((metrics, weights, b), seen)


def on_ranks(group, fn):
    """fn(rank object) on every rank actor."""
    return ray.get([r.__ray_call__.remote(fn) for r in group.ranks])


def record_layer_inputs(group):
    """Record (rows, tokens) of every call of the first decoder layer on every rank; returns
    the reader. A pre-hook, so recomputation counts: torch stops a checkpoint's recompute
    early, before post-forward hooks run."""
    def install(rank):
        rank.layer_inputs = []

        def record(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rank.layer_inputs.append(tuple(hidden.shape[:2]))

        rank.engine.module.model.layers[0].register_forward_pre_hook(record, with_kwargs=True)

    on_ranks(group, install)
    return lambda: on_ranks(group, lambda rank: rank.layer_inputs)


@pytest.fixture(scope="module")
def batch(tiny_model):
    """8 long rows then 8 short ones: with two ranks, rank 0 needs more token-budget
    micro-batches than rank 1 (the plan must even them out, or ZeRO-3 deadlocks)."""
    tok, vocab = load_tokenizer(tiny_model), load_model(tiny_model).config.vocab_size
    g = torch.Generator().manual_seed(0)

    def row(i, prompt, response):
        p, r = (int(torch.randint(lo, hi + 1, (1,), generator=g)) for lo, hi in (prompt, response))
        ids = torch.randint(3, vocab, (p + r,), generator=g).tolist()
        return Trajectory(Prompt(str(i), "", "", token_ids=ids[:p]), ids[p:], [0.0] * r, "", "stop", group_id=i // 4,
                          reward=float(torch.rand(1, generator=g)))

    rows = [row(i, (10, 14), (12, 20)) for i in range(8)] + [row(i, (3, 5), (1, 4)) for i in range(8, 16)]
    b = build_batch(rows, tok.pad_token_id)
    b["advantages"] = ALGO.advantages(b)
    alone = [plan_micro_batches([shard], 2, TOKENS)[0] for shard in split_even(b, 2)]
    assert len(alone[0]) > len(alone[1]) > 1
    return b


@pytest.fixture(scope="module")
def plain(tiny_model, batch):
    """(metrics, weights, batch) of the plain run, and whether each rank holds a reference."""
    group = learners(tiny_model, ranks=1, zero_stage=2, old_logprob_pass="always")
    return run(group, batch, inspect=lambda: on_ranks(group, lambda rank: rank.reference is not None))


def test_without_kl_no_reference_is_loaded_or_run(plain):
    """kl_coef=0: algorithm.needs_reference is False, so the trainer passes ref_path=None;
    no rank loads a reference and no ref_logp is computed."""
    assert not ALGO.needs_reference
    (_, _, b), has_reference = plain
    assert has_reference == [False] and "ref_logp" not in b.keys()


def assert_same_update(out, plain):
    """A run's (metrics, weights, batch) against the plain run's (tolerances: module doc)."""
    (m_a, w_a, _), ((m_b, w_b, _), _) = out, plain
    assert m_a["grad_norm"] == pytest.approx(m_b["grad_norm"], rel=1e-5)
    assert m_a["policy_loss"] == pytest.approx(m_b["policy_loss"], rel=1e-5, abs=1e-7)
    assert set(w_a) == set(w_b)
    for name in w_a:
        torch.testing.assert_close(w_a[name].float(), w_b[name].float(), atol=2e-5, rtol=0)


def assert_logp_close(a, b, mask):
    torch.testing.assert_close(a * mask, b * mask, atol=1e-5, rtol=0)


@pytest.mark.timeout(300)  # ranks that disagree on the micro-batch count hang in a collective
@pytest.mark.parametrize("ranks, zero_stage", [(1, 2), (2, 0), (2, 1), (2, 3)])
def test_token_budget_micro_batches_give_the_fixed_micro_batch_update(tiny_model, batch, plain, ranks, zero_stage):
    """Same gradient, however the rows are grouped. The ranks really run the planned, trimmed
    micro-batches, within the budget; under ZeRO-3 the separate old-log-prob pass
    (forward-only collectives) runs the evened-out plan too."""
    always = zero_stage == 3
    group = learners(tiny_model, ranks=ranks, zero_stage=zero_stage, micro_batch_tokens=TOKENS,
                     old_logprob_pass="always" if always else "auto")
    out, layer_inputs = run(group, batch, inspect=record_layer_inputs(group))
    assert_same_update(out, plain)
    assert_logp_close(out[2]["old_logp"], plain[0][2]["old_logp"], batch["response_mask"])

    shards = split_even(batch, ranks)
    planned = [[tuple(mb["input_ids"].shape) for mb in micro_batches(shard, plan)]
               for shard, plan in zip(shards, plan_micro_batches(shards, 2, TOKENS))]
    assert layer_inputs == [shapes * (2 if always else 1) for shapes in planned]
    assert all(rows == 1 or rows * width <= TOKENS for shapes in planned for rows, width in shapes)
    assert len(planned[0]) != ROWS // ranks // 2  # not the fixed micro_batch_size=2 plan


def test_gradient_checkpointing_recomputes_and_gives_the_same_update(tiny_model, batch, plain):
    group = learners(tiny_model, zero_stage=3, gradient_checkpointing=True)
    out, layer_inputs = run(group, batch, inspect=record_layer_inputs(group))
    # 8 rows a rank in micro-batches of 2 (old_logprob_pass=auto: the update's forward only);
    # each runs the layer twice: forward, then the recompute in the backward
    assert [len(calls) for calls in layer_inputs] == [2 * 4, 2 * 4]
    assert_same_update(out, plain)


@pytest.mark.slow  # the first run JIT-builds DeepSpeedCPUAdam: ~80 s on 2 idle cores, 3 min on a busy machine
@pytest.mark.parametrize("zero_stage, offload_params", [(2, False), (3, True)])
def test_offload_trains_like_the_plain_run(tiny_model, batch, plain, zero_stage, offload_params):
    """DeepSpeedCPUAdam on CPU-held optimizer states (and ZeRO-3 parameters on CPU): the
    same step as torch AdamW, and the full weights still export."""
    group = learners(tiny_model, zero_stage=zero_stage, offload_optimizer=True, offload_params=offload_params)
    kinds = on_ranks(group, lambda rank: type(rank.engine.basic_optimizer).__name__)
    assert kinds == ["DeepSpeedCPUAdam"] * 2
    out = run(group, batch)
    assert_same_update(out, plain)
    initial = load_model(tiny_model).state_dict()
    assert all(not torch.equal(out[1][k], initial[k]) for k in initial)


def test_bf16_trains_with_fp32_master_weights(tiny_model, batch, plain):
    """model.dtype=bfloat16: bf16 weights and activations, fp32 master weights and gradient
    accumulation in the ZeRO optimizer. bf16 rounding moves the gradient norm by ~1%."""
    group = learners(tiny_model, zero_stage=2, dtype="bfloat16", micro_batch_tokens=TOKENS)
    dtypes = on_ranks(group, lambda rank: (next(rank.engine.module.parameters()).dtype,  # weights
                                           rank.engine.optimizer.single_partition_of_fp32_groups[0].dtype,  # master
                                           rank.engine.get_data_types()[1]))  # gradient accumulation
    assert dtypes == [(torch.bfloat16, torch.float32, torch.float32)] * 2
    metrics, weights, _ = run(group, batch)
    assert metrics["grad_norm"] == pytest.approx(plain[0][0]["grad_norm"], rel=0.05)
    initial = load_model(tiny_model, "bfloat16").state_dict()
    moved = [k for k in initial if not torch.equal(weights[k], initial[k])]
    # every matrix moves by ~lr=1e-3; norm weights (1.0, bf16 spacing 2^-7) keep their value, their fp32 master moves
    assert all(k in moved for k in initial if initial[k].dim() == 2)
    assert all(w.dtype == torch.bfloat16 for w in weights.values())


def test_reference_under_zero3_is_partitioned_and_gives_the_initial_log_probs(tiny_model, batch, plain):
    """kl_coef > 0 loads the reference on the learner ranks, under ZeRO-3 as a partitioned
    inference engine. It holds the initial weights, so its log-probs are the plain run's old
    log-probs, and the KL (k3) and its gradient are 0 at the first step: the same update."""
    algo = build_algorithm({"name": "grpo", "samples_per_prompt": 4, "kl_coef": 0.1})
    group = learners(tiny_model, zero_stage=3, reference=True, micro_batch_tokens=TOKENS)
    total = sum(p.numel() for p in load_model(tiny_model).parameters())
    held = on_ranks(group, lambda rank: (sum(p.numel() for p in rank.reference.module.parameters()),
                                         sum(p.ds_tensor.numel() for p in rank.reference.module.parameters())))
    for local, partition in held:
        assert local == 0 and total / 2 <= partition < total / 2 + 1000  # half the weights each (+ padding)
    out = run(group, batch, algo)
    assert_logp_close(out[2]["ref_logp"], plain[0][2]["old_logp"], batch["response_mask"])
    assert abs(out[0]["kl_ref"]) < 1e-6
    assert_same_update(out, plain)
