"""The memory planner (``plan``): one training step measured on fake tensors, and the cheapest setting that fits."""

from qflux.memory.measure import measure_step
from qflux.memory.planner import estimate

__all__ = ["estimate", "measure_step"]
