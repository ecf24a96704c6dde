"""A linear layer's shell: a module of a ``nn.Linear`` subclass with its sizes set and no tensors yet.

Every stand-in for a frozen linear layer (fp8 storage, the fast frozen backward, block swap, the
planner's 4-bit fake) is built this way from the layer it replaces, so that no weight is allocated
before the subclass puts its own there.
"""

from __future__ import annotations

from typing import TypeVar

from torch import nn

L = TypeVar("L", bound=nn.Linear)


def linear_shell(cls: type[L], in_features: int, out_features: int) -> L:
    """An instance of ``cls`` with ``in_features`` and ``out_features`` set and no parameters
    (``nn.Linear.__init__`` would allocate an [out, in] weight)."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.in_features, new.out_features = in_features, out_features
    return new
