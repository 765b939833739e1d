"""RPT next-token reward (SPEC §5): the boxed prediction against the true continuation, byte by byte.

r = 1 if ȳ (the prediction's UTF-8 bytes) is a prefix of x̄ (the true continuation's bytes)
and |ȳ| ∈ L (the cumulative byte lengths of the true next tokens), else 0: a prediction of
several tokens counts when it ends on a token boundary, part of a token does not.

The truth travels with the prompt (rlcore.rpt writes it; a Prompt's metadata reaches
Sample.metadata): `metadata["continuation"]` is x̄, the text of the next few tokens, and
`metadata["boundaries"]` is L, e.g. " the", " cat" → [4, 8]. A row without them (a plain
question/answer file) is one token: x̄ = ground_truth, L = [len(x̄)].

Rules decided here:
- ȳ is the last \\boxed{} after the last `</think>`. A response without `</think>` scores 0:
  it never finished reasoning (usually cut off by max_new_tokens), and a box inside the
  reasoning is a draft, not the answer.
- Leading whitespace is not compared: it is dropped from ȳ and from x̄ (L keeps counting
  from the start of x̄). Most tokens start with a space (" the"), and a model writes
  \\boxed{the}; so \\boxed{the} and \\boxed{ the} both match " the", and \\boxed{the} also
  matches "the" after "(". Every other byte counts, trailing whitespace included.
- An empty prediction scores 0.
- A boundary inside a multi-byte character can never be reached: ȳ is whole characters.
"""

from __future__ import annotations

from rlcore.reward import Sample
from rlcore.rewards.math import last_boxed


def final_prediction(response: str) -> str | None:
    """The last \\boxed{} after the last </think>, or None."""
    _, think_end, answer = response.rpartition("</think>")
    return last_boxed(answer) if think_end else None


def prefix_match(prediction: str, continuation: str, boundaries) -> bool:
    """ȳ is a byte prefix of x̄ ending on a token boundary, leading whitespace of both ignored."""
    y = prediction.encode().lstrip()
    x = continuation.encode()
    skipped = len(x) - len(x.lstrip())
    return bool(y) and x[skipped:].startswith(y) and skipped + len(y) in set(boundaries)


def rpt_prefix(sample: Sample) -> float:
    prediction = final_prediction(sample.response)
    if prediction is None:
        return 0.0
    continuation = sample.metadata.get("continuation", sample.ground_truth)
    boundaries = sample.metadata.get("boundaries", [len(continuation.encode())])
    return float(prefix_match(prediction, continuation, boundaries))
