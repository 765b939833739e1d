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

from rlcore.config import ConfigError, EvalConfig, SFTConfig, TrainConfig

SCHEMAS = {"train": TrainConfig, "sft": SFTConfig, "eval": EvalConfig}


def _register_configs() -> None:
    """The schemas, and recipes/ as the Hydra group `recipe` (package _global_). Recipes go
    through the ConfigStore because they live beside configs/, not inside it."""
    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(name=f"{name}_schema", node=schema)
    for path in resources.files("rlcore.conf.recipe").iterdir():
        if path.name.endswith(".yaml"):
            store.store(group="recipe", name=path.name[: -len(".yaml")], node=OmegaConf.load(str(path)), package="_global_")


_register_configs()

USAGE = """usage: rlcore COMMAND [overrides]

  rlcore train recipe=NAME [key=value ...]   RL training (recipes: {recipes})
  rlcore sft recipe=NAME [key=value ...]     supervised fine-tuning
  rlcore eval model=PATH [data=PATH]         greedy held-out accuracy of a model
  rlcore plot RUN_DIR                        PNG curves from RUN_DIR/metrics.jsonl
  rlcore launch slurm [sft] nodes=N gpus_per_node=G recipe=NAME [...]   train (or sft) as a Slurm job (docs/cluster.md)

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


def _group_options(group: str) -> list[str]:
    folder = resources.files("rlcore.conf.recipe") if group == "recipe" else resources.files("rlcore.conf") / group
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _shorthands(args: list[str]) -> list[str]:
    """`model=PATH` → model.path=PATH and `data=PATH` → data=hf data.path=PATH when PATH is not a config option."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key == "model" and value not in _group_options("model"):
            out.append(f"model.path={value}")
        elif sep and key == "data" and value not in _group_options("data"):
            out += ["data=hf", f"data.path={value}"]
        else:
            out.append(arg)
    return out


def _explain(error: Exception, command: str) -> str:
    """One line from Hydra/OmegaConf's multi-line errors, with the allowed keys where that helps."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    text = "\n".join(messages)
    key = re.search(r"full_key: (\S+)", text)
    if key:
        parent, _, leaf = key.group(1).rpartition(".")
        schema = OmegaConf.structured(SCHEMAS[command])
        node = OmegaConf.select(schema, parent) if parent else schema
        if isinstance(node, DictConfig) and leaf not in node:
            return f"{key.group(1)} is not a setting; allowed under {parent or 'the top level'}: {', '.join(node.keys())}"
        detail = messages[-1].splitlines()[0]
        return f"{key.group(1)}: {detail}"
    first = messages[0].split("Config search path:")[0]  # Hydra appends its search path: noise here
    return " ".join(line.strip() for line in first.splitlines() if line.strip())


def _precheck(command: str, overrides: list[str]) -> None:
    from hydra import compose, initialize_config_module

    def composed(overrides):
        with initialize_config_module(config_module="rlcore.conf", version_base=None):
            return compose(config_name=command, overrides=overrides)

    try:
        composed(overrides)
    except Exception as e:  # Hydra and OmegaConf raise many types; all are bad input here
        _fail(_algorithm_option_error(composed, overrides) or _explain(e, command))


def _algorithm_option_error(composed, overrides: list[str]) -> str | None:
    """`algorithm` is an open mapping: an unknown `algorithm.X=…` is judged by the algorithm itself."""
    from rlcore.algorithm import build_algorithm

    unknown = [o for o in overrides if o.startswith("algorithm.")]
    if not unknown:
        return None
    try:
        cfg = composed([o for o in overrides if o not in unknown])
        options = dict(cfg.algorithm)
        for o in unknown:
            key, _, value = o.partition("=")
            options[key.split(".", 1)[1]] = value
        build_algorithm(options)
    except ConfigError as e:
        return str(e)
    except Exception:
        return None
    return None


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE.format(recipes=", ".join(_group_options("recipe"))))
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
    rest = _shorthands(rest)
    hydra_flags = [a for a in rest if a.startswith("-")]
    if not hydra_flags:
        _precheck(command, rest)
    sys.argv = [f"rlcore {command}", *rest]
    _task(command)()


if __name__ == "__main__":
    main()
