"""The mixed-difficulty addition task of hybrid thinking (SPEC §2): reasoning-gym task `arith_mix`.

Each question is easy (2–3 one-digit terms, "Calculate 4 + 1 + 7.") with probability
easy_share, else hard (2–3 terms of 2–3 digits: the embedded task, configs/data/arith.yaml),
and says which in metadata["difficulty"] = "easy" | "hard". That key replaces reasoning-gym's
own `difficulty` record (the generator's digit and term ranges), which this task fixes.
Digits are reasoning-gym's: a d-digit term is drawn from 0..10^d, so easy terms include 10
and hard ones the odd one-digit number (metadata["num_digits"] keeps the d drawn).

It is a reasoning-gym dataset, registered on import (rlcore.data imports it before creating a
task), so data.source=reasoning_gym data.task=arith_mix gets the usual seeded splits and
held-out filtering; configs/data/arith_mix.yaml selects it.
"""

from __future__ import annotations

from dataclasses import dataclass
from random import Random
from typing import Optional

from reasoning_gym.arithmetic.basic_arithmetic import BasicArithmeticDataset, BasicArithmeticDatasetConfig
from reasoning_gym.factory import ProceduralDataset, register_dataset

NAME = "arith_mix"


@dataclass
class ArithMixConfig:
    easy_share: float = 0.5
    min_terms: int = 2
    max_terms: int = 3
    hard_min_digits: int = 2
    hard_max_digits: int = 3
    seed: Optional[int] = None
    size: int = 500

    def validate(self):
        # ValueError: rlcore.data reports it as one line naming data.task_args.
        if not 0 <= self.easy_share <= 1:
            raise ValueError(f"easy_share={self.easy_share} must be in [0, 1]")
        if not 1 <= self.min_terms <= self.max_terms:
            raise ValueError(f"min_terms={self.min_terms}, max_terms={self.max_terms}: need 1 ≤ min_terms ≤ max_terms")
        if not 2 <= self.hard_min_digits <= self.hard_max_digits:
            raise ValueError(
                f"hard_min_digits={self.hard_min_digits}, hard_max_digits={self.hard_max_digits}: need 2 ≤ min ≤ max (easy is one digit)"
            )


class ArithMixDataset(ProceduralDataset):
    def __init__(self, config: ArithMixConfig):
        super().__init__(config=config, seed=config.seed, size=config.size)
        common = dict(min_terms=config.min_terms, max_terms=config.max_terms, operators=("+",), allow_parentheses=False,
                      allow_negation=False, seed=self.seed, size=config.size)
        self.parts = {
            "easy": BasicArithmeticDataset(BasicArithmeticDatasetConfig(min_digits=1, max_digits=1, **common)),
            "hard": BasicArithmeticDataset(
                BasicArithmeticDatasetConfig(min_digits=config.hard_min_digits, max_digits=config.hard_max_digits, **common)
            ),
        }

    def __getitem__(self, idx: int) -> dict:
        # Its own random stream: the parts draw from Random(seed + idx), and sharing it would tie
        # the difficulty to their first draw (the number of terms).
        difficulty = "easy" if Random(f"{NAME}:{self.seed}:{idx}").random() < self.config.easy_share else "hard"
        item = self.parts[difficulty][idx]
        return {**item, "metadata": {**item["metadata"], "difficulty": difficulty}}


register_dataset(NAME, ArithMixDataset, ArithMixConfig)
