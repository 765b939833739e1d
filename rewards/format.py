"""Format reward: reasoning inside <think>…</think>, then a \\boxed{} answer."""

from __future__ import annotations

import re

from rlcore.reward import Sample

_THINK_THEN_BOXED = re.compile(r"^\s*<think>.*?</think>.*\\boxed\{.+\}", re.DOTALL)


def think_format(sample: Sample) -> float:
    return float(bool(_THINK_THEN_BOXED.match(sample.response)))
