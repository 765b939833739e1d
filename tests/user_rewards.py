"""User reward functions for the tests, loaded by dotted path like a user's own module."""

import time

from rlcore.reward import group_reward


def always_half(sample):
    return 0.5


def with_parts(sample):
    return {"score": 1.0, "brevity": 0.25}


def raises(sample):
    raise RuntimeError("user bug")


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
