"""`rlcore train | sft | eval | plot | launch`.

train, sft and eval are Hydra apps over configs/ (installed as rlcore.conf):
`rlcore train recipe=opo_math trainer.steps=50`, and Hydra's own options
(`--cfg job`, `-m`, `--help`) work. Before anything starts, the overrides are
composed once here so that a typo or a bad value is one line naming the key
and what is allowed, and exit status 2.
"""

from __future__ import annotations

import re
import sys
from importlib import resources
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from rlcore.config import ConfigError, EvalConfig, SFTConfig, TrainConfig, config_choices

SCHEMAS = {"train": TrainConfig, "sft": SFTConfig, "eval": EvalConfig}


def _register_configs() -> None:
    """The schemas, and recipes/ as the Hydra group `recipe` (package _global_). Recipes go
    through the ConfigStore because they live beside configs/, not inside it."""
    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(name=f"{name}_schema", node=schema)
    recipes = resources.files("rlcore.conf.recipe")
    for name in config_choices("recipe"):
        store.store(group="recipe", name=name, node=OmegaConf.load(str(recipes / f"{name}.yaml")), package="_global_")


_register_configs()

USAGE = """usage: rlcore COMMAND [overrides]

  rlcore train recipe=NAME [key=value ...]   RL training
  rlcore sft recipe=NAME [key=value ...]     supervised fine-tuning
  rlcore eval model=PATH [data=PATH]         greedy held-out accuracy of a model
  rlcore plot RUN_DIR                        PNG curves from RUN_DIR/metrics.jsonl
  rlcore launch slurm [sft] nodes=N gpus_per_node=G recipe=NAME [...]   train (or sft) as a Slurm job (docs/cluster.md)

Recipes (train and sft; a wrong one names those of the command): {recipes}
Hydra options work after the command: --cfg job, -m (multirun), --help."""


def _fail(message: str) -> None:
    print(f"rlcore: error: {message}", file=sys.stderr)
    sys.exit(2)


def _run_dir(cfg: DictConfig) -> None:
    """Multirun jobs get their own sub-directory; the run dir is Hydra's output dir."""
    from hydra.core.hydra_config import HydraConfig

    OmegaConf.set_struct(cfg, False)
    cfg.run_dir = HydraConfig.get().runtime.output_dir
    OmegaConf.set_struct(cfg, True)


def _task(command: str):
    def run(cfg: DictConfig):
        from rlcore.checkpoint import EXIT_STOPPED, Stopped

        _run_dir(cfg)
        try:
            if command == "train":
                from rlcore.trainer import train

                summary = train(cfg)
            elif command == "sft" and cfg.sparse_distill is not None:
                from rlcore.sparse.distill import distill_gates

                summary = distill_gates(cfg)
            elif command == "sft":
                from rlcore.sft import sft

                summary = sft(cfg)
            else:
                from rlcore.evaluate import eval_command

                summary = eval_command(cfg)
        except ConfigError as e:
            _fail(str(e))
        except Stopped as e:
            print(f"rlcore: {e}", file=sys.stderr)
            sys.exit(EXIT_STOPPED)
        print(OmegaConf.to_yaml(OmegaConf.create(summary)).rstrip())
        return summary

    return hydra.main(version_base=None, config_path="pkg://rlcore.conf", config_name=command)(run)


def _shorthands(args: list[str], command: str) -> list[str]:
    """`model=PATH` → model.path=PATH and `data=PATH` → data=hf data.path=PATH when PATH is not a
    config option. `algorithm.X=V` → `++algorithm.X=V` (train): `algorithm` is an open mapping
    that each algorithm checks itself (build_algorithm), so X may be an option the recipe leaves
    at its default, where Hydra would ask for `+algorithm.X`."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key == "model" and value not in config_choices("model"):
            out.append(f"model.path={value}")
        elif sep and key == "data" and value not in config_choices("data"):
            out += ["data=hf", f"data.path={value}"]
        elif sep and command == "train" and key.startswith("algorithm."):
            out.append(f"++{arg}")
        else:
            out.append(arg)
    return out


def _explain(error: Exception, command: str) -> str:
    """One line from Hydra/OmegaConf's multi-line errors, with the allowed keys where that helps."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    keyed = next((m for m in messages if "full_key: " in m), None)
    if keyed:
        key = re.search(r"full_key: (\S+)", keyed).group(1)
        parent, _, leaf = re.sub(r"\[\d+\]$", "", key).rpartition(".")  # reward.weights[1]: the setting is weights
        schema = OmegaConf.structured(SCHEMAS[command])
        node = OmegaConf.select(schema, parent) if parent else schema
        if isinstance(node, DictConfig) and leaf not in node:
            return f"{key} is not a setting; allowed under {parent or 'the top level'}: {', '.join(node.keys())}"
        return f"{key}: {keyed.splitlines()[0]}"
    first = messages[0].split("Config search path:")[0]  # Hydra appends its search path: noise here
    return " ".join(line.strip() for line in first.splitlines() if line.strip())


def _compose(command: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="rlcore.conf", version_base=None):
        return compose(config_name=command, overrides=overrides)


def _precheck(command: str, overrides: list[str]) -> None:
    from rlcore.algorithm import build_algorithm
    from rlcore.checkpoint import check_run_dir

    try:
        cfg = _compose(command, overrides)
    except Exception as e:  # Hydra and OmegaConf raise many types; all are bad input here
        _fail(_recipe_problem(command, overrides) or _explain(e, command))
    try:
        check_run_dir(cfg.run_dir)
        if command == "train":
            build_algorithm(cfg.algorithm)
    except ConfigError as e:
        _fail(str(e))


def _recipe_problem(command: str, overrides: list[str]) -> str | None:
    """A recipe that does not compose for this command: an unknown name (Hydra's own message
    lists the recipes of every command), or a recipe of another command (`rlcore sft
    recipe=opo_math`). Composing each recipe takes a few seconds: only on this error path."""

    def composes(for_command: str, recipe: str) -> bool:
        try:
            _compose(for_command, [f"recipe={recipe}"])
        except Exception:  # Hydra's many error types
            return False
        return True

    recipe = next((o.partition("=")[2] for o in overrides if o.startswith("recipe=")), None)
    if recipe is None or composes(command, recipe):
        return None
    if recipe not in config_choices("recipe"):
        own = [r for r in config_choices("recipe") if composes(command, r)]
        return f"recipe={recipe}: no such recipe for `rlcore {command}`; choose one of: {', '.join(own)}"
    other = next((c for c in SCHEMAS if c != command and composes(c, recipe)), None)
    return other and f"recipe={recipe} is a recipe for `rlcore {other}`, not `rlcore {command}`"


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE.format(recipes=", ".join(config_choices("recipe"))))
        return
    command, rest = args[0], args[1:]
    if command == "plot":
        if len(rest) != 1:
            _fail("usage: rlcore plot RUN_DIR")
        from rlcore.logging import plot_run

        try:
            for path in plot_run(Path(rest[0])):
                print(path)
        except FileNotFoundError as e:
            _fail(str(e))
        return
    if command == "launch":
        from rlcore.launch import main as launch

        launch(rest)
        return
    if command not in SCHEMAS:
        _fail(f"unknown command {command!r}; choose train, sft, eval, plot or launch")
    rest = _shorthands(rest, command)
    hydra_flags = [a for a in rest if a.startswith("-")]
    if not hydra_flags:
        _precheck(command, rest)
    sys.argv = [f"rlcore {command}", *rest]
    _task(command)()


if __name__ == "__main__":
    main()
