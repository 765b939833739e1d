"""Checkpoints: written atomically, the newest K kept, resumed exactly.

A checkpoint is `<run_dir>/checkpoints/step_N/` holding
  model/                   HF safetensors + tokenizer (transformers and vLLM load it)
  optimizer_rank{r}.pt     each learner rank's optimizer and LR-schedule state
  trainer_state.json       step, sampler position, RNG states, figures the run needs to go on,
                           and the learner layout the optimizer shards fit (`learner`)
It is written under a temporary name and renamed when complete, so a run
killed mid-save leaves either the whole checkpoint or none; a checkpoint with a
missing or unreadable file was changed by something else afterwards. Resuming checks
this, and that the learner fits, before any worker starts (`resume_point`).

A run can also be asked to stop: SIGUSR1 (Slurm's time-limit warning with `rlcore launch
slurm requeue=M`, or `kill -USR1 PID`) lets the step in progress finish, checkpoints it and
ends the run with exit status 75; `resume=auto` continues from that checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from rlcore.config import ConfigError

log = logging.getLogger(__name__)


def rng_state() -> dict:
    """This process's Python and torch (CPU, and CUDA when present) RNG states, as JSON-able lists."""
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def check_run_dir(run_dir: str) -> None:
    """run_dir (checkpoints, logs, the final model) must be a directory, or one that can be made:
    not a file, nor below one. Hydra makes it before the run starts, so the CLI asks first."""
    path = Path(run_dir)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker:
        where = "is a file" if blocker == path else f"{blocker} is a file"
        raise ConfigError(f"run_dir={run_dir}: {where}; choose a directory, new or existing, e.g. run_dir=runs/NAME")


STOP_SIGNAL = signal.SIGUSR1
EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped on request with a checkpoint; try again (resume=auto)


class Stopped(Exception):
    """The run stopped on request (STOP_SIGNAL) after checkpointing the step in progress."""

    def __init__(self, checkpoint: Path):
        super().__init__(f"stopped on request ({STOP_SIGNAL.name}) with checkpoint {checkpoint}; resume=auto continues from it")
        self.checkpoint = checkpoint


