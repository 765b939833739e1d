"""Resuming from a damaged or mismatched checkpoint as a user meets it: one line and exit 2 before
anything starts, or, with resume=auto, a warning and the checkpoint before the damaged one."""

import json
import subprocess
import sys

from conftest import FAST


def rlcore(*args):
    return subprocess.run([sys.executable, "-m", "rlcore.cli", *args], capture_output=True, text=True, timeout=600)


def assert_one_line_error(result, expected: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rlcore: error:") and expected in lines[0], result.stderr[-3000:]


def test_damaged_or_mismatched_checkpoint_is_one_line_and_auto_resumes_from_the_one_before(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", "recipe=opo_math", f"model.path={tiny_model}", f"run_dir={run_dir}", *FAST, "trainer.steps=2",
            "trainer.checkpoint_every=1", "trainer.eval_before=false", "trainer.eval_after=false"]
    first = rlcore(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    step_2 = run_dir / "checkpoints" / "step_2"
    assert json.loads((step_2 / "trainer_state.json").read_text())["learner"]["num_ranks"] == 1

    assert_one_line_error(rlcore(*args, f"resume={step_2}", "learner.num_ranks=2"),
                          f"resume={step_2}: the checkpoint was saved by 1 learner rank(s)")

    weights = step_2 / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut off, as by a full disk or an interrupted copy
    assert_one_line_error(rlcore(*args, f"resume={step_2}"),
                          f"resume={step_2}: damaged checkpoint: model/model.safetensors is unreadable")

    resumed = rlcore(*args, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert f"skipping damaged checkpoint {step_2}: model/model.safetensors is unreadable" in output
    assert f"resumed from {run_dir / 'checkpoints' / 'step_1'} (step 1)" in output
    assert [row["step"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())] == [1, 2]
