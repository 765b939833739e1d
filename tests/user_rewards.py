"""User reward functions for the tests, loaded by dotted path like a user's own module."""

import time

import numpy as np
import torch

from rlcore.reward import group_reward


def always_half(sample):
    return 0.5


def with_parts(sample):
    return {"score": 1.0, "brevity": 0.25}


def raises(sample):
    raise RuntimeError("user bug")


class TwoArgError(Exception):
    """Cannot be rebuilt from its args in another process (pickle calls TwoArgError(message))."""

    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


def raises_two_arg_error(sample):
    raise TwoArgError("user", "bug")


def returns_text(sample):
    return "good"


def returns_none(sample):
    pass


def returns_nan(sample):
    return float("nan")


def returns_inf_part(sample):
    return {"score": 1.0, "brevity": float("inf")}


def takes_no_sample():
    return 1.0


@group_reward
def group_takes_nothing():
    return []


def hangs(sample):
    while True:
        time.sleep(0.1)


def varies_with_text(sample):
    """Non-constant rewards for an untrained model, so advantages are non-zero."""
    return float(len(sample.response) % 3) / 2


@group_reward
def share_of_group_correct(group):
    """A user group reward: each sample gets the share of its group the accuracy fn scored 1."""
    share = sum(s.correct for s in group) / len(group)
    return [share] * len(group)


@group_reward
def wrong_count(group):
    return [1.0]


def returns_numpy_true(sample):
    return np.bool_(True)


def returns_0d_tensor(sample):
    return torch.tensor(1.0)
