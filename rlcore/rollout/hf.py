"""Rollout engine on transformers' `generate` (batched, KV cache): the CPU backend."""

from __future__ import annotations

import torch

from rlcore.models import load_model, load_tokenizer, response_logprobs
from rlcore.rollout.engine import Completion, RolloutEngine, SamplingParams


class HFRolloutEngine(RolloutEngine):
    def __init__(self, model_path: str, dtype: str = "float32"):
        self.tokenizer = load_tokenizer(model_path)
        self.model = load_model(model_path, dtype).eval()
        self.eos_ids = set(self._eos_ids())

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        return [i for i in eos + [self.tokenizer.eos_token_id] if i is not None]

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[list[Completion]]:
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
        completions = []
        for ids, lps in zip(new_tokens.tolist(), logp.tolist()):
            end = next((i + 1 for i, t in enumerate(ids) if t in self.eos_ids), None)
            completions.append(
                Completion(ids[: end or len(ids)], lps[: end or len(ids)], "stop" if end else "length")
            )
        return [completions[i * sampling.n : (i + 1) * sampling.n] for i in range(len(prompts))]

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
