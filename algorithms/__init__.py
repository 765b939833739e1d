"""Built-in algorithms (installed as rlcore.algorithms). Importing this package registers them."""

from rlcore.algorithms import grpo, opo  # noqa: F401
