"""FLUX.2's inputs as its pipelines compute them: the prompt through the variant's text encoder (three
hidden-state layers stacked per token, :mod:`qflux.models.flux2.text`), the images through the VAE
(2×2-patchified latents normalised by the VAE's batch-norm statistics), and the 4-D positions
(T, H, W, L) of every token.

    h = [H_a ; H_b ; H_c] ∈ [B, L, 3D]         (the chat-templated, padded prompt)
    z = unpatchify((patchify(mode(E(x))) − μ_bn) / √(σ²_bn + ε))   [B, C, H/8, W/8]
    tokens = pack(z) [B, (h/2)(w/2), 4C]       (the pipeline's patchify-then-flatten, the same order)
    positions: text (0, 0, 0, l); target (0, i, j, 0); reference k (10·(k+1), i, j, 0)

Latents are kept on the VAE's own grid (normalised per patchified channel, then unpatchified), as
FLUX.1's are: buckets, masks and the σ shift then work on them as on FLUX.1's, and
:func:`qflux.diffusion.latents.pack_latents` makes exactly the pipeline's tokens.

The pipelines' own static helpers compute each piece (``Flux2Pipeline._patchify_latents``,
``_prepare_latent_ids``, ...; [klein]'s are copies of [dev]'s), so these are their numbers by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch

from qflux.models.flux2.text import TextEncoder


def _pipeline() -> Any:
    # deferred: diffusers is a heavy import
    from diffusers import Flux2Pipeline

    return Flux2Pipeline


@attrs.frozen(eq=False)
class PromptEmbeds:
    """A prompt as the transformer reads it."""

    tokens: torch.Tensor
    """h [B, L, 3D]."""
    ids: torch.Tensor
    """Token positions [B, L, 4]: (0, 0, 0, l)."""


@torch.no_grad()
def encode_prompt(
    encoder: TextEncoder, text_encoder: Any, tokenizer: Any, prompts: Sequence[str], max_sequence_length: int = 512
) -> PromptEmbeds:
    """The prompts through the chat template and the variant's ``encoder``, padded to ``max_sequence_length``
    tokens."""
    tokens = encoder.encode(text_encoder, tokenizer, prompts, max_sequence_length)
    return PromptEmbeds(tokens=tokens, ids=text_ids(tokens))


def text_ids(tokens: torch.Tensor) -> torch.Tensor:
    """Positions [B, L, 4] of prompt tokens [B, L, D]: (0, 0, 0, l)."""
    return _pipeline()._prepare_text_ids(tokens).to(tokens.device)


def bn_stats(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ_bn, √(σ²_bn + ε)) [1, 4C, 1, 1] of the VAE's batch norm, on ``like``'s device and dtype."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


@torch.no_grad()
def vae_encode(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [−1, 1] (H, W multiples of 16) → normalised latents [B, C, H/8, W/8]
    (the posterior's mode, normalised per patchified channel), in the VAE's dtype."""
    pipe = _pipeline()
    x = images.to(device=vae.device, dtype=vae.dtype)
    z = pipe._patchify_latents(vae.encode(x).latent_dist.mode())
    mean, std = bn_stats(vae, z)
    return pipe._unpatchify_latents((z - mean) / std)


@torch.no_grad()
def vae_decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B, C, h, w] → images [B, 3, 8h, 8w], roughly in [−1, 1]."""
    pipe = _pipeline()
    z = pipe._patchify_latents(latents.to(device=vae.device, dtype=vae.dtype))
    mean, std = bn_stats(vae, z)
    return vae.decode(pipe._unpatchify_latents(z * std + mean), return_dict=False)[0]


def target_ids(batch: int, hw: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Positions [B, (h/2)(w/2), 4] of the tokens of latents [B, C, h, w]: (0, i, j, 0)."""
    return _pipeline()._prepare_latent_ids(torch.empty(batch, 1, hw[0] // 2, hw[1] // 2, device="meta")).to(device)


def reference_ids(hws: Sequence[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """Positions [1, Σ (h/2)(w/2), 4] of the tokens of reference latents [1, C, h_k, w_k], reference k
    at T = 10·(k+1)."""
    grids = [torch.empty(1, 1, h // 2, w // 2, device="meta") for h, w in hws]
    return _pipeline()._prepare_image_ids(grids).to(device)
