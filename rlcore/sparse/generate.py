"""The sparse rollout decode loop: block-sparse decode steps over a batch of equal-length
prompts (no padding, so cache position = token position), and ReSA's dense rectification
every f tokens (SPEC §8).

transformers' `generate` has no place to re-run tokens, so this is a plain loop over the
model's forward with transformers' own cache API and sampling warpers. Rectification merges
with the step that would feed the f-th sparse token: the cache drops the f−1 entries written
by sparse steps, and one dense causal forward over those tokens plus the new one rewrites
their K/V (what dense decoding would have written) and gives the next logits. Block
summaries of the rewritten blocks are dropped and rebuilt when those blocks fill again.

The cache is preallocated (`PreallocatedLayer`): transformers' DynamicCache concatenates the
whole cache at every step, a copy as large as the attention read that sparsity saves. Each
prompt is prefilled once and its cache rows repeated for its n samples.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.generation.logits_process import LogitsProcessorList, TopPLogitsWarper

from rlcore.rollout.engine import Completion, SamplingParams, completions
from rlcore.sparse.attention import SparseDecoding, dense


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
        self.keys, self.values = self._k[:, :, :0], self._v[:, :, :0]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"PreallocatedLayer: {end} positions exceed the capacity {self.capacity}")
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row becomes `repeats` rows (one prompt's prefill shared by its samples)."""
        self._k = self._k.repeat_interleave(repeats, dim=0)
        self._v = self._v.repeat_interleave(repeats, dim=0)
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest |tokens_to_remove| positions (transformers' negative-count convention)."""
        self.length -= abs(tokens_to_remove)
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]


def preallocated_cache(model, capacity: int) -> Cache:
    return Cache(layers=[PreallocatedLayer(capacity) for _ in range(model.config.num_hidden_layers)])


def sample(logits: torch.Tensor, tokens: torch.Tensor, sampling: SamplingParams):
    """Next tokens [B] and their log-probs under softmax(logits / temperature) (the rollout
    contract, before top-p truncation), sampled with transformers' warpers."""
    logits = logits.float()
    if sampling.temperature == 0:
        nxt = logits.argmax(-1)
        return nxt, torch.log_softmax(logits, -1).gather(-1, nxt[:, None])[:, 0]
    scaled = logits / sampling.temperature
    warped = LogitsProcessorList([TopPLogitsWarper(sampling.top_p)])(tokens, scaled) if sampling.top_p < 1 else scaled
    nxt = torch.multinomial(torch.softmax(warped, -1), 1)[:, 0]
    return nxt, torch.log_softmax(scaled, -1).gather(-1, nxt[:, None])[:, 0]


def rectify(model, cache: Cache, recent: torch.Tensor, state: SparseDecoding) -> torch.Tensor:
    """Re-run the f tokens `recent` [B, f] densely: the cache holds the first f−1 of them
    (written by sparse steps) and is cut back before them; the dense causal forward rewrites
    their K/V and adds the last one's. Returns the next-token logits [B, V]."""
    cache.crop(-(recent.shape[1] - 1))
    state.selector.truncate(cache.get_seq_length())
    with dense(state):
        return model(input_ids=recent, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


@torch.no_grad()
def sparse_generate(model, prompts: list[list[int]], sampling: SamplingParams, eos_ids: set[int],
                    state: SparseDecoding, rectify_every: int = 0) -> list[list[Completion]]:
    """`sampling.n` completions of each prompt (all of one length). rectify_every = f > 0:
    ReSA rectification."""
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("sparse_generate: prompts of one batch must have one length (no padding)")
    n, device = sampling.n, model.device
    cache = preallocated_cache(model, len(prompts[0]) + sampling.max_new_tokens)
    state.selector.reset()
    with dense(state):  # each prompt once; its n samples share the prefilled cache rows
        logits = model(input_ids=torch.tensor(prompts, device=device), past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1].repeat_interleave(n, dim=0)
    cache.batch_repeat_interleave(n)
    tokens = torch.tensor([p for p in prompts for _ in range(n)], device=device)
    eos = torch.tensor(sorted(eos_ids), device=device)
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=device)
    new_ids, new_logps = [], []
    sparse_since_rectify = 0  # cache entries written by sparse steps since the last rectification
    for step in range(sampling.max_new_tokens):
        nxt, logp = sample(logits, tokens, sampling)
        nxt = torch.where(finished, eos[0], nxt)
        new_ids.append(nxt)
        new_logps.append(logp)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        finished |= torch.isin(nxt, eos)
        if bool(finished.all()) or step == sampling.max_new_tokens - 1:
            break
        if rectify_every and sparse_since_rectify + 1 == rectify_every:
            logits = rectify(model, cache, tokens[:, -rectify_every:], state)
            sparse_since_rectify = 0
        else:
            logits = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
            sparse_since_rectify += 1
    rows = completions(torch.stack(new_ids, 1).tolist(), torch.stack(new_logps, 1).tolist(), eos_ids)
    return [rows[i * n : (i + 1) * n] for i in range(len(prompts))]

