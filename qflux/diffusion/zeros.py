"""Latents of zeros at a run's image sizes: the micro-batch the memory planner (:mod:`qflux.memory.planner`) runs a
step on is built from them (each family's ``plan.py``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from qflux.diffusion.latents import vae_scale_factor


def zero_latents(
    vae: Mapping[str, Any], channels: int, batch_size: int, target: tuple[int, int], controls: Sequence[tuple[int, int]]
) -> tuple[dict[str, Any], tuple[torch.Tensor, ...]]:
    """The flow-matching fields of a micro-batch of zeros and the latents of its control images.

    Args:
        vae: the VAE's config (its scale factor f, :func:`~qflux.diffusion.latents.vae_scale_factor`).
        channels: C, the VAE's latent channels.
        target: (w, h) of the target image; controls: (w_k, h_k) of each control image.

    Returns:
        (:class:`~qflux.diffusion.flow.FlowBatch`'s fields: latents and noise [B, C, h/f, w/f], σ = 0.5 [B];
        the controls' latents, one [B, C, h_k/f, w_k/f] each), float32.
    """
    f = vae_scale_factor(vae)

    def zeros(size: tuple[int, int]) -> torch.Tensor:
        w, h = size
        return torch.zeros(batch_size, channels, h // f, w // f)

    flow: dict[str, Any] = {"latents": zeros(target), "noise": zeros(target), "sigmas": torch.full((batch_size,), 0.5)}
    return flow, tuple(zeros(size) for size in controls)
