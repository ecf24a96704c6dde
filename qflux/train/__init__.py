"""Training: the state and the pure step, the loop and its hooks, a run's setting, checkpoints, the cache,
validation and what a run prints."""

from qflux.train.state import TrainState, make_train_step, train_step

__all__ = ["TrainState", "make_train_step", "train_step"]
