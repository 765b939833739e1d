"""`rlcore launch slurm`: the sbatch script it writes, run here under a stand-in Slurm and Ray
(stub `srun`, `ray`, `rlcore` that record their calls), and its one-line errors."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlcore.launch import time_minutes, wait_for

RLCORE = [sys.executable, "-m", "rlcore.cli"]
# Overrides a shell would mangle if the script quoted them wrong: a glob, a space, a `$`.
TRICKY = ["reward.fns=[math,format]", "name='my run'", "logger.project=$HOME"]


def launch(*args, cwd, env=None):
    return subprocess.run([*RLCORE, "launch", "slurm", *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def dry_run(*args, cwd) -> str:
    result = launch(*args, "--dry-run", cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def sbatch_options(script: str) -> list[str]:
    return re.findall(r"^#SBATCH (\S.*)$", script, flags=re.M)


def test_dry_run_sbatch_header_for_two_gpu_nodes(tmp_path):
    script = dry_run("recipe=grpo_math", "nodes=2", "gpus_per_node=8", "partition=gpu", "time=04:00:00",
                     "run_dir=out/r1", *TRICKY, cwd=tmp_path)
    assert sbatch_options(script) == [
        "--job-name=rlcore-my_run", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--exclusive",
        "--time=04:00:00", "--partition=gpu", f"--chdir={tmp_path}", f"--output={tmp_path}/out/r1/slurm-%j.out",
        "--open-mode=append",
    ]
    assert f"\nbin={Path(sys.executable).parent}  #" in script  # ray and rlcore from the launching environment
    # The overrides reach `rlcore train` exactly as given, whatever the shell would make of them.
    args = re.search(r"^args=.*$", script, flags=re.M).group(0)
    echoed = subprocess.run(["bash", "-c", f'{args}; printf "%s\\n" "${{args[@]}}"'], capture_output=True, text=True)
    assert echoed.stdout.splitlines() == ["recipe=grpo_math", "run_dir=out/r1", *TRICKY]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_cpu_share_instead_of_whole_nodes(tmp_path):
    options = sbatch_options(dry_run("nodes=1", "gpus_per_node=0", "cpus_per_node=16", "mem=64G", cwd=tmp_path))
    assert "--cpus-per-task=16" in options and "--mem=64G" in options
    assert "--exclusive" not in options and not any(o.startswith("--gpus-per-node") for o in options)


STUBS = {
    # srun: record, drop its options, run the command (on "the other node") as its task; or fail,
    # as told. Signals reach the task as Slurm's srun passes them on: SIGTERM as SIGKILL, SIGUSR2 as it is.
    "srun": (
        'echo "srun $*" >> "$CALLS"\n[ -z "$SRUN_FAILS" ] || { sleep 1; exit 1; }\nwhile [[ $1 == --* ]]; do shift; done\n'
        'trap \'kill -KILL "$task"\' TERM\ntrap \'kill -USR2 "$task"\' USR2\n'
        '"$@" &\ntask=$!\nwhile kill -0 "$task" 2>/dev/null; do wait "$task"; done\n'
    ),
    # ray start: record (a worker after a second), then stay up until SIGTERM.
    # ray status: one active node per `ray start` so far.
    "ray": (
        'if [ "$1" = start ]; then\n'
        '  trap \'echo "ray stopped: $*" >> "$CALLS"; exit 0\' TERM\n'
        '  [[ "$*" != *--address=* ]] || sleep 1\n'
        '  echo "ray $*" >> "$CALLS"\n'
        "  for _ in $(seq 600); do sleep 0.1; done\n"  # at most a minute, should the script never stop it
        "fi\n"
        'echo Active:; grep "^ray start" "$CALLS" | sed "s/.*/ 1 node_x/"; echo Pending:\n'
    ),
    # rlcore: record; as told, run until SIGUSR1 and stop as rlcore does (status 75), or die of
    # it as rlcore does before its handler is installed.
    "rlcore": (
        'printf "rlcore arg: %s\\n" "$@" >> "$CALLS"\n'
        'if [ -n "$RLCORE_ON_USR1" ]; then\n'
        '  [ "$RLCORE_ON_USR1" = die ] || trap \'echo "rlcore got USR1" >> "$CALLS"; exit 75\' USR1\n'
        "  for _ in $(seq 600); do sleep 0.1; done\n"
        "fi\n"
    ),
    "scontrol": 'echo "scontrol $*" >> "$CALLS"\n',
}


def run_under_stub_slurm(script: str, tmp_path: Path, job_id: int, srun_fails: bool = False,
                         usr1_after: str = "", rlcore_on_usr1: str = "exit") -> tuple[int, str, list[str]]:
    """Run the script as Slurm would on the first of 2 nodes with 4 CPUs: (exit status, stderr, the
    calls it made). `usr1_after`: SIGUSR1 to the script, as Slurm's `--signal=B:USR1@…` does, once
    a call starting with it was made; rlcore then runs until the signal and, as
    `rlcore_on_usr1` says, exits 75 or dies of it."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for name, body in STUBS.items():
        (stubs / name).write_text("#!/bin/bash\n" + body)
        (stubs / name).chmod(0o755)
    calls = tmp_path / f"calls-{job_id}.log"
    calls.touch()
    path = tmp_path / "job.sbatch"
    path.write_text(re.sub(r"^bin=.*$", f"bin={stubs}", script, flags=re.M))
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "CALLS": str(calls), "SLURM_JOB_ID": str(job_id),
           "SLURM_JOB_NUM_NODES": "2", "SLURMD_NODENAME": "localhost", "SLURM_CPUS_ON_NODE": "4",
           "SRUN_FAILS": "1" if srun_fails else "", "RLCORE_ON_USR1": rlcore_on_usr1 if usr1_after else ""}
    job = subprocess.Popen(["bash", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if usr1_after:
        deadline = time.time() + 30
        while f"\n{usr1_after}" not in "\n" + calls.read_text() and time.time() < deadline:
            time.sleep(0.1)
        job.send_signal(signal.SIGUSR1)
    _, stderr = job.communicate(timeout=60)
    return job.returncode, stderr, calls.read_text().splitlines()


def last_call(calls: list[str], prefix: str) -> int:
    return max(i for i, c in enumerate(calls) if c.startswith(prefix))


def test_script_starts_head_and_worker_then_trains_then_stops_ray(tmp_path):
    script = dry_run("recipe=grpo_math", "nodes=2", "gpus_per_node=8", *TRICKY, cwd=tmp_path)
    status, stderr, calls = run_under_stub_slurm(script, tmp_path, job_id=1234)
    assert status == 0, stderr[-3000:]
    port = 10000 + 1234 % 40 * 500

    node = (f"ray start --block --disable-usage-stats --node-ip-address=127.0.0.1 --num-cpus=4 --num-gpus=8 "
            f"--node-manager-port={port + 1} --object-manager-port={port + 2} --dashboard-agent-grpc-port={port + 3} "
            f"--dashboard-agent-listen-port={port + 4} --metrics-export-port={port + 5} --runtime-env-agent-port={port + 6} "
            f"--min-worker-port={port + 100} --max-worker-port={port + 499}")
    head = f"{node} --head --port={port} --include-dashboard=false"
    worker = f"{node} --address=127.0.0.1:{port}"
    srun = "srun --nodes=1 --ntasks=1 --ntasks-per-node=1 --exclude=localhost --cpus-per-task=4 bash -c"
    # Both nodes are up (the worker joins a second late) before training starts.
    assert set(calls[:3]) == {head, f"{srun} ray_worker \"$0\" 127.0.0.1:{port}", worker}
    train = [c.removeprefix("rlcore arg: ") for c in calls if c.startswith("rlcore arg: ")]
    assert train == ["train", "recipe=grpo_math", *TRICKY, f"cluster.address=127.0.0.1:{port}", "cluster.num_cpus=4"]
    # Ray is stopped after training, both nodes, by signal to this job's own processes.
    last_train = last_call(calls, "rlcore arg: ")
    assert sorted(calls[last_train + 1:]) == sorted([f"ray stopped: {head.removeprefix('ray ')}", f"ray stopped: {worker.removeprefix('ray ')}"])


def test_sft_runs_rlcore_sft_with_its_own_overrides_checked(tmp_path):
    script = dry_run("sft", "recipe=sft_arith", "nodes=1", "gpus_per_node=0", "sft.steps=7", cwd=tmp_path)
    assert "--job-name=rlcore-sft_arith" in sbatch_options(script) and "\ncommand=sft\n" in script
    status, stderr, calls = run_under_stub_slurm(script, tmp_path, job_id=3)
    assert status == 0, stderr[-3000:]
    run = [c.removeprefix("rlcore arg: ") for c in calls if c.startswith("rlcore arg: ")]
    assert run[:3] == ["sft", "recipe=sft_arith", "sft.steps=7"]
    bad = launch("sft", "nodes=1", "gpus_per_node=0", "trainer.steps=3", "--dry-run", cwd=tmp_path)  # a train setting
    assert bad.returncode == 2 and "trainer" in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr


def test_ports_follow_the_job_id(tmp_path):
    """Two jobs sharing a node get different port blocks."""
    script = dry_run("nodes=2", "gpus_per_node=0", cwd=tmp_path)
    ports = []
    for job_id in (41, 42):
        status, stderr, calls = run_under_stub_slurm(script, tmp_path, job_id)
        assert status == 0, stderr[-3000:]
        ports.append(int(re.search(r"--head --port=(\d+)", "\n".join(calls)).group(1)))
    assert ports == [10500, 11000]


def test_a_node_that_fails_to_start_fails_the_job_before_training(tmp_path):
    script = dry_run("nodes=2", "gpus_per_node=0", cwd=tmp_path)
    status, stderr, calls = run_under_stub_slurm(script, tmp_path, job_id=7, srun_fails=True)
    assert status == 1
    assert "rlcore: error: a Ray node exited during start-up" in stderr
    assert not any(c.startswith("rlcore arg: ") for c in calls)
    assert any(c.startswith("ray stopped: start") and "--head" in c for c in calls)  # the head is stopped too


def test_requeue_asks_for_the_warning_and_resumes_each_run(tmp_path):
    script = dry_run("recipe=grpo_math", "nodes=2", "gpus_per_node=0", "time=1-00:00", "requeue=15", cwd=tmp_path)
    options = sbatch_options(script)
    assert {"--signal=B:USR1@900", "--requeue", "--open-mode=append"} <= set(options)
    assert re.search(r"^args=\(recipe=grpo_math resume=auto\)$", script, flags=re.M)
    again = dry_run("nodes=1", "gpus_per_node=0", "time=60", "requeue=5", "resume=auto", cwd=tmp_path)
    assert re.search(r"^args=\(resume=auto\)$", again, flags=re.M)  # not twice
    plain = sbatch_options(dry_run("nodes=1", "gpus_per_node=0", "time=60", cwd=tmp_path))
    assert not any(o.startswith(("--signal", "--requeue")) for o in plain)


def assert_ray_stopped_then_requeued(calls: list[str], after: int, job_id: int):
    """Ray is stopped on both nodes before the job puts itself back in the queue."""
    assert sorted(c.split(":")[0] for c in calls[after + 1:]) == ["ray stopped", "ray stopped", f"scontrol requeue {job_id}"]
    assert calls[-1] == f"scontrol requeue {job_id}"


def test_usr1_reaches_training_which_checkpoints_and_the_job_requeues_itself(tmp_path):
    script = dry_run("nodes=2", "gpus_per_node=0", "time=60", "requeue=5", cwd=tmp_path)
    status, stderr, calls = run_under_stub_slurm(script, tmp_path, job_id=77, usr1_after="rlcore arg: train")
    assert status == 75, stderr[-3000:]
    assert_ray_stopped_then_requeued(calls, calls.index("rlcore got USR1"), 77)


def test_usr1_before_rlcore_catches_it_still_requeues(tmp_path):
    """A stop asked while Ray starts: rlcore is not run at all. One that reaches rlcore before its
    handler is installed kills it (status 138). Neither has a step to save: both requeue."""
    script = dry_run("nodes=2", "gpus_per_node=0", "time=60", "requeue=5", cwd=tmp_path)
    status, stderr, calls = run_under_stub_slurm(script, tmp_path, job_id=78, usr1_after="ray start")
    assert status == 75, stderr[-3000:]
    assert not any(c.startswith("rlcore arg: ") for c in calls)
    assert_ray_stopped_then_requeued(calls, last_call(calls, "ray start"), 78)

    status, stderr, calls = run_under_stub_slurm(script, tmp_path, job_id=79, usr1_after="rlcore arg: train",
                                                 rlcore_on_usr1="die")
    assert status == 75, stderr[-3000:]
    assert "rlcore got USR1" not in calls
    assert_ray_stopped_then_requeued(calls, last_call(calls, "rlcore arg: "), 79)


SCONTROL_SHOWS = (  # stand-in `scontrol show job`: the next line of $STATES each call ("state exit_code restarts")
    'n=$(cat "$POLLS" 2>/dev/null || echo 0); echo $((n + 1)) > "$POLLS"\n'
    'set -- $(sed -n "$((n + 1))p" "$STATES")\n'
    'printf "JobId=5 JobName=rlcore-x\\n   JobState=%s Reason=None\\n   Restarts=%s ExitCode=%s\\n" "$1" "$3" "$2"\n'
)


@pytest.mark.parametrize("states, expected", [
    # A requeue: the run ends (CANCELLED for a moment, then REQUEUED), the job queues and runs again.
    (["PENDING 0:0 0", "RUNNING 0:0 0", "CANCELLED 0:15 1", "REQUEUED 0:15 1", "PENDING 0:0 1", "RUNNING 0:0 1",
      "COMPLETED 0:0 1", "COMPLETED 0:0 1"], ("COMPLETED", 0)),
    (["RUNNING 0:0 0", "FAILED 3:0 0", "FAILED 3:0 0"], ("FAILED", 3)),
    (["RUNNING 0:0 0", "TIMEOUT 0:15 0", "TIMEOUT 0:15 0"], ("TIMEOUT", 1)),
])
def test_wait_follows_the_job_through_requeues_to_its_end(tmp_path, monkeypatch, states, expected):
    (tmp_path / "scontrol").write_text("#!/bin/bash\n" + SCONTROL_SHOWS)
    (tmp_path / "scontrol").chmod(0o755)
    (tmp_path / "states").write_text("\n".join(states) + "\n")
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("STATES", str(tmp_path / "states"))
    monkeypatch.setenv("POLLS", str(tmp_path / "polls"))
    assert wait_for("5", poll_s=0.01, max_poll_s=0.01) == expected
    assert int((tmp_path / "polls").read_text()) == len(states)  # a final state counts once seen twice


@pytest.mark.parametrize("value, minutes", [
    ("90", 90), ("90:30", 90.5), ("2:00:00", 120), ("1-0", 1440), ("1-2:30", 1590), ("2-00:00:30", 2880.5)])
def test_slurm_time_in_minutes(value, minutes):
    assert time_minutes(value) == minutes


@pytest.mark.parametrize("args, expected", [
    (["gpus_per_node=0"], "nodes is missing; add nodes=N"),
    (["nodes=2"], "gpus_per_node is missing; add gpus_per_node=N"),
    (["nodes=0", "gpus_per_node=0"], "nodes=0 is not valid; nodes is a whole number of machines, at least 1"),
    (["nodes=1", "gpus_per_node=0", "time=soon"], "time=soon is not valid; time is minutes, HH:MM:SS or D-HH:MM:SS"),
    (["nodes=1", "gpus_per_node=0", "time=99:99:99"], "time=99:99:99 is not valid; time is minutes, HH:MM:SS"),
    (["nodes=1", "gpus_per_node=0", "qos=high"], "qos is neither an option of rlcore launch slurm (nodes, gpus_per_node,"),
    (["nodes=1", "gpus_per_node=0", "--nodes=2"], "--nodes=2 is not an option of rlcore launch slurm; use --dry-run or --wait"),
    (["nodes=1", "gpus_per_node=0", "cluster.address=h:1"], "cluster.address is set by the launcher"),
    (["nodes=1", "gpus_per_node=0", "trainer.stepz=3"], "trainer.stepz is not a setting; allowed under trainer: steps"),
    (["nodes=1", "gpus_per_node=0", "requeue=0", "time=60"], "requeue=0 is not valid; requeue is minutes before the time limit"),
    (["nodes=1", "gpus_per_node=0", "requeue=10"], "requeue=10 needs time=…"),
    (["nodes=1", "gpus_per_node=0", "requeue=10", "time=0:10:00"], "requeue=10 must be less than time=0:10:00"),
    (["nodes=1", "gpus_per_node=0", "requeue=10", "time=60", "resume=never"], "use resume=auto, or leave resume=never out"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, expected):
    result = launch(*args, "--dry-run", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith("rlcore: error: ")
    assert expected in result.stderr
    assert result.stdout == ""


def test_other_launcher_and_missing_sbatch_are_one_line(tmp_path):
    result = subprocess.run([*RLCORE, "launch", "pbs", "nodes=1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "slurm is the only one" in result.stderr
    no_slurm = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    result = launch("nodes=1", "gpus_per_node=0", cwd=tmp_path, env=no_slurm)
    assert result.returncode == 2 and result.stderr.startswith("rlcore: error: sbatch is not on PATH"), result.stderr


def test_sbatch_refusing_the_job_is_one_line_naming_the_script(tmp_path):
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "sbatch").write_text("#!/bin/bash\n"  # what sbatch prints where no slurmctld can be found
                                  "echo 'sbatch: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host' >&2\n"
                                  "echo 'sbatch: fatal: Could not establish a configuration source' >&2\nexit 1\n")
    (stubs / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"}
    result = launch("nodes=1", "gpus_per_node=0", "recipe=opo_math", cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    script = tmp_path / "runs" / "opo_math" / "slurm.sbatch"
    assert result.stderr.splitlines() == [
        f"rlcore: error: sbatch did not take the job: sbatch: fatal: Could not establish a configuration source "
        f"(the script is {script}; `sbatch {script}` submits it again)"]
    assert script.is_file()