class Checkpointer:
    def __init__(self, run_dir: str | Path, every: int, keep_last: int):
        self.root = Path(run_dir) / "checkpoints"
        self.every, self.keep_last = every, keep_last
        self.stop_asked = False

    @contextmanager
    def stop_on_signal(self):
        """Within the block, STOP_SIGNAL asks for a stop: the step in progress is checkpointed
        (`due`) and then `stop_if_asked` raises Stopped."""
        def ask(signum, frame):
            self.stop_asked = True

        previous = signal.signal(STOP_SIGNAL, ask)
        try:
            yield
        finally:
            signal.signal(STOP_SIGNAL, previous)

    def due(self, step: int, last_step: int) -> bool:
        return self.stop_asked or step == last_step or (self.every > 0 and step % self.every == 0)

    def stop_if_asked(self) -> None:
        """After a save: end the run here if a stop was asked for."""
        if self.stop_asked:
            raise Stopped(self.latest())

    def all(self) -> list[Path]:
        found = [p for p in self.root.glob("step_*") if p.is_dir() and (p / "trainer_state.json").exists()]
        return sorted(found, key=lambda p: int(p.name.split("_")[1]))

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def resume_point(self, resume: str, learner_cfg) -> Path | None:
        """The checkpoint the `resume` setting names: none (`never`), this run's newest intact
        one (`auto`; none yet means a fresh start), or a step_N directory. A damaged checkpoint
        stops a named resume; `auto` skips it with a warning, and goes on from the one before
        rather than ending the job. Either way the checkpoint must fit `learner_cfg`."""
        if resume == "never":
            return None
        if resume == "auto":
            found = self._newest_intact()
            if found is None:
                return None
            path, saved = found
        else:
            path = Path(resume)
            if not (path / "trainer_state.json").exists():
                raise ConfigError(f"resume={resume}: not a checkpoint directory (no trainer_state.json); use never, auto, or a checkpoints/step_N path")
            try:
                saved = saved_learner(path)
            except DamagedCheckpoint as e:
                raise ConfigError(f"resume={resume}: damaged checkpoint: {e}; resume from an earlier checkpoints/step_N, "
                                  "or resume=auto (skips damaged ones)") from None
        check_learner_fits(saved, learner_cfg, resume)
        return path

    def _newest_intact(self) -> tuple[Path, dict] | None:
        """The newest checkpoint that is not damaged, with `saved_learner`'s layout."""
        found = self.all()
        for path in reversed(found):
            try:
                return path, saved_learner(path)
            except DamagedCheckpoint as e:
                log.warning("resume=auto: skipping damaged checkpoint %s: %s", path, e)
        if found:
            raise ConfigError(f"resume=auto: every checkpoint in {self.root} is damaged (see the warnings above); "
                              "resume=never starts afresh")
        return None

    def save(self, step: int, learner, state: dict, tokenizer_from: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp_step_{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        learner.save(str(tmp), tokenizer_from)
        with open(tmp / "trainer_state.json", "w") as f:
            json.dump({**state, "step": step, "learner": learner.layout, "rng": rng_state()}, f)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self.all()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def publish_final(self) -> Path:
        """The newest checkpoint's model, copied to <run_dir>/final: what the run hands on."""
        final = self.root.parent / "final"
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(self.latest() / "model", final)
        return final

    @staticmethod
    def load_state(path: Path) -> dict:
        state = json.loads((Path(path) / "trainer_state.json").read_text())
        set_rng_state(state.pop("rng"))
        return state


class DamagedCheckpoint(Exception):
    """A file of a checkpoint is missing or unreadable."""


def saved_learner(path: Path) -> dict:
    """The learner layout a checkpoint was saved with, {"num_ranks", "zero_stage"}, after cheap
    checks that resuming will find each file it reads whole: trainer_state.json parses, the
    safetensors headers read (a cut-off file fails there) and each optimizer shard's zip
    directory, at its end, reads. DamagedCheckpoint says which file fails.

    Checkpoints written before the layout was recorded: their optimizer_rank*.pt files are
    counted (rank 0's at least) and their ZeRO stage is unknown (None)."""
    state = _read_json(path, "trainer_state.json")
    saved = state.get("learner") or {"num_ranks": max(1, len(list(path.glob("optimizer_rank*.pt")))), "zero_stage": None}
    index = "model/model.safetensors.index.json"  # a model saved in shards names them here
    weights = set(_read_json(path, index)["weight_map"].values()) if (path / index).exists() else {"model.safetensors"}
    for name in sorted(weights):
        _check_readable(path, f"model/{name}", _read_safetensors_header)
    for rank in range(saved["num_ranks"]):
        _check_readable(path, f"optimizer_rank{rank}.pt", lambda file: zipfile.ZipFile(file).close())
    return saved


def _read_json(path: Path, name: str) -> dict:
    try:
        return json.loads((path / name).read_text())
    except json.JSONDecodeError as e:
        raise DamagedCheckpoint(f"{name} is not valid JSON ({e})") from None


def _read_safetensors_header(file: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(file), "pt"):
        pass


def _check_readable(path: Path, name: str, read) -> None:
    if not (path / name).exists():
        raise DamagedCheckpoint(f"{name} is missing")
    try:
        read(path / name)
    except Exception as e:  # each reader has its own error types; all mean a damaged file here
        raise DamagedCheckpoint(f"{name} is unreadable ({type(e).__name__}: {e})") from None


# The optimizer each ZeRO stage runs, whose state the shards hold: ZeRO 1 and 2 share one (a
# checkpoint of either resumes the other, to rounding: tests/integration/test_ray_learner.py), stage 0
# is the plain torch optimizer, 3 its own.
OPTIMIZER_OF_STAGE = {0: "torch", 1: "zero", 2: "zero", 3: "zero3"}


def check_learner_fits(saved: dict, learner_cfg, resume: str) -> None:
    """The optimizer shards load only into as many ranks as saved them, under a ZeRO stage
    whose optimizer keeps its state the same way."""
    ranks, stage = saved["num_ranks"], saved["zero_stage"]
    if ranks != learner_cfg.num_ranks:
        raise ConfigError(f"resume={resume}: the checkpoint was saved by {ranks} learner rank(s), one optimizer shard each, "
                          f"not learner.num_ranks={learner_cfg.num_ranks}; resume with learner.num_ranks={ranks}")
    if stage is not None and OPTIMIZER_OF_STAGE[stage] != OPTIMIZER_OF_STAGE[learner_cfg.zero_stage]:
        raise ConfigError(f"resume={resume}: the checkpoint holds ZeRO stage {stage}'s optimizer state, which "
                          f"learner.zero_stage={learner_cfg.zero_stage} cannot load; resume with learner.zero_stage={stage}")
