"""Loading one frozen component at a time from a diffusers-layout folder (shared by every model).

A loader takes a local folder or hub id, a dtype and a device, and returns the component in eval
mode with ``requires_grad`` off; failures are one sentence naming the folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qflux.errors import QfluxError
from qflux.model_dir import resolve_model_dir

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    """``'bfloat16'`` → ``torch.bfloat16`` (the config's dtype names)."""
    return _DTYPES[name]


def component_folder(model_path: str | Path, subfolder: str, *, pipeline: str) -> Path:
    """The model folder, checked to hold ``subfolder`` (``pipeline`` names the model in errors)."""
    return resolve_model_dir(str(model_path), [subfolder], pipeline=pipeline)


def frozen(module: Any, device: str | torch.device) -> Any:
    """``module`` without gradients, in eval mode, on ``device``."""
    module.requires_grad_(False)
    module.eval()
    return module.to(device)


def load_component(
    cls: Any,
    model_path: str | Path,
    subfolder: str,
    weight_dtype: torch.dtype,
    device: str | torch.device,
    *,
    pipeline: str,
) -> Any:
    """``cls.from_pretrained(folder, subfolder=..., dtype=...)``, frozen on ``device``."""
    path = component_folder(model_path, subfolder, pipeline=pipeline)
    try:
        module = cls.from_pretrained(path, subfolder=subfolder, dtype=weight_dtype)
    except (OSError, ValueError, KeyError) as e:
        raise QfluxError(f"could not load {subfolder} from '{path / subfolder}': {e}") from None
    return frozen(module, device)


def load_tokenizer(model_path: str | Path, subfolder: str, *, pipeline: str) -> Any:
    """The tokenizer saved in ``subfolder`` (``AutoTokenizer``)."""
    from transformers import AutoTokenizer

    path = component_folder(model_path, subfolder, pipeline=pipeline)
    try:
        return AutoTokenizer.from_pretrained(path / subfolder)
    except (OSError, ValueError) as e:
        raise QfluxError(f"could not load {subfolder} from '{path / subfolder}': {e}") from None


def load_scheduler(model_path: str | Path, *, pipeline: str) -> Any:
    """The flow-matching Euler scheduler (``scheduler/``) whose config predict and training read."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    path = component_folder(model_path, "scheduler", pipeline=pipeline)
    return FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
