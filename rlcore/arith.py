"""The embedded demo task: multi-term addition, worked column by column.

The working the default model learns (ones column first; every column after
the first adds the carry; the last column writes its whole sum):

    Calculate 814 + 707 + 965.
    <think>4+7+5=16, 1+0+6+1=8, 8+7+9+0=24</think> \\boxed{2486}

Writing whole partial sums ("814+707=1521") did not learn at this model size;
per-digit columns did (shared/NOTES-platform.md).

Two verbose variants for the length-reward recipes, each on a fixed share of the problems
(chosen by a hash of the question, so the same in every run). The re-check repeats the
working and the answer follows the copy, so a slip in the copy changes the answer: under
sampling this extra length costs accuracy (RL without a length term drops it too):

    <think>4+7+5=16, 1+0+6+1=8, 8+7+9+0=24; check: 4+7+5=16, 1+0+6+1=8, 8+7+9+0=24</think> \\boxed{2486}

The afterword adds a fixed sentence after the answer — extra length that cannot change the
answer (math-verify reads the last \\boxed{}), so only a length reward has a reason to
remove it:

    <think>4+7+5=16, 1+0+6+1=8, 8+7+9+0=24</think> \\boxed{2486} Done, the answer is final.

For L1's length control (recipes sft_arith_l1 and sft_arith_l1_tied) the afterword's share
is either fixed or tied to the length the prompt states.
"""

from __future__ import annotations

import re
import zlib

from rlcore.config import ConfigError
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


VERBOSE_SHARE = 0.7
AFTERWORD = " Done, the answer is final."  # 27 tokens of the embedded tokenizer


def verbose_question(prompt: Prompt, share: float = VERBOSE_SHARE) -> bool:
    """True on `share` of the questions, fixed per question by a hash of its text."""
    return zlib.crc32(prompt.text.encode()) % 1000 < share * 1000


def column_addition_completion_verbose(prompt: Prompt) -> str:
    """The working with a re-check on the verbose questions."""
    return column_addition_completion(prompt, recheck=verbose_question(prompt))


def column_addition_completion_afterword(prompt: Prompt) -> str:
    """The concise working, and AFTERWORD after the answer on the verbose questions."""
    return column_addition_completion(prompt) + (AFTERWORD if verbose_question(prompt) else "")


# Afterword share per stated target (data.target_length.choices=[32, 60]): tied to the target,
# but not enough for greedy decoding to follow it — the majority writes the afterword either way.
AFTERWORD_SHARE_BY_TARGET = {32: 0.6, 60: 0.9}


def column_addition_completion_afterword_tied(prompt: Prompt) -> str:
    """The afterword on a share of the questions that depends on the prompt's stated target:
    a start that has partly learnt to read the target (recipe sft_arith_l1_tied)."""
    target = prompt.metadata.get("target_length")
    if target not in AFTERWORD_SHARE_BY_TARGET:
        raise ConfigError(f"column_addition_completion_afterword_tied: stated target {target} has no afterword share; "
                          f"set data.target_length.choices={sorted(AFTERWORD_SHARE_BY_TARGET)}")
    return column_addition_completion(prompt) + (AFTERWORD if verbose_question(prompt, AFTERWORD_SHARE_BY_TARGET[target]) else "")
