"""GPU placement on a Ray cluster that declares GPUs it does not have: Ray still assigns GPU ids
to actors, which is all placement decides (the code paths stay on CPU)."""

import pytest
import ray
from omegaconf import OmegaConf

from rlcore.config import ClusterConfig, ConfigError
from rlcore.placement import plan_placement


@pytest.fixture(scope="module", autouse=True)
def ray_with_four_gpus():
    ray.init(address="local", num_cpus=2, num_gpus=4, include_dashboard=False)
    yield
    ray.shutdown()


@ray.remote
class Probe:
    def gpu_ids(self) -> list:
        return sorted(ray.get_gpu_ids())


def gpus_of(options: list[dict]) -> list[list]:
    return ray.get([Probe.options(**o).remote().gpu_ids.remote() for o in options])


def placed(placement_name, **sizes):
    cluster = OmegaConf.structured(ClusterConfig(placement=placement_name, cpus_per_actor=0.1))
    return plan_placement(cluster, timeout_s=30, **sizes)


def test_split_gives_rollout_and_learners_their_own_gpus():
    p = placed("split", rollout_workers=1, tensor_parallel=2, learner_ranks=2)
    rollout, learner = gpus_of(p.rollout), gpus_of(p.learner)
    assert [len(ids) for ids in rollout] == [2] and [len(ids) for ids in learner] == [1, 1]
    every = [g for ids in rollout + learner for g in ids]
    assert len(set(every)) == 4  # nothing shared
    ray.util.remove_placement_group(p.group)


def test_colocated_puts_rollout_worker_i_on_learner_rank_i_gpu():
    p = placed("colocated", rollout_workers=2, tensor_parallel=1, learner_ranks=2)
    rollout, learner = gpus_of(p.rollout), gpus_of(p.learner)
    assert rollout == learner and len({tuple(ids) for ids in learner}) == 2
    ray.util.remove_placement_group(p.group)


def test_asking_for_more_gpus_than_the_cluster_has_is_a_config_error():
    with pytest.raises(ConfigError, match="needs 6 GPUs.*has 4"):
        placed("split", rollout_workers=2, tensor_parallel=2, learner_ranks=2)


def test_colocated_needs_one_gpu_per_rollout_worker():
    with pytest.raises(ConfigError, match="tensor_parallel_size=1"):
        placed("colocated", rollout_workers=1, tensor_parallel=2, learner_ranks=2)


def test_a_reservation_the_cluster_cannot_make_is_a_config_error_not_a_wait():
    """4 GPUs free, but 4 actors × 1 CPU on a 2-CPU cluster: the placement group never fits."""
    cluster = OmegaConf.structured(ClusterConfig(placement="split", cpus_per_actor=1))
    with pytest.raises(ConfigError, match=r"could not reserve 4 GPUs with cluster.cpus_per_actor=1 CPUs per actor within 2 s"):
        plan_placement(cluster, rollout_workers=1, tensor_parallel=1, learner_ranks=3, timeout_s=2)
    assert not [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]  # none left holding GPUs
