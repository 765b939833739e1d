"""Which checkpoint a run resumes from, a stop asked for by signal, and the checks on the
checkpoint and SFT settings (no model, no Ray)."""

import os
import signal

import pytest
from omegaconf import OmegaConf

from rlcore.checkpoint import Checkpointer, Stopped
from rlcore.config import ConfigError, SFTConfig, validate_sft


def test_resume_point_is_the_newest_complete_checkpoint(tmp_path):
    checkpoints = Checkpointer(tmp_path, every=2, keep_last=2)
    assert checkpoints.resume_point("never") is None
    assert checkpoints.resume_point("auto") is None  # nothing saved yet: a fresh start
    for name in ("step_2", "step_10"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoints" / ".tmp_step_12").mkdir()  # a save that was killed half-way
    assert checkpoints.resume_point("auto").name == "step_10"  # by step number, not by name
    assert checkpoints.resume_point(str(tmp_path / "checkpoints" / "step_2")).name == "step_2"
    with pytest.raises(ConfigError, match="resume=.*tmp_step_12: not a checkpoint directory"):
        checkpoints.resume_point(str(tmp_path / "checkpoints" / ".tmp_step_12"))


def test_sigusr1_makes_the_step_in_progress_due_and_then_stops(tmp_path):
    checkpoints = Checkpointer(tmp_path, every=10, keep_last=2)
    before = signal.getsignal(signal.SIGUSR1)
    with checkpoints.stop_on_signal():
        assert not checkpoints.due(3, last_step=20)
        checkpoints.stop_if_asked()  # nothing asked: goes on
        os.kill(os.getpid(), signal.SIGUSR1)
        assert checkpoints.due(3, last_step=20)  # not a multiple of 10, but a stop was asked for
        (tmp_path / "checkpoints" / "step_3").mkdir(parents=True)
        (tmp_path / "checkpoints" / "step_3" / "trainer_state.json").write_text("{}")  # what save writes
        with pytest.raises(Stopped, match=r"stopped on request \(SIGUSR1\) with checkpoint .*step_3; resume=auto") as stop:
            checkpoints.stop_if_asked()
        assert stop.value.checkpoint == tmp_path / "checkpoints" / "step_3"
    assert signal.getsignal(signal.SIGUSR1) == before  # the handler is the block's only


@pytest.mark.parametrize("override, message", [
    ({"sft": {"keep_last": 0}}, "sft.keep_last=0 must be > 0"),
    ({"sft": {"checkpoint_every": -1}}, "sft.checkpoint_every=-1 must be ≥ 0"),
    ({"resume": ""}, "resume is empty"),
    ({"sft": {"eval_every": 0}}, "sft.eval_every=0 must be > 0"),
    ({"sft": {"steps": 0}}, "sft.steps=0 must be > 0"),
    ({"sft": {"batch_size": 5}, "learner": {"num_ranks": 2}}, "sft.batch_size=5 must divide evenly over learner.num_ranks=2"),
])
def test_bad_sft_settings_name_the_key(override, message):
    cfg = OmegaConf.merge(OmegaConf.structured(SFTConfig), override)
    validate_sft(OmegaConf.structured(SFTConfig))  # the defaults pass
    with pytest.raises(ConfigError, match=message):
        validate_sft(cfg)
