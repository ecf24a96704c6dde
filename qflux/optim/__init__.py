"""Optimizers as pure functions (AdamW, Prodigy) and learning-rate schedules."""

from qflux.optim.adamw import adamw_init, adamw_update
from qflux.optim.prodigy import prodigy_init
from qflux.optim.schedules import learning_rate

__all__ = ["adamw_init", "adamw_update", "learning_rate", "prodigy_init"]
