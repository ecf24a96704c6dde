"""Optimizers as records of two pure functions (AdamW, Prodigy; :mod:`qflux.optim.transform`, chosen once by
``make_optimizer``) and learning-rate schedules."""

from qflux.optim.schedules import learning_rate
from qflux.optim.transform import Optimizer, make_optimizer, optimizer_from_config

__all__ = ["Optimizer", "learning_rate", "make_optimizer", "optimizer_from_config"]
