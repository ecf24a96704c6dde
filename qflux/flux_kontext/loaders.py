"""Loading FLUX.1 Kontext components one at a time from a diffusers-layout folder (plan §2).

Each loader takes a local folder or hub id, a dtype and a device, and returns the component in
eval mode with ``requires_grad`` off. Loading one component never loads the others, so training
from a cache can skip the text encoders entirely.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from qflux.loading import load_component, load_included, load_scheduler, load_tokenizer
from qflux.loading import torch_dtype as torch_dtype  # re-exported for recipes and benchmarks
from qflux.model_dir import resolve_model_dir

PIPELINE = "FLUX.1 Kontext"
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def _load(
    cls: Any,
    model_path: str | Path,
    subfolder: str,
    weight_dtype: torch.dtype,
    device: str | torch.device,
    quantize: str = "none",
) -> Any:
    return load_component(cls, model_path, subfolder, weight_dtype, device, pipeline=PIPELINE, quantize=quantize)


def load_flux_kontext_clip(
    model_path: str | Path,
    weight_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    quantize: str = "none",
) -> Any:
    """The CLIP text encoder (``text_encoder/``): pooled prompt embedding [B, 768]."""
    from transformers import CLIPTextModel

    return _load(CLIPTextModel, model_path, "text_encoder", weight_dtype, device, quantize)


def load_flux_kontext_t5(
    model_path: str | Path,
    weight_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    quantize: str = "none",
) -> Any:
    """The T5 encoder (``text_encoder_2/``): prompt token embeddings [B, S, 4096]."""
    from transformers import T5EncoderModel

    return _load(T5EncoderModel, model_path, "text_encoder_2", weight_dtype, device, quantize)


def load_flux_kontext_vae(
    model_path: str | Path,
    weight_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    quantize: str = "none",
) -> Any:
    """The autoencoder (``vae/``): images [B, 3, H, W] ↔ latents [B, 16, H/8, W/8]."""
    from diffusers import AutoencoderKL

    return _load(AutoencoderKL, model_path, "vae", weight_dtype, device, quantize)


def load_flux_kontext_transformer(
    model_path: str | Path,
    weight_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    quantize: str = "none",
) -> Any:
    """The Flux transformer (``transformer/``) with its guidance embedding."""
    from diffusers import FluxTransformer2DModel

    return _load(FluxTransformer2DModel, model_path, "transformer", weight_dtype, device, quantize)


def load_flux_kontext_tokenizers(model_path: str | Path) -> tuple[Any, Any]:
    """The CLIP tokenizer (``tokenizer/``) and the T5 tokenizer (``tokenizer_2/``)."""
    return load_tokenizer(model_path, "tokenizer", pipeline=PIPELINE), load_tokenizer(
        model_path, "tokenizer_2", pipeline=PIPELINE
    )


def load_flux_kontext_scheduler(model_path: str | Path) -> Any:
    """The flow-matching Euler scheduler (``scheduler/``) whose config predict and training read."""
    return load_scheduler(model_path, pipeline=PIPELINE)


@attrs.frozen(eq=False)
class FluxKontextModels:
    """The frozen components one job needs; ``None`` where a job does not need one."""

    transformer: Any
    """``FluxTransformer2DModel``; in training it carries an injected (zeroed) LoRA adapter."""
    vae: Any
    """``AutoencoderKL``, or None when the job reads latents from the cache."""
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    scheduler: Any


def load_flux_kontext(
    model_path: str | Path,
    weight_dtype: torch.dtype,
    device: str | torch.device = "cpu",
    *,
    devices: Mapping[str, str | torch.device] | None = None,
    include: Sequence[str] = ("transformer", "vae", "text_encoder", "text_encoder_2"),
    quantize: Mapping[str, str] | None = None,
) -> FluxKontextModels:
    """Load the components a job needs from a FLUX.1 Kontext folder; the rest stay ``None``.

    Tokenizers and the scheduler are always loaded (they are small).

    Args:
        device: default placement of every loaded component.
        devices: per-component placement overriding ``device`` (keys as in ``include``).
        include: which of transformer, vae, text_encoder, text_encoder_2 to load.
        quantize: {component: none / fp8 / nf4 / fp4} for the transformer and text encoders.
    """
    needed = [*include, "tokenizer", "tokenizer_2", "scheduler"]
    path = resolve_model_dir(str(model_path), needed, pipeline=PIPELINE)
    loaders = {
        "transformer": load_flux_kontext_transformer,
        "vae": load_flux_kontext_vae,
        "text_encoder": load_flux_kontext_clip,
        "text_encoder_2": load_flux_kontext_t5,
    }
    loaded = load_included(loaders, path, weight_dtype, include, device, devices, quantize)
    tok, tok2 = load_flux_kontext_tokenizers(path)
    return FluxKontextModels(
        transformer=loaded.get("transformer"),
        vae=loaded.get("vae"),
        text_encoder=loaded.get("text_encoder"),
        text_encoder_2=loaded.get("text_encoder_2"),
        tokenizer=tok,
        tokenizer_2=tok2,
        scheduler=load_flux_kontext_scheduler(path),
    )
