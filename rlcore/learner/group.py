"""N learner ranks as Ray actors, driven as one."""

from __future__ import annotations

import math

import ray
import torch

from rlcore.algorithm import LossNorm, kl_estimate, masked_mean
from rlcore.batch import plan_micro_batches, split_even
from rlcore.learner.rank import LearnerRank
from rlcore.placement import cpu_options


class LearnerGroup:
    def __init__(self, *, model_path: str, ref_path: str | None, dtype: str, learner_cfg, cluster_cfg, threads: int,
                 temperature: float, batch_size: int, mini_batches: int, total_optimizer_steps: int, seed: int,
                 actor_options: list[dict] | None = None):
        """`actor_options`: Ray options per rank (rlcore.placement); default: `cpu_options`, as on a cluster without GPUs."""
        n = learner_cfg.num_ranks
        options = actor_options or cpu_options(cluster_cfg, n)
        self.ranks = [ray.remote(LearnerRank).options(**o).remote(rank, n, threads) for rank, o in enumerate(options)]
        self.mini_batches = mini_batches
        # What the optimizer shards a checkpoint holds depend on; recorded with them (rlcore.checkpoint).
        self.layout = {"num_ranks": n, "zero_stage": learner_cfg.zero_stage}
        self.micro_rows, self.micro_tokens = learner_cfg.micro_batch_size, learner_cfg.micro_batch_tokens
        self.old_logprob_pass, self.has_reference = learner_cfg.old_logprob_pass, ref_path is not None
        shard = batch_size // (n * mini_batches)
        grad_accum = math.ceil(shard / learner_cfg.micro_batch_size)  # DeepSpeed's bookkeeping (see rank.py)
        master = ray.get(self.ranks[0].address.remote())
        ray.get([
            r.setup.remote(master, model_path, ref_path, dtype, learner_cfg, temperature, total_optimizer_steps, grad_accum, seed)
            for r in self.ranks
        ])

    def nodes(self) -> list[str]:
        """The node address of each rank, in rank order."""
        return ray.get([r.node_ip.remote() for r in self.ranks])

    def compute_logprobs(self, batch, algorithm) -> dict[str, float]:
        """Add old_logp (and ref_logp) to the batch before the update; return the entropy.
        With learner.old_logprob_pass=auto and one optimizer step per batch, old_logp comes
        from the update's own forward instead (see LearnerRank.update)."""
        old_from_update = self.old_logprob_pass == "auto" and algorithm.mini_batches == 1 and algorithm.epochs == 1
        if old_from_update and not self.has_reference:
            return {}
        return _absorb(batch, self._logprobs(batch, old=not old_from_update, reference=True, routers=algorithm.needs_router))

    def policy_shift(self, batch) -> dict[str, float]:
        """KL(π_old ‖ π_new) on the batch after the update: how far one step moved the policy
        (OPO's paper reports it). k3 estimate on the batch's own tokens, sampled from π_old;
        costs one more forward pass over the batch."""
        new_logp = torch.cat([out["old_logp"] for out in self._logprobs(batch, old=True, reference=False)])
        kl = kl_estimate(batch["old_logp"], new_logp, "k3")
        return {"policy_shift": float(masked_mean(kl, batch["response_mask"]))}

    def _logprobs(self, batch, old: bool, reference: bool, routers: bool = False) -> list[dict]:
        shards = split_even(batch, len(self.ranks))
        plans = plan_micro_batches(shards, self.micro_rows, self.micro_tokens)
        return ray.get([r.logprobs.remote(s, p, old, reference, routers) for r, s, p in zip(self.ranks, shards, plans)])

    def update(self, batch, algorithm) -> dict[str, float]:
        per_rank = [[] for _ in self.ranks]
        for mini in split_even(batch, self.mini_batches):
            # seqs: rows with loss tokens (build_batch's padding rows have none)
            mask = mini["response_mask"]
            norm = LossNorm(tokens=float(mask.sum().clamp(min=1)), seqs=float((mask.sum(-1) > 0).sum().clamp(min=1)))
            shards = split_even(mini, len(self.ranks))
            plans = plan_micro_batches(shards, self.micro_rows, self.micro_tokens)
            for rank_list, shard, plan in zip(per_rank, shards, plans):
                rank_list.append((shard, norm, plan))
        outs = ray.get([r.update.remote(work, algorithm) for r, work in zip(self.ranks, per_rank)])
        metrics = {k: _over_ranks(k)([m[k] for m, _ in outs]) for k in outs[0][0]}
        # old log-probs and entropy, when the ranks took them from this pass (empty otherwise)
        return metrics | _absorb(batch, [tensors for _, tensors in outs])

    def export_weights(self):
        """A Ray reference to rank 0's full weights (all ranks join the ZeRO-3 gather)."""
        refs = [r.export_weights.remote() for r in self.ranks]
        ray.get(refs[1:])
        return refs[0]

    def save(self, directory: str, tokenizer_from: str) -> None:
        ray.get([r.save.remote(directory, tokenizer_from) for r in self.ranks])

    def load_optimizer(self, directory: str) -> None:
        ray.get([r.load_optimizer.remote(directory) for r in self.ranks])


def _absorb(batch, outs: list[dict]) -> dict[str, float]:
    """Concatenate per-rank tensors (rank order = batch order) into the batch; entropy becomes a metric.
    Empty dicts add nothing."""
    for key in outs[0]:
        batch[key] = torch.cat([o[key] for o in outs])
    if "entropy" not in batch.keys():
        return {}
    mask = batch["response_mask"]
    return {"entropy": float((batch.pop("entropy") * mask).sum() / mask.sum().clamp(min=1))}


def _mean(values):
    return sum(values) / len(values)


def _over_ranks(key: str):
    """How a metric combines over ranks (see LearnerRank.update): maxima; loss shares add up;
    per-token means average."""
    return max if "max" in key else sum if "loss" in key else _mean
