"""Which checkpoint a run resumes from, the checks on it before anything starts, a stop asked
for by signal, and the checks on the checkpoint and SFT settings (no model, no Ray)."""

import json
import logging
import os
import re
import signal

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from rlcore.checkpoint import Checkpointer, Stopped, check_run_dir
from rlcore.config import ConfigError, LearnerConfig, SFTConfig, validate_sft


def learner(num_ranks=1, zero_stage=0):
    return OmegaConf.structured(LearnerConfig(num_ranks=num_ranks, zero_stage=zero_stage))


def write_checkpoint(run_dir, step, num_ranks=1, zero_stage=0, layout=True):
    """step_N as Checkpointer.save lays it out, with small stand-ins for the model and optimizer
    shards; `layout=False`: as written before trainer_state.json recorded the learner's layout."""
    path = run_dir / "checkpoints" / f"step_{step}"
    (path / "model").mkdir(parents=True)
    save_file({"w": torch.zeros(4)}, path / "model" / "model.safetensors")
    for rank in range(num_ranks):
        torch.save({"optimizer": {}, "scheduler": {}}, path / f"optimizer_rank{rank}.pt")
    state = {"step": step} | ({"learner": {"num_ranks": num_ranks, "zero_stage": zero_stage}} if layout else {})
    (path / "trainer_state.json").write_text(json.dumps(state))
    return path


def cut_in_half(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def test_resume_point_is_the_newest_complete_checkpoint(tmp_path):
    checkpoints = Checkpointer(tmp_path, every=2, keep_last=2)
    assert checkpoints.resume_point("never", learner()) is None
    assert checkpoints.resume_point("auto", learner()) is None  # nothing saved yet: a fresh start
    for step in (2, 10):
        write_checkpoint(tmp_path, step)
    (tmp_path / "checkpoints" / ".tmp_step_12").mkdir()  # a save that was killed half-way
    assert checkpoints.resume_point("auto", learner()).name == "step_10"  # by step number, not by name
    assert checkpoints.resume_point(str(tmp_path / "checkpoints" / "step_2"), learner()).name == "step_2"
    with pytest.raises(ConfigError, match="resume=.*tmp_step_12: not a checkpoint directory"):
        checkpoints.resume_point(str(tmp_path / "checkpoints" / ".tmp_step_12"), learner())


DAMAGE = {  # what the audit did to a checkpoint, and what the error names
    "cut model": (lambda path: cut_in_half(path / "model" / "model.safetensors"),
                  "model/model.safetensors is unreadable (SafetensorError"),
    "cut optimizer": (lambda path: cut_in_half(path / "optimizer_rank0.pt"), "optimizer_rank0.pt is unreadable (BadZipFile"),
    "cut state": (lambda path: cut_in_half(path / "trainer_state.json"), "trainer_state.json is not valid JSON"),
    "no optimizer": (lambda path: (path / "optimizer_rank0.pt").unlink(), "optimizer_rank0.pt is missing"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_named_by_resume_is_a_config_error(tmp_path, damage):
    damage_fn, named = DAMAGE[damage]
    path = write_checkpoint(tmp_path, 2)
    damage_fn(path)
    with pytest.raises(ConfigError, match=re.escape(f"resume={path}: damaged checkpoint: {named}")) as error:
        Checkpointer(tmp_path, every=1, keep_last=2).resume_point(str(path), learner())
    assert "; resume from an earlier checkpoints/step_N, or resume=auto (skips damaged ones)" in str(error.value)


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_auto_skips_a_damaged_newest_checkpoint_with_a_warning(tmp_path, damage, caplog):
    damage_fn, named = DAMAGE[damage]
    write_checkpoint(tmp_path, 1)
    damage_fn(write_checkpoint(tmp_path, 2))
    checkpoints = Checkpointer(tmp_path, every=1, keep_last=2)
    with caplog.at_level(logging.WARNING, logger="rlcore.checkpoint"):
        assert checkpoints.resume_point("auto", learner()).name == "step_1"
    [warning] = caplog.messages
    assert "skipping damaged checkpoint" in warning and "step_2" in warning and named in warning
    damage_fn(tmp_path / "checkpoints" / "step_1")
    with pytest.raises(ConfigError, match="resume=auto: every checkpoint in .* is damaged.*resume=never starts afresh"):
        checkpoints.resume_point("auto", learner())


@pytest.mark.parametrize("saved, running, message", [
    ({"num_ranks": 1}, {"num_ranks": 2},
     "saved by 1 learner rank.*not learner.num_ranks=2; resume with learner.num_ranks=1"),
    ({"num_ranks": 2, "layout": False}, {"num_ranks": 1},  # older checkpoints: shards counted
     "saved by 2 learner rank.*not learner.num_ranks=1; resume with learner.num_ranks=2"),
    ({"zero_stage": 0}, {"zero_stage": 1}, "ZeRO stage 0's optimizer state, which learner.zero_stage=1 cannot load; "
                                           "resume with learner.zero_stage=0"),
    ({"zero_stage": 2}, {"zero_stage": 3}, "resume with learner.zero_stage=2"),
])
def test_a_checkpoint_that_does_not_fit_the_learner_is_a_config_error(tmp_path, saved, running, message):
    path = write_checkpoint(tmp_path, 1, **saved)
    checkpoints = Checkpointer(tmp_path, every=1, keep_last=2)
    for resume in (str(path), "auto"):  # auto does not skip it: it is not damaged, and the one before would not fit either
        with pytest.raises(ConfigError, match=f"resume={re.escape(resume)}: .*{message}"):
            checkpoints.resume_point(resume, learner(**running))


def test_zero_stages_1_and_2_share_their_optimizer_state(tmp_path):
    path = write_checkpoint(tmp_path, 1, zero_stage=1)
    assert Checkpointer(tmp_path, every=1, keep_last=2).resume_point(str(path), learner(zero_stage=2)) == path


def test_run_dir_that_is_a_file_or_below_one_is_a_config_error(tmp_path):
    check_run_dir(str(tmp_path / "new" / "run"))  # made later
    taken = tmp_path / "taken"
    taken.write_text("")
    with pytest.raises(ConfigError, match=re.escape(f"run_dir={taken}: is a file; choose a directory")):
        check_run_dir(str(taken))
    with pytest.raises(ConfigError, match=re.escape(f"run_dir={taken / 'run'}: {taken} is a file; choose a directory")):
        check_run_dir(str(taken / "run"))


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
