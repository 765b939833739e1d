"""Where the actors run: Ray options for each rollout worker and each learner rank.

Without GPUs, every actor asks for `cluster.cpus_per_actor` CPUs and Ray puts
it anywhere (rollout and learners take turns, so they share cores).

With GPUs, one placement group reserves all the GPUs a run needs at once (all
or nothing: a half-placed job never holds GPUs while it waits for the rest):

  split      a bundle of rollout.vllm.tensor_parallel_size GPUs per rollout
             worker, then one GPU per learner rank; no GPU is shared.
  colocated  one GPU per learner rank; rollout worker i shares learner rank
             i's GPU (half of it each, as far as Ray counts). Memory is split by
             rollout.vllm.gpu_memory_utilization, and vLLM sleeps during updates.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlcore.config import ConfigError


@dataclass
class Placement:
    rollout: list[dict]  # ray.remote options, one per rollout worker
    learner: list[dict]  # one per learner rank
    group: object = None  # the Ray placement group holding the GPUs (None without GPUs)


def cpu_options(cluster_cfg, actors: int) -> list[dict]:
    """Ray options of `actors` actors on a cluster without GPUs: cluster.cpus_per_actor CPUs each."""
    return [{"num_cpus": cluster_cfg.cpus_per_actor}] * actors


def check_cpus_fit(cpus_per_actor: float, rollout_workers: int, learner_ranks: int) -> None:
    """ConfigError unless the Ray cluster's nodes hold every actor, each on one node: Ray would
    wait for the CPUs forever, and without a word."""
    import ray

    nodes = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]]
    actors = rollout_workers + learner_ranks
    if sum(int(cpus / cpus_per_actor + 1e-6) for cpus in nodes) < actors:
        raise ConfigError(
            f"cluster.cpus_per_actor={cpus_per_actor:g} for each of {actors} actors (rollout.num_workers={rollout_workers}, "
            f"learner.num_ranks={learner_ranks}) does not fit the Ray cluster's CPUs ({' + '.join(f'{c:g}' for c in nodes)} "
            "on its nodes); lower cluster.cpus_per_actor or the actor counts"
        )


def plan_placement(cluster_cfg, rollout_workers: int, tensor_parallel: int, learner_ranks: int, timeout_s: float = 600) -> Placement:
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cpus = cluster_cfg.cpus_per_actor
    gpus = ray.cluster_resources().get("GPU", 0)
    if not gpus:
        check_cpus_fit(cpus, rollout_workers, learner_ranks)
        return Placement(cpu_options(cluster_cfg, rollout_workers), cpu_options(cluster_cfg, learner_ranks))

    if cluster_cfg.placement == "split" or not learner_ranks:  # nothing to share with (rlcore eval)
        bundles = [{"GPU": tensor_parallel, "CPU": cpus}] * rollout_workers + [{"GPU": 1, "CPU": cpus}] * learner_ranks
        rollout_slots = [(i, tensor_parallel) for i in range(rollout_workers)]
        learner_slots = [(rollout_workers + j, 1) for j in range(learner_ranks)]
    else:
        if tensor_parallel != 1 or rollout_workers > learner_ranks:
            raise ConfigError(
                "cluster.placement=colocated puts one rollout worker on a learner rank's GPU: it needs "
                "rollout.vllm.tensor_parallel_size=1 and rollout.num_workers ≤ learner.num_ranks; or use cluster.placement=split"
            )
        bundles = [{"GPU": 1, "CPU": 2 * cpus}] * learner_ranks
        rollout_slots = [(i, 0.5) for i in range(rollout_workers)]
        learner_slots = [(j, 0.5) for j in range(learner_ranks)]
    needed = sum(b["GPU"] for b in bundles)
    if needed > gpus:
        raise ConfigError(
            f"cluster.placement={cluster_cfg.placement} needs {needed:g} GPUs (rollout workers × tensor parallel size "
            f"+ learner ranks, or learner ranks when colocated); the Ray cluster has {gpus:g}"
        )
    group = placement_group(bundles, strategy="PACK")
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(group)
        raise ConfigError(
            f"cluster.placement={cluster_cfg.placement}: Ray could not reserve {needed:g} GPUs with "
            f"cluster.cpus_per_actor={cpus:g} CPUs per actor within {timeout_s:g} s; other jobs hold them, or a node "
            "has too few CPUs (lower cluster.cpus_per_actor); `ray status` shows what is free"
        ) from None

    def options(bundle: int, gpu_share: float) -> dict:
        strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=bundle)
        return {"num_cpus": cpus, "num_gpus": gpu_share, "scheduling_strategy": strategy}

    return Placement([options(*s) for s in rollout_slots], [options(*s) for s in learner_slots], group)
