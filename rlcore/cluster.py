"""Ray: start a local instance (or attach to a running cluster) for the length of a run."""

from __future__ import annotations

import logging
import os
import signal
import socket
from contextlib import contextmanager

from rlcore.config import ConfigError


def machine_cpus(cfg) -> int:
    return cfg.num_cpus or os.cpu_count() or 1


def thread_counts(cluster_cfg, rollout_workers: int, learner_ranks: int) -> tuple[int, int]:
    """(threads per rollout worker, threads per learner rank). Rollout and learners take
    turns (generate, then update), so each side divides all the cores among its actors,
    which run at once. For small models several single-thread actors beat one actor with
    many threads: the matrices are too small for intra-op threading to pay."""
    if cluster_cfg.threads_per_actor:
        return cluster_cfg.threads_per_actor, cluster_cfg.threads_per_actor
    cpus = machine_cpus(cluster_cfg)
    return max(1, cpus // rollout_workers), max(1, cpus // learner_ranks)


def node_ip() -> str:
    """The address of this process's node in the Ray cluster: the one the other nodes reach it at."""
    import ray

    return ray.util.get_node_ip_address()


def interface_holding(ip: str) -> str | None:
    """The name of this machine's network interface that has address `ip`; None if none has it."""
    import psutil

    return next((name for name, addresses in psutil.net_if_addrs().items() if any(a.address == ip for a in addresses)), None)


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def check_answers(address: str, fix: str, timeout_s: float = 10) -> None:
    """ConfigError unless something accepts a connection at a HOST:PORT (or ray://HOST:PORT)
    address: ray.init retries a refused one for minutes. `auto` is left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not (sep and host and port.isdigit()):
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()  # [::1]:6379 too
    except OSError as e:
        raise ConfigError(f"cluster.address={address}: nothing answers there ({e.strerror or type(e).__name__}); {fix}") from None


@contextmanager
def ray_session(cfg):
    """Ray for the duration of the block; whatever this process started is shut down on
    exit, on error, on Ctrl-C and on SIGTERM. An existing cluster (cluster.address) is left running."""
    import ray

    kwargs = dict(logging_level=logging.WARNING, log_to_driver=True)
    if cfg.address:
        fix = "start one there (`ray start --head`), or leave cluster.address empty for a Ray of this run's own"
        check_answers(cfg.address, fix)
        try:
            ray.init(address=cfg.address, **kwargs)
        except ConnectionError as e:
            raise ConfigError(f"cluster.address={cfg.address}: {str(e).splitlines()[0]}; {fix}") from None
    else:
        ray.init(
            address="local",  # a new instance, even when `ray start` left one running on this machine
            num_cpus=machine_cpus(cfg),
            include_dashboard=cfg.dashboard,
            dashboard_host="127.0.0.1",
            **kwargs,
        )
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        ray.shutdown()
