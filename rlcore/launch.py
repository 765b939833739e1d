"""`rlcore launch slurm [train|sft] nodes=N gpus_per_node=G [partition=… time=…] [overrides] [--dry-run] [--wait]`.

Writes an sbatch script that starts a Ray cluster over the job's nodes and runs `rlcore
train` (or `rlcore sft`) against it, then submits it (`--dry-run` prints it instead). The
script is a header written here (#SBATCH lines, the environment to use, the command and its
overrides) followed by rlcore/templates/slurm.sbatch, plain bash that takes addresses, ports
and CPU counts from Slurm's environment at run time. Users read and edit it: it is saved as
RUN_DIR/slurm.sbatch and can be resubmitted with `sbatch`.

The overrides are checked here, as the command would, so that a typo fails at submit time
rather than after the job waited in the queue.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from rlcore.cli import SCHEMAS, _fail, _precheck, _shorthands

USAGE = ("usage: rlcore launch slurm [train|sft] nodes=N gpus_per_node=G [partition=P time=T requeue=M ...] [overrides] "
         "[--dry-run] [--wait]")
COMMANDS = ("train", "sft")  # what the job runs; train when not named

# Launcher options: name → (pattern of a valid value, what the value should be). Every other key=value is an override of the command.
OPTIONS = {
    "nodes": (r"[1-9]\d*", "a whole number of machines, at least 1"),
    "gpus_per_node": (r"\d+", "a whole number, 0 for CPU nodes"),
    "cpus_per_node": (r"[1-9]\d*", "a whole number; leave it out to take whole nodes"),
    "mem": (r"\d+[KMGT]?", "a size per node such as 64G (0: all of the node's memory)"),
    "time": (r"(\d+-)?\d+(:[0-5]\d){0,2}", "minutes, HH:MM:SS or D-HH:MM:SS"),
    "partition": (r"[\w.,-]+", "a partition name (`sinfo -s` lists them)"),
    "account": (r"[\w.-]+", "a Slurm account name"),
    "job_name": (r"[\w.-]+", "letters, digits, '.', '_' and '-'"),
    "requeue": (r"[1-9]\d*", "minutes before the time limit to checkpoint and requeue the job, at least 1"),
}
REQUIRED = ("nodes", "gpus_per_node")
FLAGS = ("--dry-run", "--wait")
# Settings the script sets from the job itself.
SET_BY_SCRIPT = {"cluster.address": "the job's Ray head", "cluster.num_cpus": "Slurm's CPUs per node; use cpus_per_node=N"}
RAY_WAIT_S = 300


def parse(args: list[str]) -> tuple[str, dict[str, str], list[str], set[str]]:
    """(command, launcher options, the command's overrides, flags) from the arguments after `rlcore launch`."""
    if not args or args[0] != "slurm":
        _fail(f"rlcore launch needs a launcher, and slurm is the only one: {USAGE}")
    command, rest = (args[1], args[2:]) if len(args) > 1 and args[1] in COMMANDS else ("train", args[1:])
    options, overrides, flags = {}, [], set()
    for arg in rest:
        key, sep, value = arg.partition("=")
        if arg.startswith("-"):
            if arg not in FLAGS:
                _fail(f"{arg} is not an option of rlcore launch slurm; use {' or '.join(FLAGS)}")
            flags.add(arg)
        elif sep and key in OPTIONS:
            pattern, expected = OPTIONS[key]
            if not re.fullmatch(pattern, value):
                _fail(f"{key}={value} is not valid; {key} is {expected}")
            options[key] = value
        elif key in SET_BY_SCRIPT:
            _fail(f"{key} is set by the launcher ({SET_BY_SCRIPT[key]}); remove {arg}")
        elif sep and not is_setting(command, key):
            _fail(f"{key} is neither an option of rlcore launch slurm ({', '.join(OPTIONS)}) nor a setting of rlcore {command}")
        else:
            overrides.append(arg)
    for key in REQUIRED:
        if key not in options:
            _fail(f"{key} is missing; add {key}=N ({OPTIONS[key][1]})")
    if "requeue" in options:
        overrides = with_resume_auto(options, overrides)
    return command, options, _shorthands(overrides, command), flags


def is_setting(command: str, key: str) -> bool:
    """Whether an override's key starts with a section of `command`'s schema (`trainer.steps`),
    `recipe`, or Hydra's (`hydra.…`), in any of Hydra's forms (`+key`, `++key`, `~key`). The
    whole key is checked later, by composing the config."""
    section = re.split(r"[.\[]", key.lstrip("+~"), maxsplit=1)[0]
    return section in {f.name for f in dataclasses.fields(SCHEMAS[command])} | {"recipe", "hydra"}


def with_resume_auto(options: dict[str, str], overrides: list[str]) -> list[str]:
    """The overrides of a job that requeues itself (requeue=M): each run continues from the newest checkpoint."""
    minutes = int(options["requeue"])
    if "time" not in options:
        _fail(f"requeue={minutes} needs time=…: Slurm's warning comes {minutes} minutes before the job's time limit")
    if time_minutes(options["time"]) <= minutes:
        _fail(f"requeue={minutes} must be less than time={options['time']}; the job would requeue itself at once")
    resume = [o for o in overrides if o.startswith("resume=")]
    if resume and resume != ["resume=auto"]:
        _fail(f"requeue=M runs each requeued job on from the newest checkpoint: use resume=auto, or leave {resume[-1]} out")
    return overrides if resume else [*overrides, "resume=auto"]


def time_minutes(value: str) -> float:
    """A Slurm --time value in minutes: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S."""
    days, _, clock = value.rpartition("-")
    parts = [int(x) for x in clock.split(":")]
    if days:
        hours, minutes, seconds = (parts + [0, 0])[:3]
        return int(days) * 1440 + hours * 60 + minutes + seconds / 60
    if len(parts) == 3:
        return parts[0] * 60 + parts[1] + parts[2] / 60
    return parts[0] + (parts[1] / 60 if len(parts) == 2 else 0)


def run_dir_and_name(command: str, overrides: list[str]) -> tuple[Path, str]:
    """The run directory the command will use (recipe defaults and interpolation applied), absolute, and the run's name."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="rlcore.conf", version_base=None):
        cfg = compose(config_name=command, overrides=overrides)
    return Path.cwd() / cfg.run_dir, cfg.name


def sbatch_script(command: str, options: dict[str, str], overrides: list[str], run_dir: Path, name: str, written_by: str) -> str:
    directives = {
        "job-name": options.get("job_name", "rlcore-" + re.sub(r"[^\w.-]", "_", name)),
        "nodes": options["nodes"],
        "ntasks-per-node": "1",  # one Ray node per machine
        "gpus-per-node": options["gpus_per_node"] if int(options["gpus_per_node"]) else None,
        "cpus-per-task": options.get("cpus_per_node"),
        "exclusive": None if "cpus_per_node" in options else "",  # whole nodes unless told otherwise
        "mem": options.get("mem"),
        "time": options.get("time"),
        "partition": options.get("partition"),
        "account": options.get("account"),
        "chdir": str(Path.cwd()),  # where relative paths in the overrides were meant from
        "output": str(run_dir / "slurm-%j.out"),
        "open-mode": "append",  # a requeued job's runs share the job id, and so the log
        # requeue=M: SIGUSR1 to the batch shell M minutes before the time limit (see the script's end)
        "signal": f"B:USR1@{int(options['requeue']) * 60}" if "requeue" in options else None,
        "requeue": "" if "requeue" in options else None,
    }
    sbatch_lines = [f"#SBATCH --{k}" + (f"={_sbatch_quote(v)}" if v else "") for k, v in directives.items() if v is not None]
    header = [
        "#!/bin/bash",
        *sbatch_lines,
        "#",
        f"# Written by: {written_by}",
        "# Submit it (again, after editing if you like) with: sbatch FILE",
        "# A Ray head starts on the first node and a Ray worker on each other node; once all",
        f"# have joined, `rlcore {command}` runs against that cluster; Ray stops when the job ends.",
        "",
        f"bin={shlex.quote(str(Path(sys.executable).parent))}  # the environment rlcore launch ran from",
        f"gpus_per_node={int(options['gpus_per_node'])}",
        f"ray_wait_s={RAY_WAIT_S}  # how long the Ray nodes may take to join",
        f"command={command}",
        f"args=({' '.join(shlex.quote(o) for o in overrides)})",
        "",
    ]
    body = resources.files("rlcore").joinpath("templates/slurm.sbatch").read_text()
    return "\n".join(header) + "\n" + body


def _sbatch_quote(value: str) -> str:
    """sbatch reads #SBATCH lines with its own tokenizer: double quotes keep a path with spaces whole."""
    return f'"{value}"' if re.search(r"\s", value) else value


def submit(script: Path, log_pattern: Path, wait: bool) -> int:
    """sbatch the script; print the job id and its log; with --wait, the job's exit status."""
    submitted = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if submitted.returncode != 0:  # sbatch's last line says why ("fatal: Could not establish a configuration source")
        why = ([line.strip() for line in submitted.stderr.splitlines() if line.strip()] or ["no message"])[-1]
        _fail(f"sbatch did not take the job: {why} (the script is {script}; `sbatch {script}` submits it again)")
    sys.stderr.write(submitted.stderr)  # warnings of a job it took
    job_id = submitted.stdout.strip().split(";")[0]  # "id" or "id;cluster"
    print(f"job: {job_id}\nlog: {str(log_pattern).replace('%j', job_id)}", flush=True)
    if not wait:
        return 0
    try:
        state, status = wait_for(job_id)
    except KeyboardInterrupt:
        _fail(f"stopped waiting; job {job_id} goes on (scancel {job_id} stops it)")
    print(f"job {job_id} {'completed' if status == 0 else f'ended {state} (exit status {status})'}")
    return status


# Job states after which a job never runs again. A job that requeues itself passes through
# REQUEUED (and may be CANCELLED for a moment) on its way back to PENDING.
FINAL_STATES = {"COMPLETED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED", "CANCELLED"}


def wait_for(job_id: str, poll_s: float = 2.0, max_poll_s: float = 10.0) -> tuple[str, int]:
    """(final state, exit status) of the job, once it has ended for good. Not `sbatch --wait`: that
    returns as soon as one run of a requeued job ends. A job ends for good when it is in a
    final state and, seen a poll later, still is: a requeue passes through CANCELLED."""
    seen = None
    while True:
        time.sleep(poll_s)
        poll_s = min(poll_s * 2, max_poll_s)
        shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
        if shown.returncode != 0:
            _fail(f"job {job_id} could not be followed: {shown.stderr.strip() or 'scontrol show job failed'}")
        fields = dict(re.findall(r"\b(JobState|ExitCode|Restarts)=(\S+)", shown.stdout))
        state, exit_code = fields["JobState"], fields["ExitCode"]
        if state not in FINAL_STATES:
            seen = None
            continue
        if seen == (state, fields.get("Restarts")):
            code = int(exit_code.split(":")[0])  # "status:signal"
            return state, code or (0 if state == "COMPLETED" else 1)
        seen = (state, fields.get("Restarts"))


def main(args: list[str]) -> None:
    command, options, overrides, flags = parse(args)
    _precheck(command, overrides)
    directory, name = run_dir_and_name(command, overrides)
    text = sbatch_script(command, options, overrides, directory, name, shlex.join(["rlcore", "launch", *args]))
    if "--dry-run" in flags:
        print(text, end="")
        return
    if shutil.which("sbatch") is None:
        _fail("sbatch is not on PATH; run this where Slurm's commands are, or add --dry-run to print the script")
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "slurm.sbatch"
    script.write_text(text)
    print(f"script: {script}")
    sys.exit(submit(script, directory / "slurm-%j.out", "--wait" in flags))
