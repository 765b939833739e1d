"""Rollout programs: how trajectories are made from engine calls.

`single` is one call: K samples per prompt. Multi-call programs (hybrid
thinking with forced mode tags, AsyncThink's fork/join organizer and workers)
register here too and run inside the rollout worker, next to the engine, so
the trainer loop never changes.
"""

from __future__ import annotations

from typing import Callable

from rlcore.batch import Trajectory
from rlcore.data import Prompt
from rlcore.rollout.engine import RolloutEngine, SamplingParams

PROGRAMS: dict[str, Callable[[RolloutEngine, list[Prompt], SamplingParams], list[Trajectory]]] = {}


def register_program(name: str):
    def wrap(fn):
        PROGRAMS[name] = fn
        return fn

    return wrap


@register_program("single")
def single(engine: RolloutEngine, prompts: list[Prompt], sampling: SamplingParams) -> list[Trajectory]:
    """K = sampling.n samples per prompt; each trajectory's group_id is its prompt's index."""
    groups = engine.generate([p.token_ids for p in prompts], sampling)
    return [
        Trajectory(prompt, c.token_ids, c.logprobs, engine.decode(c.token_ids), c.finish_reason, group_id=i)
        for i, (prompt, completions) in enumerate(zip(prompts, groups))
        for c in completions
    ]
