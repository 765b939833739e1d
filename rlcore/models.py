"""Loading models and tokenizers: an HF directory, a hub id, `embedded:<name>` (shipped in
rlcore/assets) or `zoo:<name>` (built into a cache on first use, see rlcore.model_zoo)."""

from __future__ import annotations

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


def response_logprobs(model, batch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [B, R] of the response tokens and the policy's entropy per token [B, R].

    The response starts at column P of input_ids (see rlcore.batch), so only the
    last R+1 positions need logits. Log-probs are of softmax(logits / temperature),
    the distribution the rollout engine sampled from (before top-p truncation).
    """
    attention_mask = batch["attention_mask"]
    R = batch["response_ids"].shape[1]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=batch["input_ids"], attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=R + 1, use_cache=False
    )
    logits = out.logits[:, :-1].float() / max(temperature, 1e-6)
    log_probs = torch.log_softmax(logits, dim=-1)
    logp = log_probs.gather(-1, batch["response_ids"].unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():  # a metric: kept out of the autograd graph
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, entropy
