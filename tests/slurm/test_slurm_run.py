"""`rlcore launch slurm` against a real Slurm: a 2-step run of a tiny recipe, start to summary.

Needs a controller: `scripts/slurm_local.sh start` (one node, this machine) and
`export SLURM_CONF=/tmp/rlcore-slurm/slurm.conf`; skipped otherwise.
"""

import json
import re
import shutil
import subprocess
import sys

import psutil
import pytest

pytestmark = pytest.mark.slurm

TINY = [
    "trainer.steps=2", "trainer.prompts_per_step=2", "algorithm.samples_per_prompt=2", "rollout.max_new_tokens=8",
    "rollout.eval_max_new_tokens=8", "data.train_size=50", "data.eval_size=4", "trainer.eval_before=false",
    "trainer.eval_after=false", "logger.wandb=false", "logger.progress=false", "reward.num_workers=1",
]
TIMEOUT_S = 600


def skip_without_slurm() -> None:
    start = "start one with scripts/slurm_local.sh start and export SLURM_CONF=/tmp/rlcore-slurm/slurm.conf"
    if shutil.which("sbatch") is None:
        pytest.skip(f"no sbatch on PATH; {start}")
    sinfo = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True, timeout=30)
    if sinfo.returncode != 0:
        reason = (sinfo.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"no Slurm controller answers ({reason}); {start}")


def test_two_step_run_through_sbatch(tmp_path):
    skip_without_slurm()
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "rlcore.cli", "launch", "slurm", "recipe=grpo_math", "nodes=1", "gpus_per_node=0", "time=15",
           *TINY, f"run_dir={run_dir}", "--wait"]
    launch = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = launch.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        launch.kill()
        out, err = launch.communicate()
    job = re.search(r"^job: (\d+)$", out, flags=re.M)
    assert job, f"no job submitted:\n{out}\n{err}"
    job_id = job.group(1)
    log = run_dir / f"slurm-{job_id}.out"
    if launch.returncode is None or launch.returncode < 0:
        subprocess.run(["scancel", job_id])
    details = f"\n--- rlcore launch ---\n{out}{err}\n--- {log} ---\n{log.read_text() if log.exists() else '(none)'}"

    state = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    assert "JobState=COMPLETED" in state and launch.returncode == 0, state + details
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "time/step" in r] == [1, 2], details
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2, details
    # Ray was stopped with the job: no GCS server is left on this job's port.
    port = 10000 + int(job_id) % 40 * 500
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if f"--gcs_server_port={port}" in " ".join(p.info["cmdline"] or [])]
    assert not left, f"Ray processes left after the job: {left}" + details
