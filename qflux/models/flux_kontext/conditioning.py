"""FLUX.1 Kontext conditioning: prompt embeddings (CLIP + T5) and VAE latents.

These run without gradients, once per sample (or once per cache entry); they are the same
computations as ``FluxKontextPipeline.encode_prompt`` and ``_encode_vae_image``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch

from qflux.weights.dtypes import compute_dtype

if TYPE_CHECKING:
    from qflux.models.flux_kontext.loaders import FluxKontextModels


T5_LENGTH = 512
"""FLUX.1's T5 prompt length, and the most ``model.max_sequence_length`` may be."""


def text_length(configured: int | None, folder: str | Path | None) -> int:
    """The T5 prompt length S: ``model.max_sequence_length`` when set, else the model folder's T5 tokenizer's
    ``model_max_length`` (FLUX.1 Kontext: 512; the toy model: 32), at most :data:`T5_LENGTH` (512 when the folder
    is not known or has no tokenizer config)."""
    if configured is not None:
        return configured
    path = None if folder is None else Path(folder) / "tokenizer_2" / "tokenizer_config.json"
    if path is None or not path.is_file():
        return T5_LENGTH
    return int(min(json.loads(path.read_text(encoding="utf-8")).get("model_max_length", T5_LENGTH), T5_LENGTH))


def long_prompts(tokenizer: Any, prompts: Sequence[tuple[str, str]], length: int) -> list[tuple[str, int]]:
    """(name, T5 tokens) of each named prompt longer than ``length`` tokens, its end included: T5 reads only the
    first ``length``, so the rest of the instruction is lost."""
    counts = [(name, len(tokenizer(text).input_ids)) for name, text in prompts]
    return [(name, n) for name, n in counts if n > length]


@attrs.frozen(eq=False)
class PromptEmbeds:
    """A batch of encoded prompts."""

    pooled: torch.Tensor
    """CLIP pooled output [B, P] (P = 768 for FLUX.1)."""
    tokens: torch.Tensor
    """T5 last hidden state [B, S, D] (S = max_sequence_length, D = 4096 for FLUX.1)."""


@torch.no_grad()
def encode_prompt(
    prompts: Sequence[str],
    *,
    tokenizer: Any,
    text_encoder: Any,
    tokenizer_2: Any,
    text_encoder_2: Any,
    max_sequence_length: int = 512,
) -> PromptEmbeds:
    """Encode prompts as FLUX does: CLIP pooled vector plus the T5 token sequence.

    CLIP sees at most ``tokenizer.model_max_length`` (77) tokens; T5 is padded or truncated to
    ``max_sequence_length``. Outputs are in each encoder's dtype, on each encoder's device.

    Args:
        prompts: B strings.

    Returns:
        pooled [B, P] and tokens [B, S, D].
    """
    prompts = list(prompts)
    clip_ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    pooled = text_encoder(clip_ids.to(text_encoder.device), output_hidden_states=False).pooler_output
    t5_ids = tokenizer_2(
        prompts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
    ).input_ids
    tokens = text_encoder_2(t5_ids.to(text_encoder_2.device), output_hidden_states=False)[0]
    return PromptEmbeds(pooled=pooled.to(compute_dtype(text_encoder)), tokens=tokens.to(compute_dtype(text_encoder_2)))


def encode_prompt_with(models: FluxKontextModels, prompts: Sequence[str], max_sequence_length: int) -> PromptEmbeds:
    """:func:`encode_prompt` with the tokenizers and encoders of ``models``."""
    return encode_prompt(
        prompts,
        tokenizer=models.tokenizer,
        text_encoder=models.text_encoder,
        tokenizer_2=models.tokenizer_2,
        text_encoder_2=models.text_encoder_2,
        max_sequence_length=max_sequence_length,
    )


@torch.no_grad()
def vae_encode(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """Images to normalised latents, deterministically (the posterior's mode).

    z = (mode(E(x)) − shift_factor) · scaling_factor

    Args:
        images: [B, 3, H, W] in [−1, 1], H and W multiples of 16.

    Returns:
        [B, C, H/8, W/8] in the VAE's dtype.
    """
    x = images.to(device=vae.device, dtype=vae.dtype)
    z = vae.encode(x).latent_dist.mode()
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


@torch.no_grad()
def vae_decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents to images: x = D(z / scaling_factor + shift_factor).

    Args:
        latents: [B, C, h, w].

    Returns:
        [B, 3, 8h, 8w], roughly in [−1, 1].
    """
    z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(z, return_dict=False)[0]
