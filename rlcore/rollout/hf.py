"""Rollout engine on a transformers model: the CPU backend. Generation is rlcore.rollout.decode's
loop over the model's own forward and cache (batched, KV cache, shared prefill, finished rows
dropped).

With rollout.sparse.method ≠ none, decode steps are block-sparse (rlcore.sparse) and
generation runs rlcore.sparse.generate's loop, one prompt's samples per batch; scoring stays
dense (the learner's numbers).
"""

from __future__ import annotations

import torch

from rlcore.models import load_model, load_tokenizer, response_logprobs
from rlcore.rollout import decode
from rlcore.rollout.engine import Completion, RolloutEngine, SamplingParams


class HFRolloutEngine(RolloutEngine):
    def __init__(self, model_path: str, dtype: str = "float32", sparse=None):
        self.tokenizer = load_tokenizer(model_path)
        self.model = load_model(model_path, dtype).eval()
        self.eos_ids = set(self._eos_ids())
        self.sparse, self.rectify_every = None, 0
        if sparse is not None and sparse.method != "none":
            from rlcore.sparse.attention import install_from_config

            self.sparse = install_from_config(self.model, sparse, model_path)
            self.rectify_every = sparse.rectify_every if sparse.method == "resa" else 0

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        return [i for i in eos + [self.tokenizer.eos_token_id] if i is not None]

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[list[Completion]]:
        torch.manual_seed(sampling.seed)
        stops = self.eos_ids | set(sampling.stop_token_ids)
        if self.sparse is not None:
            return self._generate_sparse(prompts, sampling, stops)
        return decode.generate(self.model, prompts, sampling, stops, self.tokenizer.pad_token_id)

    def _generate_sparse(self, prompts: list[list[int]], sampling: SamplingParams, stops: set[int]) -> list[list[Completion]]:
        """One batch per prompt length: sparse decoding takes no padding."""
        from rlcore.sparse.generate import sparse_generate

        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_length.setdefault(len(p), []).append(i)
        out: list[list[Completion]] = [[] for _ in prompts]
        for idx in by_length.values():
            groups = sparse_generate(self.model, [prompts[i] for i in idx], sampling, stops, self.sparse, self.rectify_every)
            for i, group in zip(idx, groups):
                out[i] = group
        return out

    @torch.no_grad()
    def score(self, batch, temperature: float):
        return response_logprobs(self.model, batch, temperature)[0]

    def load_weights(self, named_tensors) -> None:
        state = dict(named_tensors)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:  # lm_head may be tied to the embeddings
            raise RuntimeError(f"weight sync mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)
