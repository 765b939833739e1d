"""Hybrid thinking (SPEC §2, HGPO): the two modes, their tags, and the HFT cold-start completion.

A response opens with its mode tag, `<think>` (working, then the answer) or `<no_think>`
(the answer alone). Each tag must be one token of the model's vocabulary: the rollout forces
a mode by appending the tag to the prompt, and the learner scores it as response token 0.
The embedded model has `<think>`; the HFT cold start adds `<no_think>` and `</no_think>`
(`rlcore sft recipe=sft_hybrid`, option sft.add_tokens).

HFT completions on the mixed task (rlcore.arith_mix): hard problems in think mode with the
column working of rlcore.arith, easy ones answered directly in no-think mode:

    Calculate 814 + 707.   <think>4+7=11, 1+0+1=2, 8+7+0=15</think> \\boxed{1521}
    Calculate 4 + 1 + 7.   <no_think>\\boxed{12}</no_think>

The no-think answer sits inside its tags (the paper's `<no_think>…</no_think>` form); the
math reward reads the last \\boxed{} wherever it is.
"""

from __future__ import annotations

from rlcore.arith import column_addition_completion
from rlcore.config import ConfigError
from rlcore.data import Prompt

# Values of Trajectory.mode and batch["modes"]; NO_MODE: a response that opened with neither tag.
THINK, NO_THINK, NO_MODE = 1, 0, -1
MODE_TAGS = {THINK: "<think>", NO_THINK: "<no_think>"}
MODE_NAMES = {THINK: "think", NO_THINK: "no_think"}


def mode_tag_ids(tokenizer) -> dict[int, int]:
    """{THINK: token id of <think>, NO_THINK: token id of <no_think>}; a one-line ConfigError
    when the tokenizer splits a tag into several tokens (a model without the HFT cold start)."""
    ids = {}
    for mode, tag in MODE_TAGS.items():
        pieces = tokenizer(tag, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            raise ConfigError(
                f"model.path: the tokenizer splits the mode tag {tag!r} into {len(pieces)} tokens; hybrid thinking needs "
                f"it as one token: start from an HFT model (rlcore sft recipe=sft_hybrid adds it with sft.add_tokens)"
            )
        ids[mode] = pieces[0]
    return ids


def response_mode(response_ids: list[int], tag_ids: dict[int, int]) -> int:
    """The mode a response chose by its first token: THINK, NO_THINK or NO_MODE."""
    first = response_ids[0] if response_ids else None
    return next((mode for mode, tag in tag_ids.items() if tag == first), NO_MODE)


def hft_completion(prompt: Prompt) -> str:
    """`sft.completion_fn` of the HFT cold start: think mode for metadata["difficulty"] == "hard",
    the boxed ground truth in no-think mode for "easy" (see the module docstring)."""
    difficulty = prompt.metadata.get("difficulty")
    if difficulty == "hard":
        return column_addition_completion(prompt)
    if difficulty == "easy":
        return f"<no_think>\\boxed{{{prompt.ground_truth}}}</no_think>"
    raise ConfigError(
        f"sft.completion_fn=rlcore.hybrid:hft_completion needs prompts tagged metadata['difficulty'] easy|hard "
        f"(got {difficulty!r}); use data=arith_mix"
    )
