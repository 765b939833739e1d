"""Metric reductions shared by the evaluations: rlcore.trainer's held-out accuracy per RPT bucket
and rlcore.hybrid_eval's mode and accuracy metrics per difficulty."""

from __future__ import annotations

from statistics import mean


def means_by_label(name: str, values: list[float], labels: list) -> dict[str, float]:
    """{name: mean of all values, name/<label>: mean of the values with that label}, labels sorted.
    A value whose label is not a string (None where the prompt has none; reasoning-gym's own
    difficulty record is a dict) counts in `name` only."""
    by_label: dict[str, list[float]] = {}
    for value, label in zip(values, labels, strict=True):
        if isinstance(label, str):
            by_label.setdefault(label, []).append(float(value))
    return {name: mean(map(float, values))} | {f"{name}/{label}": mean(vs) for label, vs in sorted(by_label.items())}
