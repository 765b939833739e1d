"""Checkpoints: written atomically, the newest K kept, resumed exactly.

A checkpoint is `<run_dir>/checkpoints/step_N/` holding
  model/                   HF safetensors + tokenizer (transformers and vLLM load it)
  optimizer_rank{r}.pt     each learner rank's optimizer and LR-schedule state
  trainer_state.json       step, sampler position, RNG states, figures the run needs to go on
It is written under a temporary name and renamed when complete, so a run
killed mid-save leaves either the whole checkpoint or none.

A run can also be asked to stop: SIGUSR1 (Slurm's time-limit warning with `rlcore launch
slurm requeue=M`, or `kill -USR1 PID`) lets the step in progress finish, checkpoints it and
ends the run with exit status 75; `resume=auto` continues from that checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import torch

from rlcore.config import ConfigError


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

    def resume_point(self, resume: str) -> Path | None:
        """The checkpoint the `resume` setting names: none (`never`), this run's newest (`auto`;
        none yet means a fresh start), or a step_N directory."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / "trainer_state.json").exists():
            raise ConfigError(f"resume={resume}: not a checkpoint directory (no trainer_state.json); use never, auto, or a checkpoints/step_N path")
        return path

    def save(self, step: int, learner, state: dict, tokenizer_from: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp_step_{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        learner.save(str(tmp), tokenizer_from)
        with open(tmp / "trainer_state.json", "w") as f:
            json.dump({**state, "step": step, "rng": rng_state()}, f)
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
