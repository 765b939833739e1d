"""The sparse rollout decode loop: rlcore.rollout.decode's loop with block-sparse decode
steps over a batch of equal-length prompts (no padding, so cache position = token position),
and ReSA's dense rectification every f tokens (SPEC §8).

Rectification merges with the step that would feed the f-th sparse token: the cache drops the
f−1 entries written by sparse steps, and one dense causal forward over those tokens plus the
new one rewrites their K/V (what dense decoding would have written) and gives the next logits.
Block summaries of the rewritten blocks are dropped and rebuilt when those blocks fill again.
Prefill is dense by itself (the sparse attention decodes single-token queries only).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from rlcore.rollout import decode
from rlcore.rollout.engine import Completion, SamplingParams
from rlcore.sparse.attention import SparseDecoding, dense


def rectify(model, cache: Cache, recent: torch.Tensor, state: SparseDecoding) -> torch.Tensor:
    """Re-run the f tokens `recent` [B, f] densely: the cache holds the first f−1 of them
    (written by sparse steps) and is cut back before them; the dense causal forward rewrites
    their K/V and adds the last one's. Returns the next-token logits [B, V]."""
    cache.crop(-(recent.shape[1] - 1))
    state.selector.truncate(cache.get_seq_length())
    with dense(state):
        return model(input_ids=recent, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


def sparse_generate(model, prompts: list[list[int]], sampling: SamplingParams, eos_ids: set[int],
                    state: SparseDecoding, rectify_every: int = 0) -> list[list[Completion]]:
    """`sampling.n` completions of each prompt (all of one length). rectify_every = f > 0:
    ReSA rectification."""
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("sparse_generate: prompts of one batch must have one length (no padding)")
    state.selector.reset()
    try:
        return decode.generate(model, prompts, sampling, eos_ids, pad_id=0, advance=SparseStep(model, state, rectify_every))
    finally:
        state.live = None


class SparseStep:
    """The decode loop's step (rlcore.rollout.decode.Advance): block-sparse, and every f-th one a
    rectification."""

    def __init__(self, model, state: SparseDecoding, rectify_every: int):
        self.model, self.state, self.rectify_every = model, state, rectify_every
        self.fed: list[torch.Tensor] = []  # tokens fed by sparse steps since the last rectification

    def __call__(self, tokens: torch.Tensor, cache: Cache, live: torch.Tensor) -> torch.Tensor:
        self.state.live = live  # finished rows still in the batch: the density leaves them out
        self.fed.append(tokens)
        if self.rectify_every and len(self.fed) == self.rectify_every:
            recent = torch.stack(self.fed, dim=1)
            self.fed.clear()
            return rectify(self.model, cache, recent, self.state)
        return self.model(input_ids=tokens[:, None], past_key_values=cache, use_cache=True).logits[:, -1]

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.fed = [t[rows] for t in self.fed]
        self.state.selector.keep_rows(rows)
