"""2×2 latent packing, the 3-axis position ids of Flux-style transformers and their forward's inputs.

A latent image [B, C, h, w] becomes a token sequence [B, (h/2)·(w/2), 4C]: each token is one
2×2 patch, channels-major inside the patch (the layout of diffusers' ``_pack_latents``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

PATCH = 2
"""Latent pixels per token along each side (the 2×2 packing)."""


def vae_scale_factor(vae_config: Mapping[str, Any]) -> int:
    """Image pixels per latent pixel along each side, from the VAE's config as the diffusers
    pipelines compute it: 2^len(temperal_downsample) for the QwenImage VAE, 2^(len(block_out_channels) − 1)
    for ``AutoencoderKL`` (8 for FLUX.1 and Qwen-Image)."""
    if "temperal_downsample" in vae_config:
        return int(2 ** len(vae_config["temperal_downsample"]))
    return int(2 ** (len(vae_config["block_out_channels"]) - 1))


def size_multiple(vae_config: Mapping[str, Any]) -> int:
    """What image sides must be a multiple of: the VAE factor × the 2×2 packing (16 for FLUX.1)."""
    return PATCH * vae_scale_factor(vae_config)


def latent_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """(h, w) of the latents of an image of height × width floored to multiples of ``multiple``
    (:func:`size_multiple`): h = 2·⌊height / multiple⌋, w = 2·⌊width / multiple⌋ (the VAE factor is
    ``multiple`` / 2)."""
    return PATCH * (height // multiple), PATCH * (width // multiple)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Pack 2×2 patches into tokens.

    Args:
        latents: [B, C, h, w] with h and w even.

    Returns:
        [B, (h/2)·(w/2), 4C]; token (i, j) holds latents[:, c, 2i + di, 2j + dj] at index 4c + 2di + dj.
    """
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2)
    x = x.permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`.

    Args:
        tokens: [B, (h/2)·(w/2), 4C].
        height: latent height h (even).
        width: latent width w (even).

    Returns:
        [B, C, h, w].
    """
    b, _, ch = tokens.shape
    x = tokens.view(b, height // 2, width // 2, ch // 4, 2, 2)
    x = x.permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch // 4, height, width)


def pack_sequence(target: torch.Tensor, controls: Sequence[torch.Tensor]) -> torch.Tensor:
    """The transformer's image sequence [pack(x) ; pack(c_1) ; … ; pack(c_k)]: [B, N + Σ N_k, 4C], the
    target's N tokens first.

    Args:
        target: x [B, C, h, w]; controls: c_k [B, C, h_k, w_k] each, cast to x's dtype.
    """
    return torch.cat([pack_latents(target), *(pack_latents(c.to(target.dtype)) for c in controls)], dim=1)


def latent_image_ids(height: int, width: int, index: int = 0) -> torch.Tensor:
    """Position ids of a packed latent image: (index, row, column) per token.

    Kontext puts the target at index 0 and the control image at index 1, so RoPE separates the
    two images on the first axis while rows and columns line up.

    Args:
        height: latent height h (tokens are h/2 rows).
        width: latent width w (tokens are w/2 columns).
        index: value of the first axis for every token.

    Returns:
        [(h/2)·(w/2), 3] float32.
    """
    rows, cols = height // 2, width // 2
    ids = torch.zeros(rows, cols, 3)
    ids[..., 0] = float(index)
    ids[..., 1] = torch.arange(rows)[:, None].float()
    ids[..., 2] = torch.arange(cols)[None, :].float()
    return ids.reshape(rows * cols, 3)


def transformer_inputs(
    tokens: torch.Tensor, sigmas: torch.Tensor, text: torch.Tensor, dtype: torch.dtype, **conditioning: Any
) -> dict[str, Any]:
    """The keyword inputs of a diffusers flow transformer's forward (``FluxTransformer2DModel``,
    ``QwenImageTransformer2DModel``, ``Flux2Transformer2DModel``), output as a tuple.

    Args:
        tokens: the image sequence [B, N, 4C] (:func:`pack_sequence`); sigmas: σ [B], the timestep
            input (diffusers passes t / 1000 = σ); text: the prompt embedding [B, S, D]. All three
            are cast to ``dtype``, the transformer's compute dtype.
        conditioning: the model's other inputs (positions, masks, a guidance value: none by default).
    """
    return {
        "hidden_states": tokens.to(dtype),
        "timestep": sigmas.to(dtype),
        "encoder_hidden_states": text.to(dtype),
        "guidance": None,
        **conditioning,
        "return_dict": False,
    }
