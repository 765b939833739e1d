"""Rollout programs: how trajectories are made from engine calls.

`single` is one call: K samples per prompt. Multi-call programs (hybrid
thinking with forced mode tags, AsyncThink's fork/join organizer and workers)
register here too and run inside the rollout worker, next to the engine, so
the trainer loop never changes.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from rlcore.asyncthink import ForkJoinTrace, check_tokenizer, fork_join_tags, fork_query, misplaced_tags
from rlcore.batch import Trajectory, build_batch
from rlcore.data import Prompt
from rlcore.hybrid import NO_THINK, THINK, mode_tag_ids
from rlcore.rollout.engine import Completion, RolloutEngine, SamplingParams

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


@dataclass
class _Organizer:
    """One organizer trace being written by the fork_join program."""

    prompt: Prompt
    group_id: int
    response: list[int] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)  # 1 sampled by the organizer, 0 pasted worker text
    trace: ForkJoinTrace = field(default_factory=ForkJoinTrace)
    workers: list[Trajectory] = field(default_factory=list)  # in fork order, as trace.workers
    finish_reason: str = ""  # set when the trace has ended

    def add(self, tokens: list[int], logp: list[float], sampled: bool) -> None:
        self.response += tokens
        self.logp += logp
        self.mask += [int(sampled)] * len(tokens)


def generate_within(engine: RolloutEngine, prompts: list[list[int]], budgets: list[int], sampling: SamplingParams):
    """One completion per prompt, each cut to its own token budget ("length" when cut)."""
    out = engine.generate(prompts, dataclasses.replace(sampling, n=1, max_new_tokens=max(budgets)))
    cut = []
    for (c,), budget in zip(out, budgets):
        if len(c.token_ids) > budget:
            c = Completion(c.token_ids[:budget], c.logprobs[:budget], "length")
        cut.append(c)
    return cut


@register_program("fork_join", tokenizer_check=check_tokenizer)
def fork_join(engine: RolloutEngine, prompts: list[Prompt], sampling: SamplingParams) -> list[Trajectory]:
    """AsyncThink (SPEC §6, rlcore.asyncthink): sampling.n organizer traces per prompt, each with its workers.

    The organizers of all prompts decode together in rounds. Each round continues every live
    organizer until its next `</FORK-i>` or `<JOIN-i>` (stop tokens) or its end; a join pastes
    the worker's text (its response without EOS, then `</JOIN-i>`: loss mask 0, log-prob 0);
    then the workers forked in the round generate, together. A worker is complete before any
    join can name it (a join comes in a later round), and its text cannot depend on what the
    organizer wrote after the fork: the order of computation differs from true concurrency,
    the result does not. The clock (ForkJoinTrace) is what concurrency would take.

    Budgets: an organizer's response (sampled and pasted) stays within sampling.max_new_tokens;
    a worker writes at most max_new_tokens plus the organizer prompt's length minus its own
    prompt's (so no request is longer than the longest organizer request, which sized the
    engine, vLLM's max_model_len). A paste that does not fit ends the trace ("length").
    Each round samples with its own seed. The organizer's trace, worker count and critical path
    are in Trajectory.trace; its workers in Trajectory.workers (trained with its reward).
    """
    tags = fork_join_tags(engine.tokenizer)
    organizers = [_Organizer(p, i) for i, p in enumerate(prompts) for _ in range(sampling.n)]
    stop_at_tags = dataclasses.replace(sampling, stop_token_ids=tags.stops)
    limit = sampling.max_new_tokens
    for round_ in itertools.count():
        live = [o for o in organizers if not o.finish_reason]
        if not live:
            break
        seed = sampling.seed * 1009 + 2 * round_
        done = generate_within(engine, [o.prompt.token_ids + o.response for o in live],
                               [limit - len(o.response) for o in live], dataclasses.replace(stop_at_tags, seed=seed))
        forks = []  # (organizer, worker id, sub-query)
        for o, c in zip(live, done):
            o.add(c.token_ids, c.logprobs, sampled=True)
            o.trace.think(len(c.token_ids))
            tag = tags.kind_of(c.token_ids[-1]) if c.finish_reason == "stop" else None
            if tag is None or tag[0] not in ("/FORK", "JOIN"):
                o.finish_reason = c.finish_reason  # EOS, or out of budget
            elif (error := misplaced_tags(tags, c.token_ids)):
                o.trace.error = error
            elif tag[0] == "/FORK":
                if not o.trace.fork_refused(tag[1]):
                    forks.append((o, tag[1], fork_query(tags, c.token_ids)))
            elif (joined := o.trace.join(tag[1])) is not None:
                paste(o, o.workers[joined], tags.ids["/JOIN"][tag[1]], limit)
            if o.trace.error:
                o.finish_reason = "stop"
            elif not o.finish_reason and len(o.response) >= limit:
                o.finish_reason = "length"
        start_workers(engine, forks, dataclasses.replace(sampling, seed=seed + 1))
    return [
        Trajectory(o.prompt, o.response, o.logp, engine.decode(o.response), o.finish_reason, group_id=o.group_id,
                   loss_mask=o.mask, trace=o.trace.record(), workers=o.workers)
        for o in organizers
    ]


def paste(organizer: _Organizer, worker: Trajectory, close_tag: int, limit: int) -> None:
    """The worker's text (without its EOS) and `</JOIN-i>` into the organizer's context, unsampled."""
    text = worker.response_ids[:-1] if worker.finish_reason == "stop" else worker.response_ids
    pasted = (text + [close_tag])[: limit - len(organizer.response)]
    organizer.add(pasted, [0.0] * len(pasted), sampled=False)


def start_workers(engine: RolloutEngine, forks: list, sampling: SamplingParams) -> None:
    """Generate the workers forked in one round (one response each) and enter them in their organizers' pools.
    A trace whose `</FORK-i>` was its last token within budget still records that worker: it
    was started, and it counts in the trace's concurrency."""
    if not forks:
        return
    queries = [engine.decode(q) for _, _, q in forks]
    prompts = [worker_prompt(engine.tokenizer, q) for q in queries]
    budgets = [max(1, sampling.max_new_tokens + len(o.prompt.token_ids) - len(p)) for (o, _, _), p in zip(forks, prompts)]
    for (o, worker_id, _), query, ids, c in zip(forks, queries, prompts, generate_within(engine, prompts, budgets, sampling)):
        worker = Trajectory(Prompt(f"{o.prompt.id}/worker-{worker_id}", query, "", ids, {"role": "worker"}),
                            c.token_ids, c.logprobs, engine.decode(c.token_ids), c.finish_reason, group_id=o.group_id)
        o.trace.fork(worker_id, len(c.token_ids))
        o.workers.append(worker)


def worker_prompt(tokenizer, query: str) -> list[int]:
    """A worker's prompt: its sub-query alone, as the user message of the chat template."""
    return list(tokenizer.apply_chat_template([{"role": "user", "content": query}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))
