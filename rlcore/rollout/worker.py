"""Rollout workers (Ray actors around an engine) and the group the trainer talks to."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import ray
import torch

from rlcore import cluster
from rlcore.batch import Trajectory
from rlcore.data import Prompt
from rlcore.placement import cpu_options
from rlcore.rollout.engine import SamplingParams
from rlcore.rollout.programs import PROGRAMS


def make_engine(rollout_cfg, model_path: str, dtype: str, max_model_len: int, colocated: bool):
    if rollout_cfg.backend == "hf":
        from rlcore.rollout.hf import HFRolloutEngine

        return HFRolloutEngine(model_path, dtype, rollout_cfg.sparse)
    if rollout_cfg.backend == "vllm":
        from rlcore.rollout.vllm import VLLMRolloutEngine

        return VLLMRolloutEngine(model_path, dtype, rollout_cfg.vllm, max_model_len, sleeps=colocated,
                                 sparse=rollout_cfg.sparse)
    raise ValueError(f"unknown rollout backend {rollout_cfg.backend!r}")


class RolloutWorker:
    """One engine plus the rollout programs. A plain class: tests use it in-process, jobs as a Ray actor."""

    def __init__(self, rollout_cfg, model_path: str, dtype: str, max_model_len: int, threads: int, colocated: bool = False):
        torch.set_num_threads(threads)
        self.engine = make_engine(rollout_cfg, model_path, dtype, max_model_len, colocated)

    def run(self, program: str, prompts: list[Prompt], sampling: SamplingParams) -> list[Trajectory]:
        return PROGRAMS[program](self.engine, prompts, sampling)

    def score(self, batch, temperature: float):
        return self.engine.score(batch, temperature)

    def load_weights(self, state: dict) -> None:
        self.engine.load_weights(state.items())

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    def node_ip(self) -> str:
        return cluster.node_ip()


class RolloutGroup:
    """Splits a step's prompts over the workers; seeds each call so a resumed run samples the same."""

    def __init__(self, model_path: str, dtype: str, rollout_cfg, cluster_cfg, max_model_len: int, threads: int,
                 actor_options: list[dict] | None = None):
        """`actor_options`: Ray options per worker (rlcore.placement); default: `cpu_options`, as on a cluster without GPUs."""
        actor = ray.remote(RolloutWorker)
        colocated = cluster_cfg.placement == "colocated"
        options = actor_options or cpu_options(cluster_cfg, rollout_cfg.num_workers)
        self.workers = [
            actor.options(**o).remote(rollout_cfg, model_path, dtype, max_model_len, threads, colocated) for o in options
        ]

    def generate(self, prompts: list[Prompt], program: str, sampling: SamplingParams) -> list[Trajectory]:
        n = len(self.workers)
        chunks = [prompts[i::n] for i in range(n)]
        refs = [
            w.run.remote(program, chunk, dataclasses.replace(sampling, seed=sampling.seed * 1000 + i))
            for i, (w, chunk) in enumerate(zip(self.workers, chunks))
            if chunk
        ]
        trajectories = []
        for i, part in enumerate(ray.get(refs)):
            for t in part:  # local prompt index → index in the step's prompt list
                t.group_id = t.group_id * n + i
                trajectories.append(t)
        return trajectories

    def nodes(self) -> list[str]:
        """The node address of each worker."""
        return ray.get([w.node_ip.remote() for w in self.workers])

    def load_weights(self, state_ref) -> None:
        """`state_ref`: a Ray reference to a {name: tensor} dict, fetched by each worker from the object store."""
        ray.get([w.load_weights.remote(state_ref) for w in self.workers])

    @contextmanager
    def asleep(self):
        """Engines free their memory for the block (vLLM on GPUs shared with learners) and take it back after."""
        ray.get([w.sleep.remote() for w in self.workers])
        try:
            yield
        finally:
            ray.get([w.wake.remote() for w in self.workers])
