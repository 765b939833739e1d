"""Rollout engine on transformers' `generate` (batched, KV cache): the CPU backend.

With rollout.sparse.method ≠ none, decode steps are block-sparse (rlcore.sparse) and
generation runs rlcore.sparse.generate's loop, one prompt's samples per batch; scoring stays
dense (the learner's numbers).
"""

from __future__ import annotations

import torch

from rlcore.models import load_model, load_tokenizer, response_logprobs
from rlcore.rollout.engine import Completion, RolloutEngine, SamplingParams, completions


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

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[list[Completion]]:
        if self.sparse is not None:
            return self._generate_sparse(prompts, sampling)
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        rows = [p for p in prompts for _ in range(sampling.n)]
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
        greedy = sampling.temperature == 0
        torch.manual_seed(sampling.seed)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=pad,
            use_cache=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
        new_tokens = out.sequences[:, width:]
        logits = torch.stack(out.logits, dim=1).float() / (1.0 if greedy else sampling.temperature)
        logp = torch.log_softmax(logits, -1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        rows = completions(new_tokens.tolist(), logp.tolist(), self.eos_ids)
        return [rows[i * sampling.n : (i + 1) * sampling.n] for i in range(len(prompts))]

    def _generate_sparse(self, prompts: list[list[int]], sampling: SamplingParams) -> list[list[Completion]]:
        """One batch per prompt length: sparse decoding takes no padding."""
        from rlcore.sparse.generate import sparse_generate

        torch.manual_seed(sampling.seed)
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_length.setdefault(len(p), []).append(i)
        out: list[list[Completion]] = [[] for _ in prompts]
        for idx in by_length.values():
            groups = sparse_generate(self.model, [prompts[i] for i in idx], sampling, self.eos_ids, self.sparse, self.rectify_every)
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
