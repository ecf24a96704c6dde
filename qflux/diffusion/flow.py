"""Rectified-flow training maths: timestep sampling, noising and the flow-matching objective.

Conventions (FLUX, SD3): σ ∈ (0, 1], σ = 1 is pure noise.
    x_t = (1 − σ)·x0 + σ·ε        velocity target v = ε − x0
    loss = mean_b mean_i  w(σ_b) · ℓ(v̂ − v)          ℓ(d) = d² (mse), huber or pseudo-huber
plus, with a change mask, per-pixel weights, and the preservation terms that pull the LoRA's prediction to
the base model's (:func:`flow_loss`). The sampling densities and weightings are diffusers' own
(``diffusers.training_utils``), so the default run (uniform σ, mse) matches
``train_dreambooth_lora_flux_kontext.py`` draw for draw.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from qflux.config.schema import TrainConfig
from qflux.data.masks import masked_mean, pixel_weights

WeightingScheme = Literal["none", "cosmap", "sigma_sqrt"]
TimestepSampling = Literal["uniform", "logit_normal", "mode", "shift", "resolution_shift"]
DENSITY = {"uniform": "none", "logit_normal": "logit_normal", "mode": "mode", "shift": "logit_normal",
           "resolution_shift": "logit_normal"}  # fmt: skip
"""Each sampler's density of u (diffusers' ``compute_density_for_timestep_sampling`` names; 'none' is uniform);
the shift samplers then move σ (:func:`shifted_sigmas`)."""


@attrs.frozen(eq=False, kw_only=True)
class FlowBatch:
    """The flow-matching part of a training micro-batch, randomness included (drawn outside the step).

    Each model's batch record extends it with its conditioning fields (keyword-only, so a record's
    own required fields may follow ``change``'s default).
    """

    latents: torch.Tensor
    """Target latents x0 [B, C, h, w] (float32)."""
    noise: torch.Tensor
    """ε [B, C, h, w] (float32)."""
    sigmas: torch.Tensor
    """σ [B] (float32) in (0, 1]."""
    change: torch.Tensor | None = None
    """The change mask m [B, 1, h, w] in [0, 1] (``train.loss_mask``: 1 where the edit happens), or None
    (the loss weighs every latent pixel alike)."""
    preserve: Mapping[str, torch.Tensor] | None = None
    """The preserve prompt's tensors (``train.preserve_prompt``), batch first, under the names of the model's
    prompt tensors (:attr:`qflux.train.batch.Conditioning.text`), or None."""
    route: torch.Tensor | None = None
    """The target tokens' routing scores s [N] (``train.route``: :mod:`qflux.diffusion.routing`), or None: every
    token goes through every block."""


def sample_u(
    sampling: TimestepSampling,
    batch_size: int,
    *,
    logit_mean: float,
    logit_std: float,
    mode_scale: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Draw u ∈ [0, 1) from the sampler's density (:data:`DENSITY`), from ``generator`` alone.

    Returns:
        [batch_size] float32.
    """
    return compute_density_for_timestep_sampling(
        weighting_scheme=DENSITY[sampling],
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


def shifted_sigmas(
    sampling: TimestepSampling, sigmas: torch.Tensor, *, shift: float = 1.0, mu: float = 0.0
) -> torch.Tensor:
    """σ after the sampler's shift: 'shift' σ' = s·σ / (1 + (s − 1)·σ) (:func:`time_shift` at μ = ln s),
    'resolution_shift' :func:`time_shift` at ``mu``, the others σ as it is. Endpoints stay fixed; σ' ≥ σ
    exactly when s ≥ 1 (μ ≥ 0)."""
    if sampling == "shift":
        return time_shift(sigmas, math.log(shift))
    if sampling == "resolution_shift":
        return time_shift(sigmas, mu)
    return sigmas


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


LossKind = Literal["mse", "huber", "pseudo_huber"]
LOSS_KINDS = ("mse", "huber", "pseudo_huber")
Preserve = Literal["none", "base"]


@attrs.frozen
class Objective:
    """What the training loss compares and how: the ``train`` keys of the objective, read once."""

    weighting_scheme: WeightingScheme = "none"
    """The per-sample weight w(σ) (:func:`loss_weights`)."""
    loss: LossKind = "mse"
    """The per-element error ℓ(d) of d = v̂ − v (:func:`elementwise_loss`)."""
    huber_c: float = 0.1
    """c of huber and pseudo_huber (the error size where ℓ turns from quadratic to linear)."""
    unmasked_weight: float = 1.0
    """u, the data term's weight outside the change mask: p = u + (1 − u)·m."""
    preserve: Preserve = "none"
    """'base': outside the change mask, pull the LoRA's prediction to the base model's (:func:`preservation_loss`)."""
    preserve_weight: float = 1.0
    """λ of the preservation term."""

    @classmethod
    def from_config(cls, train: TrainConfig) -> Objective:
        """The objective the ``train`` section configures."""
        return cls(train.weighting_scheme, train.loss, train.huber_c, train.unmasked_weight, train.preserve,
                   train.preserve_weight)  # fmt: skip


MSE = Objective()
"""The plain objective: unweighted mean squared error, no mask, no preservation (diffusers' scripts)."""


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, kind: LossKind = "mse", c: float = 0.1) -> torch.Tensor:
    """ℓ(d) per element of d = pred − target, in float32 (same shape). Each is 0 at d = 0 and → d² as c → ∞:

    mse:           ℓ = d²
    huber:         ℓ = d²                 |d| ≤ c
                   ℓ = 2c·|d| − c²        |d| > c       (2 × torch's huber_loss with δ = c)
    pseudo_huber:  ℓ = 2c²·(√(1 + (d/c)²) − 1)          (smooth; diffusers' and SimpleTuner's "huber")
    """
    d = pred.float() - target.float()
    if kind == "mse":
        return d * d
    if kind == "huber":
        return 2.0 * F.huber_loss(d, torch.zeros_like(d), reduction="none", delta=c)
    if kind == "pseudo_huber":
        # 2c²(√(1 + x) − 1) = 2c²·x / (√(1 + x) + 1) with x = (d/c)²: no cancellation at large c
        return 2.0 * d * d / (torch.sqrt(1.0 + (d / c) ** 2) + 1.0)
    raise ValueError(f"unknown loss kind {kind!r}; one of {', '.join(LOSS_KINDS)}")


