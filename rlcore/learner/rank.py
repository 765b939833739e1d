"""One learner rank: a DeepSpeed engine over the policy (ZeRO 0–3; gloo on CPU, NCCL on GPU).

A plain class: the LearnerGroup runs N of them as Ray actors; tests may use
one in-process. Gradients of a mini-batch accumulate over micro-batches; each
micro-batch's loss is already normalised by the whole mini-batch (see
rlcore.algorithm), so DeepSpeed's own 1/GAS scaling is turned off and its
1/world-size gradient averaging is undone by scaling the loss by world size.

The number of micro-batches per optimizer step is the driver's plan (fixed rows or a
token budget, rlcore.batch.plan_micro_batches), not DeepSpeed's fixed
gradient_accumulation_steps: the rank marks each step's last micro-batch itself
(`set_gradient_accumulation_boundary`) and steps once after it.

The reference model (for KL) lives on the learner ranks only when the algorithm needs
one (the trainer passes ref_path=None otherwise: nothing is loaded, nothing runs). It is
frozen and in model.dtype. Under ZeRO-3 it is partitioned like the policy (and offloaded
with learner.offload_params), as a DeepSpeed engine without an optimizer, so it costs 1/N of
its weights per rank; its forwards are collectives, like the policy's, and run the same
micro-batch plan. Under ZeRO 0–2 it is a plain module on the rank's device (a DeepSpeed
engine would add fp32 master copies for nothing).
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections import defaultdict
from pathlib import Path

import torch

from rlcore import cluster
from rlcore.algorithm import LossNorm
from rlcore.batch import micro_batches, pad_response
from rlcore.checkpoint import rng_state, set_rng_state
from rlcore.learner import deepspeed_ops
from rlcore.models import load_model, resolve_model_path, response_logprobs, response_logprobs_with_routers


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


def deepspeed_config(cfg, dtype: str, world_size: int, grad_accum: int, cuda: bool) -> dict:
    """The DeepSpeed config of the policy engine.

    bf16 (model.dtype=bfloat16): the model runs in bf16 and every optimizer DeepSpeed picks
    keeps fp32 master weights (ZeRO 1–3: fp32 partitions; ZeRO-0: FP16_UnfusedOptimizer's
    fp32 copies). Under ZeRO 1–3 gradients also accumulate over micro-batches in fp32, which
    matters when a token budget makes many small micro-batches; ZeRO-0 cannot (DeepSpeed
    supports only bf16 accumulation there). Offload keeps optimizer states (and Adam's step,
    DeepSpeedCPUAdam) or ZeRO-3 parameters in CPU memory; pinned memory on GPU only.

    train_micro_batch_size_per_gpu and gradient_accumulation_steps are bookkeeping: the rank
    sets the accumulation boundary itself (see the module doc)."""
    bf16 = dtype == "bfloat16"
    zero: dict = {"stage": cfg.zero_stage}
    offload = {"device": "cpu", "pin_memory": cuda}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = dict(offload)
    if cfg.offload_params:
        zero["offload_param"] = dict(offload)
    config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": cfg.micro_batch_size * grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16 and cfg.zero_stage > 0:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LearnerRank:
    def __init__(self, rank: int, world_size: int, threads: int):
        self.rank, self.world_size = rank, world_size
        torch.set_num_threads(threads)

    def node_ip(self) -> str:
        return cluster.node_ip()

    def address(self) -> tuple[str, int]:
        """Where rank 0 listens for the process group: this node's IP and a free port."""
        return cluster.node_ip(), free_port()

    def setup(self, master: tuple[str, int], model_path: str, ref_path: str | None, dtype: str, cfg, temperature: float,
              total_optimizer_steps: int, grad_accum: int, seed: int):
        os.environ.update(
            MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size), LOCAL_RANK="0",
        )
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        if self.world_size > 1 and not torch.cuda.is_available() and "GLOO_SOCKET_IFNAME" not in os.environ:
            # gloo offers its peers the address this host's name resolves to: often a loopback
            # address (Debian's /etc/hosts gives it 127.0.1.1), which ranks on other nodes cannot
            # reach. The interface of the node's Ray address is one they can.
            interface = cluster.interface_holding(cluster.node_ip())
            if interface:
                os.environ["GLOO_SOCKET_IFNAME"] = interface
        import deepspeed

        deepspeed.utils.logger.setLevel(logging.WARNING)
        deepspeed_ops.load_ops(cpu_adam=cfg.offload_optimizer)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        torch.manual_seed(seed)
        self.cfg, self.temperature, self.zero_stage = cfg, temperature, cfg.zero_stage
        model = load_model(model_path, dtype)
        self.router_top_k = getattr(model.config, "num_experts_per_tok", 0)  # experts per token of an MoE model
        if cfg.gradient_checkpointing:
            # Non-reentrant: recomputes under ZeRO-3's parameter gathering hooks, and works
            # when the inputs need no grad (token ids).
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        adam = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        if cfg.offload_optimizer:
            # DeepSpeed requires its CPU Adam with optimizer offload (built by load_ops above);
            # adamw_mode=True is decoupled weight decay, like AdamW.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(model.parameters(), adamw_mode=True, **adam)
        else:
            optimizer = torch.optim.AdamW(model.parameters(), **adam)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_optimizer_steps))
        ds_config = deepspeed_config(cfg, dtype, self.world_size, grad_accum, torch.cuda.is_available())
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        self.device = self.engine.device
        self.reference = self._reference(ref_path, dtype, ds_config) if ref_path else None

    def _reference(self, path: str, dtype: str, policy_config: dict):
        """The frozen reference model, placed as the module doc says."""
        import deepspeed

        model = load_model(path, dtype).eval().requires_grad_(False)
        if self.zero_stage != 3:
            return model.to(self.device)
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {k: v for k, v in policy_config["zero_optimization"].items() if k != "offload_optimizer"},
            "bf16": policy_config["bf16"],
            "steps_per_print": 10**9,
        }
        engine = deepspeed.initialize(model=model, config=config)[0]
        engine.eval()  # DeepSpeedEngine.eval() returns None
        return engine

    # ---- the three things the trainer asks of a learner ------------------------------------

    @torch.no_grad()
    def logprobs(self, shard, sizes: list[int], old: bool, reference: bool = True, routers: bool = False) -> dict:
        """The current policy's log-probs ("old_logp", when `old`) and the reference's (when
        `reference` and there is one) of a shard in micro-batches of `sizes` rows, with the
        policy's entropy alongside its log-probs. All [B, R] on CPU, zero past each
        micro-batch's own response width. With `routers` (and `old`), the MoE routing too
        (record_routing)."""
        self.engine.eval()
        R = shard["response_ids"].shape[1]
        parts = defaultdict(list)
        for mb in micro_batches(shard, sizes):
            mb = mb.to(self.device)
            if old:
                logp, entropy, router_logp = self._policy_logprobs(mb, routers)
                parts["old_logp"].append(logp)
                parts["entropy"].append(entropy)
                if router_logp is not None:
                    for key, value in self.record_routing(router_logp).items():
                        parts[key].append(value)
            if reference and self.reference is not None:
                parts["ref_logp"].append(response_logprobs(self.reference, mb, self.temperature)[0])
        return {k: torch.cat([pad_response(t, R) for t in v]).cpu() for k, v in parts.items()}

    def update(self, mini_shards: list[tuple[object, LossNorm, list[int]]], algorithm) -> tuple[dict, dict]:
        """Optimizer steps over this rank's share of each mini-batch (with its loss norm and
        micro-batch plan), `algorithm.epochs` times.

        Shards without old_logp (learner.old_logprob_pass=auto, one optimizer step per
        batch) take them from this pass's own forward, detached: the weights have not
        moved yet, so they are the numbers a separate pass would give. Those old log-probs
        and the entropy come back as the second result.

        Metrics: names with "max" take the maximum; names with "loss" are shares of their
        mini-batch's loss (LossNorm), so they add up over micro-batches (and over ranks, in
        the group) and average over optimizer steps; the rest are per-token means, weighted
        by tokens. None depends on how the rows are grouped into micro-batches."""
        from_update = "old_logp" not in mini_shards[0][0].keys()
        if from_update and (len(mini_shards) > 1 or algorithm.epochs > 1):
            raise ValueError("old log-probs can come from the update pass only with one optimizer step per batch")
        self.engine.train()
        sums, weights, peaks, losses = defaultdict(float), defaultdict(float), defaultdict(float), defaultdict(float)
        grad_norms, seen = [], defaultdict(list)
        for _ in range(algorithm.epochs):
            for shard, norm, sizes in mini_shards:
                R = shard["response_ids"].shape[1]
                for i, mb in enumerate(micro_batches(shard, sizes)):
                    # Set before the forward: ZeRO reads it in its hooks (reduce now or accumulate).
                    self.engine.set_gradient_accumulation_boundary(i == len(sizes) - 1)
                    mb = mb.to(self.device)
                    logp, entropy, router_logp = self._policy_logprobs(mb, algorithm.needs_router)
                    if router_logp is not None:
                        if from_update:  # the weights have not moved: the routing now is the old routing
                            mb.update(self.record_routing(router_logp))
                        mb["router_logp"] = router_logp.gather(-1, mb["router_experts"].long())
                    if from_update:
                        mb["old_logp"] = logp.detach()
                        seen["old_logp"].append(pad_response(logp.detach(), R).cpu())
                        seen["entropy"].append(pad_response(entropy, R).cpu())
                    loss, metrics = algorithm.loss(logp, mb, norm)
                    self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
                    tokens = float(mb["response_mask"].sum())
                    for k, v in metrics.items():
                        if "max" in k:
                            peaks[k] = max(peaks[k], float(v))
                        elif "loss" in k:
                            losses[k] += float(v)
                        else:
                            sums[k] += float(v) * tokens
                            weights[k] += tokens
                grad_norms.append(self._step_with_grad_norm())
        steps = len(grad_norms)
        out = {k: v / weights[k] for k, v in sums.items()} | peaks | {k: v / steps for k, v in losses.items()}
        out.update(grad_norm=sum(grad_norms) / steps, lr=self.scheduler.get_last_lr()[0])
        return out, {k: torch.cat(v) for k, v in seen.items()}

    def _policy_logprobs(self, mb, routers: bool):
        """(log-probs, entropy, router log-probs or None) of the policy on a micro-batch."""
        if routers:
            return response_logprobs_with_routers(self.engine, mb, self.temperature)
        return *response_logprobs(self.engine, mb, self.temperature), None

    def record_routing(self, router_logp: torch.Tensor) -> dict[str, torch.Tensor]:
        """The old policy's routing for RSPO's router-shift ratio: per response token and MoE
        layer, the top-k experts it routes to ("router_experts", [b, r, L, k]) and their router
        log-probs ("router_old_logp"). The update gathers the new router's log-probs of the same
        experts (rlcore.algorithm.router_shift_ratio)."""
        top = router_logp.topk(self.router_top_k, dim=-1)
        # int16: the records travel with the batch, layers × k of them per token
        return {"router_experts": top.indices.to(torch.int16), "router_old_logp": top.values}

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
            {"optimizer": self.engine.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rng_state()},
            path / f"optimizer_rank{self.rank}.pt",
        )

    def load_optimizer(self, directory: str) -> None:
        """Restore optimizer, LR schedule and this rank's RNG (dropout draws continue where the
        saved run was); the weights came in with the model path at setup.

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
        if "rng" in states[self.rank]:  # checkpoints written before rlcore saved it: the setup seed stays
            set_rng_state(states[self.rank]["rng"])
