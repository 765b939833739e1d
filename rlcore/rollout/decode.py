"""The transformers backend's decode loop: the model's own forward, cache classes and top-p
warper, driven one step at a time instead of through `generate`, for what `generate` does not do:

- each prompt is prefilled once and its cache rows repeated for its n samples (`generate`
  prefills every sample's copy);
- finished rows leave the batch once a quarter of it has finished (`generate` runs every row
  until the longest one ends), so the last steps of a group run only the rows still writing;
- the cache is preallocated and written in place (DynamicCache concatenates the whole cache at
  every step);
- the sampled tokens' log-probs come out of the loop directly (no per-step logits kept);
- a caller may replace the dense step (an `Advance`): rlcore.sparse runs block-sparse steps and
  ReSA's rectification through it.

Greedy decoding equals transformers' `generate` token for token (tests/unit/test_decode.py).
On the W1 rollout (8 prompts × 8 samples × ≤ 64 tokens, CPU) this loop took 0.74× the time of
`generate`; most of the saving is the dropped rows.
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.generation.logits_process import TopPLogitsWarper

from rlcore.rollout.engine import Completion, SamplingParams, completions

COMPACT_AT = 0.25  # drop finished rows from the batch once this share of it has finished


class Advance(Protocol):
    """A replacement for the dense decode step that keeps state per batch row."""

    def __call__(self, tokens: torch.Tensor, cache: Cache, live: torch.Tensor) -> torch.Tensor:
        """One decode step fed tokens [B] → next-token logits [B, V]; live [B] marks the rows
        still writing (the others are fed EOS and their outputs dropped)."""

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Only these batch rows from now on, in this order (as the cache's keep_rows)."""


class PreallocatedLayer(DynamicLayer):
    """A cache layer with a fixed capacity, written in place; keys/values are views of the
    filled prefix, so attention sees exactly the valid positions."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, _ = key_states.shape
        self._k = key_states.new_empty(b, h, self.capacity, key_states.shape[-1])
        self._v = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        self._views()
        self.is_initialized = True

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"PreallocatedLayer: {end} positions exceed the capacity {self.capacity}")
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row becomes `repeats` rows (one prompt's prefill shared by its samples)."""
        self._k = self._k.repeat_interleave(repeats, dim=0)
        self._v = self._v.repeat_interleave(repeats, dim=0)
        self._views()

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Only these batch rows, in this order (finished samples leave the batch)."""
        self._k, self._v = self._k[rows], self._v[rows]
        self._views()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest |tokens_to_remove| positions (transformers' negative-count convention)."""
        self.length -= abs(tokens_to_remove)
        self._views()


def preallocated_cache(model, capacity: int) -> Cache:
    return Cache(layers=[PreallocatedLayer(capacity) for _ in range(model.config.num_hidden_layers)])


def sample(logits: torch.Tensor, sampling: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [B] and their log-probs under softmax(logits / temperature) (the rollout
    contract, before top-p truncation); top-p by transformers' warper."""
    logits = logits.float()
    if sampling.temperature == 0:
        token = logits.argmax(-1)
        return token, torch.log_softmax(logits, -1).gather(-1, token[:, None])[:, 0]
    scaled = logits / sampling.temperature
    warped = TopPLogitsWarper(sampling.top_p)(None, scaled) if sampling.top_p < 1 else scaled
    token = torch.multinomial(torch.softmax(warped, -1), 1)[:, 0]
    return token, torch.log_softmax(scaled, -1).gather(-1, token[:, None])[:, 0]


@torch.no_grad()
def generate(model, prompts: list[list[int]], sampling: SamplingParams, eos_ids: set[int], pad_id: int,
             advance: Advance | None = None) -> list[list[Completion]]:
    """`sampling.n` completions of each prompt (left-padded into one batch).

    `advance` replaces the dense step (prompts must then not need padding); it is told which
    rows leave the batch."""
    n, steps, device = sampling.n, sampling.max_new_tokens, model.device
    width = max(len(p) for p in prompts)
    pad = torch.tensor([width - len(p) for p in prompts], device=device)
    mask = (torch.arange(width, device=device)[None] >= pad[:, None]).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    cache = preallocated_cache(model, width + steps)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1].repeat_interleave(n, dim=0)
    cache.batch_repeat_interleave(n)

    rows = len(prompts) * n
    mask = torch.cat([mask.repeat_interleave(n, dim=0), mask.new_ones(rows, steps)], dim=1)
    first_position = positions[:, -1].repeat_interleave(n, dim=0) + 1  # of each row's first new token
    eos = torch.tensor(sorted(eos_ids), device=device)
    out_ids = torch.full((rows, steps), int(eos[0]), device=device)
    out_logp = torch.zeros(rows, steps, device=device)
    out_row = torch.arange(rows, device=device)  # batch row → output row
    live = torch.ones(rows, dtype=torch.bool, device=device)
    for step in range(steps):
        token, logp = sample(logits, sampling)
        token = torch.where(live, token, eos[0])
        out_ids[out_row, step], out_logp[out_row, step] = token, logp
        live &= ~torch.isin(token, eos)
        if step == steps - 1 or not bool(live.any()):
            break
        if int((~live).sum()) >= COMPACT_AT * live.numel():
            keep = live.nonzero()[:, 0]
            for layer in cache.layers:
                layer.keep_rows(keep)
            if advance is not None:
                advance.keep_rows(keep)
            out_row, token, mask, first_position, live = (t[keep] for t in (out_row, token, mask, first_position, live))
        if advance is not None:
            logits = advance(token, cache, live)
        else:
            logits = model(input_ids=token[:, None], attention_mask=mask[:, : width + step + 1],
                           position_ids=(first_position + step)[:, None], past_key_values=cache,
                           use_cache=True).logits[:, -1]
    done = completions(out_ids.tolist(), out_logp.tolist(), eos_ids)
    return [done[i * n : (i + 1) * n] for i in range(len(prompts))]
