"""Rectified-flow training maths: timestep sampling, noising and the flow-matching loss.

Conventions (FLUX, SD3): σ ∈ (0, 1], σ = 1 is pure noise.
    x_t = (1 − σ)·x0 + σ·ε        velocity target v = ε − x0
    loss = mean_b mean_i  w(σ_b) · (v̂ − v)²
The sampling densities and weightings are diffusers' own (``diffusers.training_utils``), so a run
matches ``train_dreambooth_lora_flux_kontext.py`` draw for draw.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import attrs
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from qflux.data.masks import masked_mean

WeightingScheme = Literal["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"]


@attrs.frozen(eq=False, kw_only=True)
class FlowBatch:
    """The flow-matching part of a training micro-batch, randomness included (drawn outside the step).

    Each model's batch record extends it with its conditioning fields (keyword-only, so a record's
    own required fields may follow ``pixel``'s default).
    """

    latents: torch.Tensor
    """Target latents x0 [B, C, h, w] (float32)."""
    noise: torch.Tensor
    """ε [B, C, h, w] (float32)."""
    sigmas: torch.Tensor
    """σ [B] (float32) in (0, 1]."""
    pixel: torch.Tensor | None = None
    """Per-latent-pixel loss weights [B, 1, h, w] (``train.loss_mask``), or None (all 1)."""


def sample_u(
    scheme: WeightingScheme,
    batch_size: int,
    *,
    logit_mean: float,
    logit_std: float,
    mode_scale: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Draw u ∈ [0, 1) from the scheme's timestep density (uniform for none/cosmap/sigma_sqrt).

    Returns:
        [batch_size] float32.
    """
    return compute_density_for_timestep_sampling(
        weighting_scheme=scheme,
        batch_size=batch_size,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        generator=generator,
    )


def sigmas_from_u(u: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Map u to the scheduler's discrete training sigmas, as the diffusers scripts do.

    index = ⌊u·N⌋, timestep = N − index, σ = timestep / N ∈ {1/N, …, 1}.

    Args:
        u: [B] in [0, 1).

    Returns:
        [B] float32 sigmas.
    """
    index = (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    return (num_train_timesteps - index).float() / num_train_timesteps


def resolution_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent shift μ, linear in the number of image tokens."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def time_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """Exponential time shift: σ' = e^μ / (e^μ + (1/σ − 1)). σ' = σ at μ = 0; endpoints are fixed."""
    e = math.exp(mu)
    return e / (e + (1.0 / sigmas - 1.0))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − σ)·x0 + σ·ε.

    Args:
        x0: clean latents [B, ...].
        noise: ε, same shape.
        sigmas: [B].
    """
    s = sigmas.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the model learns: v = ε − x0 (same shape as x0)."""
    return noise - x0


def loss_weights(scheme: WeightingScheme, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights w(σ): 1 (none, logit_normal, mode), σ⁻² (sigma_sqrt), 2/(π(1−2σ+2σ²)) (cosmap).

    Returns:
        [B] float32.
    """
    return compute_loss_weighting_for_sd3(scheme, sigmas).float()


def flow_match_loss(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, pixel: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted flow-matching MSE, as diffusers' scripts compute it.

    loss = mean_b ( mean_i w_b · (pred_bi − target_bi)² ), in float32; with per-pixel weights p
    (:mod:`qflux.data.masks`): mean_b w_b · Σ_i p_bi (pred − target)²_bi / Σ_i p_bi.

    Args:
        pred: predicted velocity [B, C, h, w] (or [B, ...] without ``pixel``).
        target: ε − x0, same shape.
        weights: [B].
        pixel: per-latent-pixel weights [B, 1, h, w], or None (all 1).

    Returns:
        0-d float32 tensor.
    """
    b = pred.shape[0]
    sq = (pred.float() - target.float()) ** 2
    if pixel is not None:
        return (weights.float() * masked_mean(sq, pixel)).mean()
    w = weights.float().view(b, *([1] * (pred.ndim - 1)))
    return (w * sq).reshape(b, -1).mean(1).mean()


def flow_loss(
    velocity: Callable[[torch.Tensor], torch.Tensor], batch: FlowBatch, weighting_scheme: WeightingScheme
) -> torch.Tensor:
    """The training objective of every model, given its velocity at the noised latents.

        x_t = (1 − σ)·x0 + σ·ε;   loss = mean_b w(σ_b) · mean (v̂(x_t) − (ε − x0))²   (:func:`flow_match_loss`)

    Args:
        velocity: x_t [B, C, h, w] → v̂ [B, C, h, w]: the model on the batch's conditioning (and LoRA).
        batch: x0, ε, σ and the optional per-pixel weights.

    Returns:
        0-d float32 tensor.
    """
    x0, eps, sigmas = batch.latents, batch.noise, batch.sigmas
    pred = velocity(add_noise(x0, eps, sigmas))
    return flow_match_loss(pred, flow_target(x0, eps), loss_weights(weighting_scheme, sigmas), batch.pixel)
