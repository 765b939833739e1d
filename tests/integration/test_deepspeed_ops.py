"""A DeepSpeed op build that was killed must not hang every later run (rlcore.learner.deepspeed_ops)."""

import os
import subprocess
import sys

LOAD = "from rlcore.learner.deepspeed_ops import load_ops; load_ops(cpu_adam=False)"


def test_a_lock_left_by_a_killed_build_is_removed_and_the_op_builds(tmp_path):
    # torch's cpp_extension waits, silently and forever, while this file exists
    stale = tmp_path / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir()
    stale.touch()
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), DS_ACCELERATOR="cpu")
    # shm collectives: ~25 s to build on 2 idle cores
    done = subprocess.run([sys.executable, "-c", LOAD], env=env, timeout=400, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not stale.exists()
    assert (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").is_file()
    assert "left by a build of that op that was stopped" in done.stderr


def test_the_build_root_defaults_to_one_per_python_environment():
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    code = "from rlcore.learner.deepspeed_ops import extensions_root; print(extensions_root())"
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    assert out.strip() == os.path.join(sys.prefix, "torch_extensions")
