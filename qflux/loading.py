"""Loading one frozen component at a time from a diffusers-layout folder (shared by every model).

A loader takes a local folder or hub id, a dtype and a device, and returns the component in eval
mode with ``requires_grad`` off; failures are one sentence naming the folder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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


def component_config(model_dir: str | Path, subfolder: str) -> dict[str, Any]:
    """A component's ``config.json`` (read without loading the component: sizes, factors)."""
    import json

    path = Path(model_dir) / subfolder / "config.json"
    try:
        config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise QfluxError(f"could not read '{path}': {e}") from None
    return config


def frozen(module: Any, device: str | torch.device) -> Any:
    """``module`` without gradients, in eval mode, on ``device`` (4-bit layers sharing their
    constant code tables: :func:`qflux.quantize.share_code_tables`)."""
    from qflux.quantize import share_code_tables

    module.requires_grad_(False)
    module.eval()
    module = module.to(device)
    share_code_tables(module)
    return module


def load_component(
    cls: Any,
    model_path: str | Path,
    subfolder: str,
    weight_dtype: torch.dtype,
    device: str | torch.device,
    *,
    pipeline: str,
    quantize: str = "none",
) -> Any:
    """``cls.from_pretrained(folder, subfolder=..., dtype=...)``, frozen on ``device``.

    Args:
        quantize: store the frozen linears as none / fp8 / nf4 / fp4 (:mod:`qflux.quantize`); done
            on the CPU before the move, so the device never holds the full-precision weights. A
            pre-quantized checkpoint (bitsandbytes 4-bit, or fp8 with scales) loads as it is stored.
    """
    from qflux.quantize import load_prequantized, prequantized_kind, quantize_frozen

    path = component_folder(model_path, subfolder, pipeline=pipeline)
    folder = path / subfolder
    try:
        kind = prequantized_kind(folder)
        if kind is not None and not hasattr(cls, "load_config"):
            raise QfluxError(
                f"'{folder}' holds a pre-quantized ({kind}) {subfolder}; qflux reads those for diffusers models "
                "only. Point the model folder at a bf16 checkpoint and set model.quantize_text_encoders: true"
            )
        if kind is not None:
            module = load_prequantized(cls, folder, weight_dtype, kind)
        else:
            module = cls.from_pretrained(path, subfolder=subfolder, dtype=weight_dtype)
            module.requires_grad_(False)
            quantize_frozen(module, quantize, compute_dtype=weight_dtype)
    except (OSError, ValueError, KeyError) as e:
        raise QfluxError(f"could not load {subfolder} from '{folder}': {e}") from None
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


def load_included(
    loaders: Mapping[str, Callable[..., Any]],
    path: Path,
    weight_dtype: torch.dtype,
    include: Sequence[str],
    device: str | torch.device,
    devices: Mapping[str, str | torch.device] | None,
    quantize: Mapping[str, str] | None,
) -> dict[str, Any]:
    """{component: loaded} for each of ``include``, by its loader ``(path, dtype, device, quantize)``,
    placed on ``devices[name]`` (else ``device``) and quantized as ``quantize[name]`` (else none)."""
    place, plan = devices or {}, quantize or {}
    return {
        name: loaders[name](path, weight_dtype, place.get(name, device), plan.get(name, "none")) for name in include
    }
