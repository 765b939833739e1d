"""Rollout workers (Ray actors around an engine) and the group the trainer talks to."""

from __future__ import annotations

import dataclasses

import ray
import torch

from rlcore.batch import Trajectory
from rlcore.data import Prompt
from rlcore.rollout.engine import SamplingParams
from rlcore.rollout.programs import PROGRAMS


def make_engine(backend: str, model_path: str, dtype: str):
    if backend == "hf":
        from rlcore.rollout.hf import HFRolloutEngine

        return HFRolloutEngine(model_path, dtype)
    raise ValueError(f"unknown rollout backend {backend!r}")


class RolloutWorker:
    """One engine plus the rollout programs. A plain class: tests use it in-process, jobs as a Ray actor."""

    def __init__(self, backend: str, model_path: str, dtype: str, threads: int):
        torch.set_num_threads(threads)
        self.engine = make_engine(backend, model_path, dtype)

    def run(self, program: str, prompts: list[Prompt], sampling: SamplingParams) -> list[Trajectory]:
        return PROGRAMS[program](self.engine, prompts, sampling)

    def score(self, batch, temperature: float):
        return self.engine.score(batch, temperature)

    def load_weights(self, state: dict) -> None:
        self.engine.load_weights(state.items())


class RolloutGroup:
    """Splits a step's prompts over the workers; seeds each call so a resumed run samples the same."""

    def __init__(self, model_path: str, dtype: str, rollout_cfg, cluster_cfg, threads: int):
        actor = ray.remote(num_cpus=cluster_cfg.cpus_per_actor)(RolloutWorker)
        self.workers = [actor.remote(rollout_cfg.backend, model_path, dtype, threads) for _ in range(rollout_cfg.num_workers)]

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

    def load_weights(self, state_ref) -> None:
        """`state_ref`: a Ray reference to a {name: tensor} dict, fetched by each worker from the object store."""
        ray.get([w.load_weights.remote(state_ref) for w in self.workers])