def flow_match_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    pixel: torch.Tensor | None = None,
    kind: LossKind = "mse",
    c: float = 0.1,
) -> torch.Tensor:
    """Weighted flow-matching loss; with ``kind='mse'`` and no pixel weights exactly diffusers' scripts.

    loss = mean_b ( w_b · mean_i ℓ(pred_bi − target_bi) ), in float32; with per-pixel weights p
    (:mod:`qflux.data.masks`): mean_b w_b · Σ_i p_bi ℓ_bi / Σ_i p_bi.

    Args:
        pred: predicted velocity [B, C, h, w] (or [B, ...] without ``pixel``).
        target: ε − x0, same shape.
        weights: [B].
        pixel: per-latent-pixel weights [B, 1, h, w], or None (all 1).
        kind, c: the elementwise error ℓ (:func:`elementwise_loss`).

    Returns:
        0-d float32 tensor.
    """
    b = pred.shape[0]
    err = elementwise_loss(pred, target, kind, c)
    if pixel is not None:
        return (weights.float() * masked_mean(err, pixel)).mean()
    w = weights.float().view(b, *([1] * (pred.ndim - 1)))
    return (w * err).reshape(b, -1).mean(1).mean()


def preservation_loss(
    pred: torch.Tensor,
    base: torch.Tensor,
    weights: torch.Tensor,
    keep: torch.Tensor,
    kind: LossKind = "mse",
    c: float = 0.1,
) -> torch.Tensor:
    """How far the LoRA's prediction strays from the base model's where nothing should change:

        loss = mean_b w_b · mean_{c,y,x} k_byx · ℓ(v̂ − v̂_base)_bcyx          k = λ·(1 − m)

    (ai-toolkit's ``inverted_mask_prior`` normalisation: a mean over every element, so λ = 1 weighs an
    unchanged element as the data term weighs one at p = 1).

    Args:
        pred: the LoRA's velocity v̂ [B, C, h, w].
        base: the base model's velocity on the same input, same shape (no gradient).
        weights: w(σ) [B].
        keep: k [B, 1, h, w], ≥ 0.
        kind, c: the elementwise error ℓ (:func:`elementwise_loss`).

    Returns:
        0-d float32 tensor; 0 where pred = base or k = 0.
    """
    b = pred.shape[0]
    err = keep.float() * elementwise_loss(pred, base, kind, c)
    return (weights.float() * err.reshape(b, -1).mean(1)).mean()


