"""One learner rank: a DeepSpeed engine over the policy (ZeRO 0–3; gloo on CPU, NCCL on GPU).

A plain class: the LearnerGroup runs N of them as Ray actors; tests may use
one in-process. Gradients of a mini-batch accumulate over micro-batches; each
micro-batch's loss is already normalised by the whole mini-batch (see
rlcore.algorithm), so DeepSpeed's own 1/GAS scaling is turned off and its
1/world-size gradient averaging is undone by scaling the loss by world size.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections import defaultdict
from pathlib import Path

import torch

from rlcore.algorithm import LossNorm
from rlcore.batch import micro_batches
from rlcore.models import load_model, resolve_model_path, response_logprobs


def lr_lambda(cfg, total_steps: int):
    """Multiplier of cfg.lr at optimizer step s: linear warm-up, then constant / linear / cosine."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        if cfg.lr_schedule == "linear":
            return 1.0 - progress
        if cfg.lr_schedule == "cosine":
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LearnerRank:
    def __init__(self, rank: int, world_size: int, threads: int):
        self.rank, self.world_size = rank, world_size
        torch.set_num_threads(threads)

    def address(self) -> tuple[str, int]:
        """Where rank 0 listens for the process group: this node's IP and a free port."""
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master: tuple[str, int], model_path: str, ref_path: str | None, dtype: str, cfg, temperature: float,
              total_optimizer_steps: int, grad_accum: int, seed: int):
        os.environ.update(
            MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size), LOCAL_RANK="0",
        )
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        import deepspeed

        deepspeed.utils.logger.setLevel(logging.WARNING)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        torch.manual_seed(seed)
        self.cfg, self.temperature, self.zero_stage = cfg, temperature, cfg.zero_stage
        model = load_model(model_path, dtype)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_optimizer_steps))
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": grad_accum,
            "train_batch_size": cfg.micro_batch_size * grad_accum * self.world_size,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage},
            "bf16": {"enabled": dtype == "bfloat16"},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        self.reference = None
        if ref_path:
            self.reference = load_model(ref_path, dtype).eval().requires_grad_(False)

    # ---- the three things the trainer asks of a learner ------------------------------------

    @torch.no_grad()
    def logprobs(self, shard, old: bool) -> dict:
        """Old log-probs (when `old`) and reference log-probs (when there is a reference) of a
        shard, with the current policy's entropy alongside the old ones."""
        self.engine.eval()
        parts = defaultdict(list)
        for mb in micro_batches(shard, self.cfg.micro_batch_size):
            if old:
                logp, entropy = response_logprobs(self.engine, mb, self.temperature)
                parts["old_logp"].append(logp)
                parts["entropy"].append(entropy)
            if self.reference is not None:
                parts["ref_logp"].append(response_logprobs(self.reference, mb, self.temperature)[0])
        return {k: torch.cat(v) for k, v in parts.items()}

    def update(self, mini_shards: list[tuple[object, LossNorm]], algorithm) -> tuple[dict, dict]:
        """Optimizer steps over this rank's share of each mini-batch, `algorithm.epochs` times.

        Shards without old_logp (learner.old_logprob_pass=auto, one optimizer step per
        batch) take them from this pass's own forward, detached: the weights have not
        moved yet, so they are the numbers a separate pass would give. Those old log-probs
        and the entropy come back as the second result."""
        from_update = "old_logp" not in mini_shards[0][0].keys()
        if from_update and (len(mini_shards) > 1 or algorithm.epochs > 1):
            raise ValueError("old log-probs can come from the update pass only with one optimizer step per batch")
        self.engine.train()
        sums, weights, grad_norms, seen = defaultdict(float), defaultdict(float), [], defaultdict(list)
        for _ in range(algorithm.epochs):
            for shard, norm in mini_shards:
                for mb in micro_batches(shard, self.cfg.micro_batch_size):
                    logp, entropy = response_logprobs(self.engine, mb, self.temperature)
                    if from_update:
                        mb["old_logp"] = logp.detach()
                        seen["old_logp"].append(logp.detach())
                        seen["entropy"].append(entropy)
                    loss, metrics = algorithm.loss(logp, mb, norm)
                    self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
                    if self.engine.is_gradient_accumulation_boundary():
                        grad_norms.append(self._step_with_grad_norm())
                    else:
                        self.engine.step()
                    tokens = float(mb["response_mask"].sum())
                    for k, v in metrics.items():
                        if "max" in k:
                            sums[k] = max(sums[k], float(v))
                        else:
                            sums[k] += float(v) * tokens
                            weights[k] += tokens
        out = {k: (v / weights[k] if k in weights else v) for k, v in sums.items()}
        out.update(grad_norm=sum(grad_norms) / len(grad_norms), lr=self.scheduler.get_last_lr()[0])
        return out, {k: torch.cat(v) for k, v in seen.items()}

    def _step_with_grad_norm(self) -> float:
        """Optimizer step; the gradient norm before clipping. ZeRO 1–3 record it; stage 0 does
        not, but there the gradients are already all-reduced on every parameter."""
        if self.zero_stage == 0:
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads))
            self.engine.step()
            return norm
        self.engine.step()
        return float(self.engine.get_global_grad_norm())

    def export_weights(self) -> dict[str, torch.Tensor] | None:
        """Full weights on rank 0 (gathered from all ranks under ZeRO-3); None on other ranks."""
        import deepspeed

        module = self.engine.module
        params = list(module.parameters()) if self.zero_stage == 3 else []
        with deepspeed.zero.GatheredParameters(params, enabled=self.zero_stage == 3):
            if self.rank != 0:
                return None
            return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    # ---- checkpoints ------------------------------------------------------------------------

    def save(self, directory: str, tokenizer_from: str) -> None:
        """Rank 0 writes the HF model (safetensors); every rank writes its optimizer shard."""
        weights = self.export_weights()
        path = Path(directory)
        if self.rank == 0:
            from transformers import AutoTokenizer

            self.engine.module.save_pretrained(path / "model", state_dict=weights, safe_serialization=True)
            AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_from)).save_pretrained(path / "model")
        torch.save(
            {"optimizer": self.engine.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
            path / f"optimizer_rank{self.rank}.pt",
        )

    def load_optimizer(self, directory: str) -> None:
        """Restore optimizer and LR schedule; the weights came in with the model path at setup.

        Files are read with weights_only=True; the non-tensor classes DeepSpeed's ZeRO
        state holds (stages 1–3) are allowed by name.
        """
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            states = [
                torch.load(Path(directory) / f"optimizer_rank{r}.pt", weights_only=True) for r in range(self.world_size)
            ]
        if self.zero_stage == 0:
            self.engine.optimizer.load_state_dict(states[self.rank]["optimizer"])
        else:
            self.engine.optimizer.load_state_dict([s["optimizer"] for s in states], load_from_fp32_weights=True)
        self.scheduler.load_state_dict(states[self.rank]["scheduler"])
