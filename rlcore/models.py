"""Loading models and tokenizers: an HF directory, a hub id, `embedded:<name>` (shipped in
rlcore/assets) or `zoo:<name>` (built into a cache on first use, see rlcore.model_zoo)."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from rlcore import model_zoo
from rlcore.config import ConfigError, config_choices

EMBEDDED_PREFIX = "embedded:"


def resolve_model_path(path: str) -> str:
    """model.path → what transformers loads. A zoo model is built here on first use: commands
    resolve once in the driver and give actors the result."""
    if path.startswith(model_zoo.PREFIX):
        return str(model_zoo.fetch(path[len(model_zoo.PREFIX) :]))
    if path.startswith(EMBEDDED_PREFIX):
        name = path[len(EMBEDDED_PREFIX) :]
        found = resources.files("rlcore") / "assets" / name
        if not (Path(str(found)) / "config.json").exists():
            raise ConfigError(f"model.path={path}: no embedded model {name!r} in {found}")
        return str(found)
    check_model_folder(path)
    return path


def check_model_folder(path: str) -> None:
    """ConfigError for a model.path that names a folder here (an existing one, or one written as
    a path: /…, ./…, ~/…) without a model in it; anything else may be a Hugging Face Hub id."""
    folder = Path(path).expanduser()
    if folder.is_dir() and not (folder / "config.json").exists():
        inner = folder / "model"
        fix = (f"a checkpoint's model is its model/ folder: model.path={inner}" if (inner / "config.json").exists()
               else "name a folder saved by save_pretrained (a run's final/, a checkpoint's model/)")
        raise ConfigError(f"model.path={path}: no model in this folder (no config.json); {fix}")
    if not folder.exists() and path.startswith(("/", ".", "~")):
        raise ConfigError(f"model.path={path}: no such folder")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(path))
    except OSError as e:
        raise ConfigError(f"model.path={path}: cannot load a tokenizer ({str(e).splitlines()[0]}); model.path is a model "
                          f"folder, a Hugging Face Hub id, or model={'|'.join(config_choices('model'))}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per actor per load is noise in a run's console

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(path), dtype=getattr(torch, dtype))
    model.config.use_cache = False
    return model


def checkpoint_names(weights: dict[str, torch.Tensor], model_path: str) -> dict[str, torch.Tensor]:
    """A state dict of the model at model_path, as transformers holds it in memory, in the names
    and layout its checkpoints use. They differ for MoE models: transformers 5 fuses each
    layer's experts into 3-D tensors (mlp.experts.gate_up_proj), checkpoints keep one tensor
    per expert (Mixtral: block_sparse_moe.experts.{j}.w1), and vLLM loads checkpoint names.
    For other models the names are the same and `weights` comes back as it is."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(_shape_only_model(model_path), weights)


@lru_cache(maxsize=4)
def _shape_only_model(model_path: str):
    """The model's modules on the meta device (no memory): what revert_weight_conversion reads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))


def response_logprobs(model, batch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [B, R] of the response tokens and the policy's entropy per token [B, R].

    The response starts at column P of input_ids (see rlcore.batch), so only the
    last R+1 positions need logits. Log-probs are of softmax(logits / temperature),
    the distribution the rollout engine sampled from (before top-p truncation).
    """
    return _logprobs(_response_forward(model, batch, routers=False), batch, temperature)


def response_logprobs_with_routers(model, batch, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """response_logprobs, and the router log-probs [B, R, L, E] of an MoE model: each of its L
    MoE layers' log-softmax over its E experts, at the positions whose logits give the response
    log-probs (the position before each response token). No gradient (RSPO's γ is stop-gradient)."""
    out = _response_forward(model, batch, routers=True)
    if not getattr(out, "router_logits", None):
        raise ValueError(f"{type(model).__name__} reports no router logits: not an MoE model")
    B, R = batch["response_ids"].shape
    with torch.no_grad():
        per_layer = [logits.view(B, -1, logits.shape[-1])[:, -R - 1 : -1] for logits in out.router_logits]
        router_logp = torch.stack(per_layer, dim=2).float().log_softmax(-1)
    return *_logprobs(out, batch, temperature), router_logp


def _response_forward(model, batch, routers: bool):
    attention_mask = batch["attention_mask"]
    R = batch["response_ids"].shape[1]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    extra = {"output_router_logits": True} if routers else {}
    return model(input_ids=batch["input_ids"], attention_mask=attention_mask, position_ids=position_ids,
                 logits_to_keep=R + 1, use_cache=False, **extra)


def _logprobs(out, batch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = out.logits[:, :-1].float() / max(temperature, 1e-6)
    log_probs = torch.log_softmax(logits, dim=-1)
    logp = log_probs.gather(-1, batch["response_ids"].unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():  # a metric: kept out of the autograd graph
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, entropy


def check_routers(model_path: str, setting: str) -> None:
    """A one-line ConfigError naming `setting` when the model at model_path has no routers (its
    config names no num_experts_per_tok, the experts an MoE model routes each token to)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(model_path))
    if not getattr(config, "num_experts_per_tok", None):
        raise ConfigError(f"{setting}: needs a mixture-of-experts model; {model_path} is a {config.model_type} model "
                          "without routers; try model=arith_moe")
