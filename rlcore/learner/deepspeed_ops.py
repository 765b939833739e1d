"""DeepSpeed's C++ ops, built on first use under a lock that a killed build cannot leave behind.

DeepSpeed JIT-builds an op the first time a process loads it (on CPU its shared-memory
collectives, at `init_distributed`; with optimizer offload its CPU Adam) through torch's
cpp_extension, which guards the build directory with a lock *file*. A build that is killed —
Ctrl-C during a first run, a job reaching its time limit — leaves that file, and every later
run waits on it forever, printing nothing. So a learner rank loads the ops here first while
holding a file lock (flock, which the kernel releases however its holder ends) on the build
root: every rlcore build of this root holds it, so a lock file found under it is a stale one
and goes. DeepSpeed's own load later finds the op in its in-process cache.

The build root is one per Python environment, `<sys.prefix>/torch_extensions`, unless
TORCH_EXTENSIONS_DIR says otherwise: the ops are built against this environment's torch and
DeepSpeed sources, and environments sharing torch's default (~/.cache/torch_extensions)
rebuild each other's ops whenever a different one runs.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)


def extensions_root() -> Path:
    """Where torch builds C++ extensions in this process (sets the per-environment default)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def load_ops(cpu_adam: bool) -> None:
    """Build (or load) the ops this rank's DeepSpeed will ask for: the shared-memory
    collectives (CPU accelerator only; DeepSpeed skips them elsewhere) and, when `cpu_adam`,
    DeepSpeedCPUAdam's kernel."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    root = extensions_root()
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / "rlcore-build.lock"):
        for stale in root.glob("*/lock"):
            log.warning("removing %s, left by a build of that op that was stopped", stale)
            stale.unlink()
        build_shm_op()
        if cpu_adam:
            get_accelerator().create_op_builder("CPUAdamBuilder").load()