Velocity = Callable[[Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]
"""``(adapter tensors, x_t [B, C, h, w]) → v̂ [B, C, h, w]``: a model on a batch's conditioning."""


def flow_loss(
    velocity: Velocity,
    lora: Mapping[str, torch.Tensor],
    batch: FlowBatch,
    objective: Objective,
    base: Mapping[str, torch.Tensor] | None = None,
    keep: Velocity | None = None,
) -> torch.Tensor:
    """The training objective of every model, given its velocity at the noised latents.

        x_t = (1 − σ)·x0 + σ·ε
        loss = mean_b w(σ_b) · Σ p·ℓ(v̂(x_t) − (ε − x0)) / Σ p           (:func:`flow_match_loss`)
             + [preserve: base]  mean_b w(σ_b) · mean λ(1 − m)·ℓ(v̂(x_t) − v̂_base(x_t))   (:func:`preservation_loss`)
             + [preserve_prompt] mean_b w(σ_b) · mean λ·ℓ(v̂_P(x_t) − v̂_base,P(x_t))

    with p = u + (1 − u)·m from the change mask m (p ≡ 1 without one); v̂_P is the model on the preserve
    prompt P instead of the instruction, same x_t, σ and controls.

    Args:
        velocity: the model on the batch's conditioning, with the given adapter tensors.
        lora: the adapter tensors being trained.
        batch: x0, ε, σ and the optional change mask.
        base: adapter tensors that make ΔW = 0 (:func:`qflux.lora.adapter.base_adapter`), for the base
            model's predictions; needed with ``objective.preserve: base`` or ``keep``.
        keep: the model on the preserve prompt (``train.preserve_prompt``), or None.

    Returns:
        0-d float32 tensor.
    """
    x0, eps, sigmas, m = batch.latents, batch.noise, batch.sigmas, batch.change
    noisy = add_noise(x0, eps, sigmas)
    pred = velocity(lora, noisy)
    w = loss_weights(objective.weighting_scheme, sigmas)
    pixel = None if m is None else pixel_weights(m, objective.unmasked_weight)
    loss = flow_match_loss(pred, flow_target(x0, eps), w, pixel, objective.loss, objective.huber_c)
    lam, kind, c = objective.preserve_weight, objective.loss, objective.huber_c
    if objective.preserve == "base":
        if m is None or base is None:
            raise ValueError("preserve: base needs the batch's change mask and the base adapter tensors")
        with torch.no_grad():
            prior = velocity(base, noisy)
        loss = loss + preservation_loss(pred, prior, w, lam * (1.0 - m.float()), kind, c)
    if keep is not None:
        if base is None:
            raise ValueError("a preserve prompt needs the base adapter tensors")
        with torch.no_grad():
            prior = keep(base, noisy)
        everywhere = torch.full_like(noisy[:, :1], lam, dtype=torch.float32)
        loss = loss + preservation_loss(keep(lora, noisy), prior, w, everywhere, kind, c)
    return loss
