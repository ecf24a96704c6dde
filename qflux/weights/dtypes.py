"""Dtypes: a config's dtype name as torch's, and the dtype a (possibly quantized) model computes in."""

from __future__ import annotations

import torch
from torch import nn

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    """``'bfloat16'`` → ``torch.bfloat16`` (the config's dtype names)."""
    return _DTYPES[name]


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a model computes in: its quantized layers' compute dtype, else ``module.dtype``
    (diffusers and transformers report the first parameter's dtype, which for a quantized model
    can be the storage dtype)."""
    for m in module.modules():
        dtype = getattr(m, "compute_dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return next(p.dtype for p in module.parameters())
