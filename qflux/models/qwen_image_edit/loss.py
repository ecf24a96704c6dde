"""The Qwen-Image-Edit training objective as a pure function of (LoRA tensors, batch).

Per sample: the target latents are noised and packed, the packed control latents of each control
image are appended along the sequence, and the transformer (conditioned on the vision-language
prompt embedding) predicts a velocity for every token; the loss is over the target tokens only:

    x_t = (1 − σ)·x0 + σ·ε
    v̂ = F([pack(x_t) ; pack(c_1) ; … ; pack(c_k)], t = σ, text = h, img_shapes)[:, :N]
    loss = mean_b w(σ_b) · mean (v̂ − (ε − x0))²

Noising, target, weights and loss are :mod:`qflux.diffusion.flow`'s, shared with FLUX.1 Kontext.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch

from qflux.diffusion.flow import WeightingScheme, add_noise, flow_match_loss, flow_target, loss_weights
from qflux.diffusion.latents import pack_latents, unpack_latents
from qflux.lora.adapter import call_with_lora
from qflux.weights.dtypes import compute_dtype


@attrs.frozen(eq=False)
class QwenImageEditBatch:
    """Everything one training micro-batch needs, randomness included (drawn outside the step)."""

    latents: torch.Tensor
    """Target latents x0 [B, C, h, w] (float32, normalised by the VAE's mean and std)."""
    controls: tuple[torch.Tensor, ...]
    """Control latents, one [B, C, hc_k, wc_k] per control image (float32; zeros where dropped)."""
    embeds: torch.Tensor
    """Vision-language prompt embedding h [B, S, D]."""
    mask: torch.Tensor
    """[B, S] long: 1 for real tokens, 0 for padding."""
    noise: torch.Tensor
    """ε [B, C, h, w] (float32)."""
    sigmas: torch.Tensor
    """σ [B] (float32) in (0, 1]."""
    pixel: torch.Tensor | None = None
    """Per-latent-pixel loss weights [B, 1, h, w] (``train.loss_mask``), or None (all 1)."""


def img_shapes(
    batch: int, latent_hw: tuple[int, int], control_hws: Sequence[tuple[int, int]]
) -> list[list[tuple[int, int, int]]]:
    """The transformer's ``img_shapes``: per sample, (frames, h/2, w/2) of the target latents and of
    each control image's latents (the 2×2-packed token grids, in sequence order)."""
    shapes = [(1, h // 2, w // 2) for h, w in (latent_hw, *control_hws)]
    return [list(shapes) for _ in range(batch)]


def transformer_velocity(
    transformer: Any,
    params: Mapping[str, torch.Tensor],
    tokens: torch.Tensor,
    n: int,
    sigmas: torch.Tensor,
    embeds: torch.Tensor,
    mask: torch.Tensor | None,
    shapes: list[list[tuple[int, int, int]]],
    *,
    dtype: torch.dtype,
) -> torch.Tensor:
    """One QwenImage transformer call on [target ; control] tokens; the first ``n`` tokens' output.

    Args:
        params: LoRA tensors substituted into the module, ``{}`` for the module as it is.
        tokens: packed [B, N + Nc, 4C]; sigmas: [B]; embeds: [B, S, D]; mask: [B, S] or None.
        shapes: :func:`img_shapes`.
        dtype: the transformer's compute dtype (:func:`qflux.weights.dtypes.compute_dtype` walks the
            modules: read it once per loss function or denoising loop, not per call).

    Returns:
        [B, n, 4C] in the transformer's dtype.
    """
    inputs = {
        "hidden_states": tokens.to(dtype),
        "timestep": sigmas.to(dtype),
        "guidance": None,
        "encoder_hidden_states_mask": mask,
        "encoder_hidden_states": embeds.to(dtype),
        "img_shapes": shapes,
        "return_dict": False,
    }
    out = call_with_lora(transformer, params, inputs)[0]
    return out[:, :n]


def make_loss_fn(
    transformer: Any, *, weighting_scheme: WeightingScheme
) -> Callable[[Mapping[str, torch.Tensor], QwenImageEditBatch], torch.Tensor]:
    """Close over the frozen transformer and the weighting; return ``loss_fn(lora, batch)``.

    The returned function is pure: same (lora, batch) gives the same 0-d float32 loss.
    """
    dtype = compute_dtype(transformer)

    def loss_fn(lora: Mapping[str, torch.Tensor], batch: QwenImageEditBatch) -> torch.Tensor:
        x0, eps, sigmas = batch.latents, batch.noise, batch.sigmas
        b, _, h, w = x0.shape
        noisy = pack_latents(add_noise(x0, eps, sigmas))
        tokens = torch.cat([noisy, *(pack_latents(c.to(noisy.dtype)) for c in batch.controls)], dim=1)
        shapes = img_shapes(b, (h, w), [(c.shape[-2], c.shape[-1]) for c in batch.controls])
        n = noisy.shape[1]
        out = transformer_velocity(transformer, lora, tokens, n, sigmas, batch.embeds, batch.mask, shapes, dtype=dtype)
        pred = unpack_latents(out, h, w)
        return flow_match_loss(pred, flow_target(x0, eps), loss_weights(weighting_scheme, sigmas), batch.pixel)

    return loss_fn
