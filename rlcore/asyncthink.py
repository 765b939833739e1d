"""AsyncThink (SPEC §6, arXiv 2510.26658): one model as organizer and workers.

The organizer writes its own thinking and, at any point,

    <FORK-i>sub-query</FORK-i>    start worker i on the sub-query (concurrently)
    <JOIN-i>                      wait for worker i; its returned text is pasted after the tag,
                                  closed by </JOIN-i>

and ends with its final answer. A worker sees only its sub-query (as a user message of the
chat template) and answers it as an ordinary response. Every tag is one token of the model's
vocabulary, added at the format cold start (`rlcore sft recipe=sft_asyncthink`, sft.add_tokens:
TAG_TOKENS), so the rollout stops the organizer at `</FORK-i>` and `<JOIN-i>` by token id.

Time is counted in decoding steps (ForkJoinTrace): each sampled organizer token is one step;
a worker forked at step f with L tokens finishes at f + L; a join waits until then. The final
clock is the critical-path length of the fork/join graph, SPEC's
`end_i = max(end_{i−1} + len_i, fork_w + len_w)` over the workers w joined after fragment i.

Format errors (the rollout stops the organizer at the first): a fork of an id still in the pool
(duplicate id), a join of an id not in it (unknown id), and misplaced tags (misplaced_tags: a
`</FORK-i>` that closes no `<FORK-i>`, a tag inside a sub-query). Pool overflow (more than c − 1 workers at once)
and no answer are judged by the reward (rlcore.rewards.asyncthink), which knows c.

Cold start (`organizer_completion`) on addition: four or more terms → the organizer forks two
workers on the two halves, joins both and adds their answers with the column working of
rlcore.arith; fewer terms → sequential thinking (the column working, no fork):

    Calculate 814 + 707 + 965 + 861.
    <FORK-1>Calculate 814 + 707.</FORK-1><FORK-2>Calculate 965 + 861.</FORK-2>
    <JOIN-1><think>4+7=11, …</think> \\boxed{1521}</JOIN-1><JOIN-2>…\\boxed{1826}</JOIN-2>
    <think>1+6=7, 2+2+0=4, 5+8+0=13, 1+1+1=3</think> \\boxed{3347}

(one line in the data; broken here for reading). The pasted worker text is part of the SFT
target: it is what the workers write, and the organizer never generates it at rollout time,
where the rollout stops at <JOIN-i> and pastes the worker's own text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

from rlcore.arith import column_addition_completion
from rlcore.config import ConfigError
from rlcore.data import Prompt

MAX_WORKER_ID = 4  # ids 1..4: with the default capacity c = 4 (3 workers at once) an overflow is expressible
KINDS = ("FORK", "/FORK", "JOIN", "/JOIN")
TAG_TOKENS = [f"<{kind}-{i}>" for i in range(1, MAX_WORKER_ID + 1) for kind in KINDS]
_CLOSE_JOIN = re.compile(r"</JOIN-\d+>")


@dataclass(frozen=True)
class Tags:
    """Token ids of the fork/join tags: {kind: {worker id: token id}}, and back."""

    ids: dict[str, dict[int, int]]

    @cached_property
    def _by_token(self) -> dict[int, tuple[str, int]]:
        return {tag: (kind, worker) for kind, by_worker in self.ids.items() for worker, tag in by_worker.items()}

    def kind_of(self, token: int) -> tuple[str, int] | None:
        """(kind, worker id) of a tag token; None for any other token."""
        return self._by_token.get(token)

    @property
    def stops(self) -> tuple[int, ...]:
        """Where the rollout stops the organizer: `</FORK-i>` (start a worker) and `<JOIN-i>` (paste its text)."""
        return tuple(self.ids["/FORK"].values()) + tuple(self.ids["JOIN"].values())


def fork_join_tags(tokenizer) -> Tags:
    """The tags' token ids; a one-line ConfigError when the tokenizer splits one (a model without
    the format cold start)."""
    ids: dict[str, dict[int, int]] = {kind: {} for kind in KINDS}
    for i in range(1, MAX_WORKER_ID + 1):
        for kind in KINDS:
            tag = f"<{kind}-{i}>"
            pieces = tokenizer(tag, add_special_tokens=False)["input_ids"]
            if len(pieces) != 1:
                raise ConfigError(
                    f"model.path: the tokenizer splits the AsyncThink tag {tag!r} into {len(pieces)} tokens; the fork_join "
                    "program needs each tag as one token: start from the format cold start (rlcore sft recipe=sft_asyncthink)"
                )
            ids[kind][i] = pieces[0]
    return Tags(ids)


def check_tokenizer(tokenizer) -> None:
    """What the fork_join program needs of the model's tokenizer, as one-line ConfigErrors: the
    tags as single tokens, and a chat template to put each worker's sub-query in."""
    fork_join_tags(tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("model.path: the tokenizer has no chat template; the fork_join program gives each worker its "
                          "sub-query as a user message of it: use a chat model")


@dataclass
class ForkJoinTrace:
    """The clock, worker pool and format error of one organizer trace (see the module docstring)."""

    clock: int = 0  # decoding steps on the critical path so far
    organizer_steps: int = 0  # tokens the organizer sampled
    pool: dict[int, int] = field(default_factory=dict)  # worker id → index in `workers`, forked and not joined
    workers: list[tuple[int, int]] = field(default_factory=list)  # (fork step, length in tokens) of every fork
    max_pool: int = 0
    error: str = ""

    def think(self, tokens: int) -> None:
        self.clock += tokens
        self.organizer_steps += tokens

    def fork_refused(self, worker: int) -> bool:
        """Whether forking `worker` now is a format error (its id is in the pool); records the error."""
        if worker in self.pool:
            self.error = f"duplicate id: <FORK-{worker}> while worker {worker} is still running"
        return bool(self.error)

    def fork(self, worker: int, length: int) -> None:
        """Worker `worker` starts now and writes `length` tokens (fork_refused said it may)."""
        self.pool[worker] = len(self.workers)
        self.workers.append((self.clock, length))
        self.max_pool = max(self.max_pool, len(self.pool))

    def join(self, worker: int) -> int | None:
        """Wait for `worker`; its index in `workers`, or None (and the error recorded) when it is not running."""
        if worker not in self.pool:
            self.error = f"unknown id: <JOIN-{worker}> without a running worker {worker}"
            return None
        index = self.pool.pop(worker)
        start, length = self.workers[index]
        self.clock = max(self.clock, start + length)
        return index

    def concurrency(self) -> float:
        """η = (1/T)·Σ_t active workers at step t, T the final clock: each worker is active from its
        fork for its length, cut at T if never joined."""
        if self.clock == 0:
            return 0.0
        return sum(max(0, min(length, self.clock - start)) for start, length in self.workers) / self.clock

    def record(self) -> dict:
        """What the reward and the metrics read (Trajectory.trace). total_steps: the decoding
        steps of organizer and workers together, the critical path had nothing run concurrently."""
        total = self.organizer_steps + sum(length for _, length in self.workers)
        return {"critical_path": float(self.clock), "total_steps": float(total), "concurrency": self.concurrency(),
                "workers": float(len(self.workers)), "max_pool": float(self.max_pool), "format_error": self.error}


def misplaced_tags(tags: Tags, fragment: list[int]) -> str:
    """The format error of an organizer fragment that ends at a stop tag ("" if none). It began
    after the previous stop tag or paste, so a `</FORK-i>` must close the one `<FORK-i>` in it
    (the sub-query between them holds no tag), and before a `<JOIN-i>` it holds no tag at all."""
    inner = [tag for tag in map(tags.kind_of, fragment[:-1]) if tag]
    end = tags.kind_of(fragment[-1])
    if end[0] == "/FORK" and inner != [("FORK", end[1])]:
        return f"misplaced tags: </FORK-{end[1]}> must close the one <FORK-{end[1]}> of its fragment, found {inner or 'none'}"
    if end[0] == "JOIN" and inner:
        return f"misplaced tags: {inner} before <JOIN-{end[1]}> in the same fragment"
    return ""


def fork_query(tags: Tags, fragment: list[int]) -> list[int]:
    """The sub-query of a well-formed fragment ending at `</FORK-i>`: the tokens after its `<FORK-i>`."""
    opening = max(k for k, t in enumerate(fragment[:-1]) if tags.kind_of(t))
    return fragment[opening + 1 : -1]


def final_text(response: str) -> str:
    """The organizer's text after its last pasted worker text: where its own final answer is."""
    return _CLOSE_JOIN.split(response)[-1]


def organizer_completion(prompt: Prompt) -> str:
    """`sft.completion_fn` of the format cold start (see the module docstring)."""
    terms = [int(x) for x in re.findall(r"\d+", prompt.text)]
    if len(terms) < 4:
        return column_addition_completion(prompt)
    halves = terms[: len(terms) // 2], terms[len(terms) // 2 :]
    queries = [f"Calculate {' + '.join(map(str, half))}." for half in halves]
    answers = [column_addition_completion(Prompt("", q, "")) for q in queries]
    forks = "".join(f"<FORK-{i}>{q}</FORK-{i}>" for i, q in enumerate(queries, 1))
    joins = "".join(f"<JOIN-{i}>{a}</JOIN-{i}>" for i, a in enumerate(answers, 1))
    final = column_addition_completion(Prompt("", " + ".join(str(sum(h)) for h in halves), ""))
    return forks + joins + final
