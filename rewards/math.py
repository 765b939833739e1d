"""Math correctness: the last \\boxed{} of the response against the ground truth, by math-verify."""

from __future__ import annotations

import logging

from math_verify import LatexExtractionConfig, parse, verify

from rlcore.reward import Sample

# math-verify warns on every call that its own timeouts are off; rlcore's reward pool
# bounds each call instead (reward.timeout_s), so the warning is noise here.
logging.getLogger("math_verify").setLevel(logging.ERROR)

# Only boxed answers count: a number mentioned in the working is not an answer.
_BOXED_ONLY = [LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)]


def last_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...} in text (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def math_correct(sample: Sample) -> float:
    """1.0 if the last boxed answer equals the ground truth (math-verify: 1/2 = 0.5 = \\frac{1}{2}), else 0.0."""
    answer = last_boxed(sample.response)
    if answer is None:
        return 0.0
    # Our own process-pool timeout bounds the call; math-verify's alarm-based ones are off.
    gold = parse(f"${sample.ground_truth}$", parsing_timeout=None)
    pred = parse(f"\\boxed{{{answer}}}", extraction_config=_BOXED_ONLY, parsing_timeout=None)
    return float(bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None))
