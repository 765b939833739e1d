"""Metrics out: console progress bar, `<run_dir>/metrics.jsonl`, wandb, PNG curves, peak memory."""

from __future__ import annotations

import json
import secrets
import threading
from contextlib import contextmanager
import time
from pathlib import Path

import psutil
from tqdm import tqdm

# Shown in the progress bar after each step (when present).
PROGRESS_KEYS = {"reward/mean": "reward", "accuracy": "acc", "response/length_mean": "len", "time/step": "s/step"}


class RunLogger:
    def __init__(self, run_dir: Path, cfg, config_dict: dict, name: str, first_step: int, total_steps: int):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep_rows(self.path, lambda row: row.get("step", 0) <= first_step)  # a resumed run rewrites what came after
        self.bar = tqdm(total=total_steps, initial=first_step, desc=name, unit="step", disable=not cfg.progress, dynamic_ncols=True)
        self.wandb = None
        if cfg.wandb:
            import wandb

            self.wandb = wandb.init(project=cfg.project, name=name, dir=str(run_dir), mode=cfg.wandb_mode, config=config_dict,
                                    id=wandb_run_id(Path(run_dir), resumed=first_step > 0), resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb:
            self.wandb.log(metrics, step=step)
        self.bar.set_postfix({short: f"{metrics[k]:.3g}" for k, short in PROGRESS_KEYS.items() if k in metrics}, refresh=False)
        self.bar.update(max(0, step - self.bar.n))

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
        if self.wandb:
            self.wandb.finish()


def wandb_run_id(run_dir: Path, resumed: bool) -> str:
    """The wandb run id of this run directory: a resumed run goes on logging to the run it
    resumes (online; offline, `wandb sync` puts both parts in one run), a fresh start gets a new one."""
    path = run_dir / "wandb" / "run_id"
    if resumed and path.exists():
        return path.read_text()
    run_id = secrets.token_hex(4)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id)
    return run_id


def keep_rows(path: Path, keep) -> None:
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and keep(json.loads(line))]
    path.write_text("".join(r + "\n" for r in rows))


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl, also while the run writes it: a row not yet ended by
    its newline is left for the next read."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: RUN_DIR must be a run directory of `rlcore train` or `rlcore sft`")
    complete = path.read_text().split("\n")[:-1]
    return [json.loads(line) for line in complete if line.strip()]


def plot_run(run_dir: str | Path) -> list[Path]:
    """One PNG per metric family (the part before '/'), a panel per metric, under <run_dir>/plots/."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    keys = sorted({k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))})
    families: dict[str, list[str]] = {}
    for k in keys:
        families.setdefault(k.split("/")[0], []).append(k)
    out_dir = Path(run_dir) / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    for family, members in families.items():
        fig, axes = plt.subplots(len(members), 1, figsize=(7, 2.2 * len(members) + 0.6), sharex=True, squeeze=False)
        for ax, k in zip(axes[:, 0], members):
            points = [(r["step"], r[k]) for r in rows if k in r]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
            ax.set_ylabel(k.split("/", 1)[-1], fontsize=8)
            ax.grid(alpha=0.3)
        axes[0, 0].set_title(f"{family} — {Path(run_dir).name}")
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        path = out_dir / f"{family.replace('/', '_')}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


class PeakMemory:
    """Samples the summed RSS of this process and all its descendants (Ray's processes included)."""

    def __init__(self, interval_s: float = 0.5):
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self, interval_s: float):
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._sample())
            time.sleep(interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30


class StepTimer:
    """`with timer("generate"): ...` for each phase; metrics() gives time/<phase>, time/step and tokens/s."""

    def __init__(self):
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        yield
        self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - t0

    def metrics(self, tokens: float) -> dict[str, float]:
        total = time.perf_counter() - self.start
        out = {f"time/{k}": v for k, v in self.phases.items()}
        out["time/step"] = total
        out["throughput/tokens_per_s"] = tokens / total
        if "generate" in self.phases:
            out["throughput/generate_tokens_per_s"] = tokens / self.phases["generate"]
        return out
