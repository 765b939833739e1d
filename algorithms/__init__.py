"""Built-in algorithms (installed as rlcore.algorithms). Importing this package registers them."""

from rlcore.algorithms import asyncthink, dapo, grpo, gspo, hgpo, opo, reinforce_pp, rloo, rspo  # noqa: F401
