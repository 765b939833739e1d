"""Shared fixtures. Everything runs on CPU; Ray starts its own local instance per test module."""

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file for throwaway local clusters
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS = Path(__file__).parent


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer, hidden-64 Llama with a BPE built from the arithmetic task: seconds to make, fast to run.
    Head size 32: the smallest vLLM's CPU attention supports."""
    from rlcore.arith import column_addition_completion
    from rlcore.config import ScratchModelConfig
    from rlcore.data import Prompt, reasoning_gym_rows
    from rlcore.sft import build_scratch_model

    rows = reasoning_gym_rows("basic_arithmetic", 200, 1, {"operators": ["+"], "allow_parentheses": False, "allow_negation": False})
    texts = [r["question"] + " " + column_addition_completion(Prompt("", r["question"], r["answer"])) for r in rows]
    arch = ScratchModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_position_embeddings=256)
    # Seeded: the same weights whichever tests ran first (the ZeRO-3 comparisons' 2e-5 holds for
    # this model; another draw put one weight 4e-5 off, Adam amplifying a gradient near its eps).
    return build_scratch_model(texts, arch, tmp_path_factory.mktemp("tiny_model"), seed=0)


@pytest.fixture(scope="session")
def tiny_moe(tiny_model, tmp_path_factory) -> str:
    """tiny_model upcycled to a Mixtral MoE: 4 experts per layer, 2 per token (same outputs)."""
    from rlcore.model_zoo import upcycle_to_moe

    out = tmp_path_factory.mktemp("tiny_moe") / "model"
    upcycle_to_moe(Path(tiny_model), out, num_experts=4, top_k=2, seed=0)
    return str(out)


def compose(command: str, overrides: list[str]):
    """The config `rlcore COMMAND overrides…` would run with (run_dir as given, no Hydra run)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    import rlcore.cli  # noqa: F401  (registers schemas and recipes)

    with initialize_config_module(config_module="rlcore.conf", version_base=None):
        return hydra_compose(config_name=command, overrides=overrides)


# Small, fast settings for runs of the tiny model in tests.
FAST = [
    "data.train_size=400", "data.eval_size=16", "rollout.max_new_tokens=12", "rollout.eval_max_new_tokens=12",
    "trainer.prompts_per_step=4", "algorithm.samples_per_prompt=4", "logger.wandb=false", "logger.progress=false",
    "reward.num_workers=1",
]


def random_groups(seed, n_groups=5, k=4):
    """Rewards, lengths and group ids of n_groups groups of k, shuffled (groups need not be contiguous)."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 2, (n_groups * k,), generator=g).float() + torch.rand(n_groups * k, generator=g)
    lengths = torch.randint(1, 40, (n_groups * k,), generator=g).float()
    groups = torch.arange(n_groups).repeat_interleave(k)
    perm = torch.randperm(n_groups * k, generator=g)  # groups need not be contiguous
    return rewards[perm], lengths[perm], groups[perm]


def load_bench_script(name: str) -> ModuleType:
    """bench/<name>.py as a module, imported by file path. The scripts import their helpers as the
    top-level module `common` (bench/ is sys.path[0] when one runs as a script); bench/common.py
    answers to that name only while the script is imported, rather than bench/ going on sys.path,
    where its `common` would shadow any other module of that name for the rest of the session."""
    bench = TESTS.parent / "bench"
    previous = sys.modules.get("common")
    sys.modules["common"] = module_from_path("bench_common", bench / "common.py")
    try:
        return module_from_path(f"bench_{name}", bench / f"{name}.py")
    finally:
        if previous is None:
            del sys.modules["common"]
        else:
            sys.modules["common"] = previous


def module_from_path(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it, as dataclasses and pickle look modules up there
    spec.loader.exec_module(module)
    return module
