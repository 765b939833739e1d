"""Built-in reward functions (installed as rlcore.rewards)."""
