"""`rlcore launch slurm` against a real Slurm: a 2-step run of a tiny recipe on every node of
the cluster (up to 3), start to summary.

Needs a controller: `scripts/slurm_local.sh start [N]` (CI: 3 nodes, each in its own network
namespace) and `export SLURM_CONF=/tmp/rlcore-slurm/slurm.conf`; skipped otherwise. On more
than one node each actor takes a whole node, so rollouts, weights and the learner ranks'
collectives all cross the network between nodes.
"""

import json
import re
import shutil
import socket
import subprocess
import sys

import psutil
import pytest

from rlcore.cluster import interface_holding

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


def idle_nodes() -> dict[str, int]:
    """The cluster's idle nodes: name → CPUs."""
    sinfo = subprocess.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N %c"], capture_output=True, text=True, timeout=30)
    return {name: int(cpus) for name, cpus in (line.split() for line in sorted(set(sinfo.stdout.splitlines())))}


def test_two_step_run_through_sbatch_on_every_node(tmp_path):
    skip_without_slurm()
    nodes = dict(list(idle_nodes().items())[:3])
    assert nodes, "no idle node"
    # More than one node: one actor per node (each asks for all of a node's CPUs), the rollout
    # worker and nodes - 1 learner ranks.
    spread = [f"learner.num_ranks={len(nodes) - 1}", f"cluster.cpus_per_actor={min(nodes.values())}"] if len(nodes) > 1 else []
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "rlcore.cli", "launch", "slurm", "recipe=grpo_math", f"nodes={len(nodes)}", "gpus_per_node=0",
           "time=15", *TINY, *spread, f"run_dir={run_dir}", "--wait"]
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
    # Ray was stopped with the job on every node: no GCS server or raylet is left on this job's ports.
    port = 10000 + int(job_id) % 40 * 500
    ports = (f"--gcs_server_port={port}", f"--node_manager_port={port + 1}")
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if any(a in ports for a in p.info["cmdline"] or [])]
    assert not left, f"Ray processes left after the job: {left}" + details
