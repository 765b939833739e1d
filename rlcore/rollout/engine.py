"""The rollout engine interface. Backends: hf.py (transformers); vLLM joins next to it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    # Tokens that end a completion besides EOS, kept as its last token (finish_reason "stop");
    # the fork_join program stops the organizer at its tags this way.
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # log softmax(logits / temperature) of each chosen token
    finish_reason: str  # "stop" or "length"


def completions(ids: list[list[int]], logprobs: list[list[float]], eos_ids: set[int]) -> list[Completion]:
    """Generated rows → Completions cut after their first EOS ("stop"), else "length"."""
    out = []
    for row, lps in zip(ids, logprobs):
        end = next((i + 1 for i, t in enumerate(row) if t in eos_ids), None)
        out.append(Completion(row[: end or len(row)], lps[: end or len(row)], "stop" if end else "length"))
    return out


class RolloutEngine:
    """Generates completions for token-id prompts; takes new weights; frees memory when asked."""

    tokenizer: object  # the model's tokenizer: rollout programs look up tokens (e.g. mode tags) with it

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[list[Completion]]:
        """For each prompt, `sampling.n` completions."""
        raise NotImplementedError

    def score(self, batch, temperature: float):
        """Log-probs [B, R] the engine assigns to fixed sequences (a Batch's input_ids/response_ids);
        what the weight-sync check compares with the learner's."""
        raise NotImplementedError

    def load_weights(self, named_tensors: Iterable[tuple[str, object]]) -> None:
        raise NotImplementedError

    def decode(self, token_ids: list[int]) -> str:
        raise NotImplementedError

    # sleep/wake: the colocated-GPU contract (vLLM frees its memory while learners train).
    # The rollout group will call them around updates when colocated placement lands
    # (issue 3); on CPU there is nothing to free.
    def sleep(self) -> None:
        """Release memory while learners train (colocated GPUs). No-op where nothing is gained."""

    def wake(self) -> None:
        """Take memory back before generating."""
