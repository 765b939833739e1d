"""Rollout programs: how trajectories are made from engine calls.

`single` is one call: K samples per prompt. Multi-call programs (hybrid
thinking with forced mode tags, AsyncThink's fork/join organizer and workers)
register here too and run inside the rollout worker, next to the engine, so
the trainer loop never changes.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable

from rlcore.batch import Trajectory, build_batch
from rlcore.data import Prompt
from rlcore.hybrid import NO_THINK, THINK, mode_tag_ids
from rlcore.rollout.engine import RolloutEngine, SamplingParams

PROGRAMS: dict[str, Callable[[RolloutEngine, list[Prompt], SamplingParams], list[Trajectory]]] = {}
# Checks of a program against the model's tokenizer, run in the driver before workers start (check_program).
TOKENIZER_CHECKS: dict[str, Callable] = {}


def register_program(name: str, tokenizer_check: Callable | None = None):
    def wrap(fn):
        PROGRAMS[name] = fn
        if tokenizer_check is not None:
            TOKENIZER_CHECKS[name] = tokenizer_check
        return fn

    return wrap


def check_program(name: str, tokenizer) -> None:
    """A one-line ConfigError now if program `name` cannot run with this tokenizer, rather than
    an error inside a rollout worker later."""
    if name in TOKENIZER_CHECKS:
        TOKENIZER_CHECKS[name](tokenizer)


@register_program("single")
def single(engine: RolloutEngine, prompts: list[Prompt], sampling: SamplingParams) -> list[Trajectory]:
    """K = sampling.n samples per prompt; each trajectory's group_id is its prompt's index."""
    groups = engine.generate([p.token_ids for p in prompts], sampling)
    return [
        Trajectory(prompt, c.token_ids, c.logprobs, engine.decode(c.token_ids), c.finish_reason, group_id=i)
        for i, (prompt, completions) in enumerate(zip(prompts, groups))
        for c in completions
    ]


def forced_modes(engine: RolloutEngine, prompts: list[Prompt], sampling: SamplingParams, modes: tuple[int, ...]) -> list[Trajectory]:
    """sampling.n samples per prompt in each of `modes` (rlcore.hybrid), the mode forced by its tag.

    The tag token is appended to the prompt and the engine continues after it. The response is
    the tag plus the continuation, so the learner scores the tag (response token 0, where HGPO
    puts its mode advantage) and the tag counts in rollout.max_new_tokens. The engine did not
    sample the tag, so its rollout log-prob is the engine's score of it after the prompt (one
    forward over the prompts): it then enters the mismatch metrics and truncated IS like any
    sampled token. Greedy sampling scores at temperature 1, as the engines report greedy log-probs.
    """
    tags = mode_tag_ids(engine.tokenizer)
    forced = [(i, prompt, mode) for i, prompt in enumerate(prompts) for mode in modes]
    tag_only = build_batch([Trajectory(p, [tags[m]], [0.0], "", "stop") for _, p, m in forced], engine.tokenizer.pad_token_id)
    tag_logp = engine.score(tag_only, sampling.temperature or 1.0)[:, 0].tolist()
    continuation = dataclasses.replace(sampling, max_new_tokens=sampling.max_new_tokens - 1)
    groups = engine.generate([p.token_ids + [tags[m]] for _, p, m in forced], continuation)
    return [
        Trajectory(prompt, [tags[mode], *c.token_ids], [lp, *c.logprobs], engine.decode([tags[mode], *c.token_ids]),
                   c.finish_reason, group_id=i, mode=mode)
        for (i, prompt, mode), lp, completions in zip(forced, tag_logp, groups)
        for c in completions
    ]


@register_program("hybrid", tokenizer_check=mode_tag_ids)
def hybrid(engine: RolloutEngine, prompts: list[Prompt], sampling: SamplingParams) -> list[Trajectory]:
    """Hybrid thinking (HGPO, SPEC §2): sampling.n / 2 samples per prompt forced into think
    mode, as many into no-think mode; one group per prompt, each trajectory's `mode` set."""
    if sampling.n % 2:
        raise ValueError(f"the hybrid program splits a prompt's samples evenly between two modes; got n={sampling.n}")
    return forced_modes(engine, prompts, dataclasses.replace(sampling, n=sampling.n // 2), (THINK, NO_THINK))


# One forced mode: e.g. the always-think comparison in `rlcore eval hybrid.mode=think`.
register_program("think", tokenizer_check=mode_tag_ids)(partial(forced_modes, modes=(THINK,)))
register_program("no_think", tokenizer_check=mode_tag_ids)(partial(forced_modes, modes=(NO_THINK,)))
