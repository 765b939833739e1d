"""The embedded demo task: multi-term addition, worked column by column.

The working the default model learns (ones column first; every column after
the first adds the carry; the last column writes its whole sum):

    Calculate 814 + 707 + 965.
    <think>4+7+5=16, 1+0+6+1=8, 8+7+9+0=24</think> \\boxed{2486}

Writing whole partial sums ("814+707=1521") did not learn at this model size;
per-digit columns did (shared/NOTES-platform.md).

A verbose variant (for the length-reward recipes) repeats the working as a re-check on
a fixed share of the problems, chosen by a hash of the question so that it is the same
in every run:

    <think>4+7+5=16, 1+0+6+1=8, 8+7+9+0=24; check: 4+7+5=16, 1+0+6+1=8, 8+7+9+0=24</think> \\boxed{2486}
"""

from __future__ import annotations

import re
import zlib

from rlcore.data import Prompt


def column_addition_working(terms: list[int]) -> str:
    digits = [str(t)[::-1] for t in terms]
    width = max(len(d) for d in digits)
    columns, carry = [], 0
    for i in range(width):
        column = [int(d[i]) for d in digits if i < len(d)] + ([carry] if i > 0 else [])
        total = sum(column)
        columns.append("+".join(map(str, column)) + f"={total}")
        carry = total // 10
    return ", ".join(columns)


def column_addition_completion(prompt: Prompt, recheck: bool = False) -> str:
    terms = [int(x) for x in re.findall(r"\d+", prompt.text)]
    working = column_addition_working(terms)
    if recheck:
        working += f"; check: {working}"
    return f"<think>{working}</think> \\boxed{{{sum(terms)}}}"


RECHECK_SHARE = 0.7


def column_addition_completion_verbose(prompt: Prompt) -> str:
    """The working with a re-check on RECHECK_SHARE of the questions (fixed per question)."""
    recheck = zlib.crc32(prompt.text.encode()) % 1000 < RECHECK_SHARE * 1000
    return column_addition_completion(prompt, recheck)
