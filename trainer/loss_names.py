"""The names of the losses and of the top-k tail modes: what configs and `--help` offer, without torch."""

LOSS_NAMES: tuple[str, ...] = ("kl", "tv", "lk_alpha", "lk_lambda")
TAIL_MODES: tuple[str, ...] = ("bucket", "drop")
