"""What every benchmark script does the same way: describe the machine, write the result."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from rlcore.logging import read_metrics

ROOT = Path(__file__).resolve().parent.parent  # the repository: where the scripts' runs/ go


def run_rlcore(args: list[str]) -> None:
    """`rlcore ARGS` as its own process in the repository root (the venv's console script), echoed."""
    print("$ rlcore " + " ".join(args), flush=True)
    subprocess.run([str(Path(sys.executable).parent / "rlcore"), *args], cwd=ROOT, check=True)


def machine() -> dict:
    """Device, platform and load: numbers only compare on the same device at a similar load."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return {
        "device": device,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_summary(name: str) -> dict:
    """runs/<name>/summary.json of a finished `rlcore` run."""
    return json.loads((ROOT / "runs" / name / "summary.json").read_text())


def sft_then_train(sft_recipe: str, train_recipe: str, reuse_runs: bool, train_name: str | None = None,
                   train_overrides: tuple[str, ...] = (), sft_name: str | None = None) -> dict:
    """`rlcore sft recipe=SFT [name=SFT_NAME]` then `rlcore train recipe=TRAIN [name=NAME] OVERRIDES`
    (with reuse_runs, their runs/<name> as they are); the result's `runs`, `sft_summary` and `train_summary`."""
    def named(name):
        return (f"name={name}",) if name else ()

    runs = [["sft", f"recipe={sft_recipe}", *named(sft_name)], ["train", f"recipe={train_recipe}", *named(train_name), *train_overrides]]
    if not reuse_runs:
        for args in runs:
            run_rlcore(args)
    return {"runs": ["rlcore " + " ".join(args) for args in runs],
            "sft_summary": run_summary(sft_name or sft_recipe), "train_summary": run_summary(train_name or train_recipe)}


def held_out_curve(run_dir: Path, key: str = "eval/accuracy") -> dict[int, dict]:
    """{step: eval/* metrics} of a train run, for the rows that have `key` (step 0 = before training)."""
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")} for r in read_metrics(run_dir) if key in r}


def train_config(overrides: list[str]):
    """The composed `rlcore train` config for these overrides (recipes included), as the CLI
    would build it."""
    import rlcore.cli  # noqa: F401  (registers the config schemas and recipes with Hydra)
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="rlcore.conf", version_base=None):
        return compose(config_name="train", overrides=overrides)


def write_result(result: dict, out: Path) -> None:
    """The JSON file, then its one-line form as the last line printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    print(json.dumps(result))
