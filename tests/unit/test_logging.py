"""rlcore.logging: a resumed run goes on in the same wandb run, a fresh start gets its own; metrics read mid-run."""

from omegaconf import OmegaConf

from rlcore.logging import RunLogger, read_metrics


def test_a_resumed_run_logs_to_the_same_wandb_run_and_a_fresh_start_to_a_new_one(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = OmegaConf.create({"progress": False, "wandb": True, "project": "rlcore-test", "wandb_mode": "offline"})

    def run_id(first_step: int) -> str:
        log = RunLogger(tmp_path, cfg, {}, "test", first_step, total_steps=4)
        log.log(first_step + 1, {"reward/mean": 0.5})
        log.close()
        return log.wandb.id

    first, resumed, fresh = run_id(0), run_id(2), run_id(0)
    assert resumed == first and fresh != first
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 3  # what `wandb sync` uploads


def test_metrics_read_while_the_run_writes_them_leave_the_unfinished_row_out(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "reward/mean": 0.5}\n{"step": 3, "rew')
    assert read_metrics(tmp_path) == [{"step": 1}, {"step": 2, "reward/mean": 0.5}]
