"""FLUX.2 [klein]'s inputs as the pipeline computes them: the prompt through Qwen3 (hidden states of
layers 9, 18 and 27 stacked per token), the images through the VAE (2×2-patchified latents
normalised by the VAE's batch-norm statistics), and the 4-D positions (T, H, W, L) of every token.

    h = [H₉ ; H₁₈ ; H₂₇] ∈ [B, L, 3D]          (the chat-templated, padded prompt)
    z = unpatchify((patchify(mode(E(x))) − μ_bn) / √(σ²_bn + ε))   [B, C, H/8, W/8]
    tokens = pack(z) [B, (h/2)(w/2), 4C]       (the pipeline's patchify-then-flatten, the same order)
    positions: text (0, 0, 0, l); target (0, i, j, 0); reference k (10·(k+1), i, j, 0)

Latents are kept on the VAE's own grid (normalised per patchified channel, then unpatchified), as
FLUX.1's are: buckets, masks and the σ shift then work on them as on FLUX.1's, and
:func:`qflux.diffusion.latents.pack_latents` makes exactly the pipeline's tokens.

The pipeline's own static helpers compute each piece (``Flux2KleinPipeline._get_qwen3_prompt_embeds``,
``_patchify_latents``, ``_prepare_latent_ids``, ...), so these are its numbers by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch

TEXT_LAYERS = (9, 18, 27)
"""The Qwen3 hidden states FLUX.2 [klein] reads (the pipeline's ``text_encoder_out_layers``)."""


def _pipeline() -> Any:
    # deferred: diffusers is a heavy import
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline


@attrs.frozen(eq=False)
class PromptEmbeds:
    """A prompt as the transformer reads it."""

    tokens: torch.Tensor
    """h [B, L, 3D]."""
    ids: torch.Tensor
    """Token positions [B, L, 4]: (0, 0, 0, l)."""


@torch.no_grad()
def encode_prompt(
    text_encoder: Any, tokenizer: Any, prompts: Sequence[str], max_sequence_length: int = 512
) -> PromptEmbeds:
    """The prompts through the chat template and Qwen3, padded to ``max_sequence_length`` tokens."""
    tokens = _pipeline()._get_qwen3_prompt_embeds(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        prompt=list(prompts),
        dtype=text_encoder.dtype,
        device=text_encoder.device,
        max_sequence_length=max_sequence_length,
        hidden_states_layers=TEXT_LAYERS,
    )
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
