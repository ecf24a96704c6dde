"""Where an edit happens: change masks and the per-pixel loss weights they give.

A mask m ∈ [0, 1] per latent pixel (1 where the edit happens) weights the flow-matching error:

    p = u + (1 − u)·m                    u = ``train.unmasked_weight`` (the weight outside the mask)
    loss = mean_b  w(σ_b) · Σ_{c,y,x} p_byx (v̂ − v)²_bcyx / (C · Σ_{y,x} p_byx)

With u = 1, or m ≡ 1, p ≡ 1 and the loss is the plain mean of :func:`qflux.diffusion.flow.flow_match_loss`.

``train.loss_mask: auto`` derives m from the pair itself (:func:`change_mask`): the mean absolute
difference of target and control over colour channels, area-averaged to the latent grid,
smoothed (3×3 mean), dilated (3×3 max), and mapped to [0, 1] by ``|Δ| / CHANGE_LEVEL``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHANGE_LEVEL = 0.1
"""Mean |target − control| (images in [−1, 1]) at which a latent pixel counts as fully changed:
5% of the range, above JPEG noise (≈ 0.02) and below any visible edit."""


def pixel_weights(mask: torch.Tensor, unmasked_weight: float) -> torch.Tensor:
    """p = u + (1 − u)·m for mask [B, 1, h, w] in [0, 1]; same shape, float32."""
    return unmasked_weight + (1.0 - unmasked_weight) * mask.float()


def change_mask(control: torch.Tensor, target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The soft change mask of a pair at latent size ``size`` (h, w).

    Args:
        control: [B, 3, H, W] in [−1, 1], the (first) control image at the target's size.
        target: [B, 3, H, W] in [−1, 1].

    Returns:
        [B, 1, h, w] float32 in [0, 1].
    """
    diff = (target.float() - control.float()).abs().mean(1, keepdim=True)
    diff = F.adaptive_avg_pool2d(diff, size)
    diff = F.avg_pool2d(diff, 3, stride=1, padding=1, count_include_pad=False)
    diff = F.max_pool2d(diff, 3, stride=1, padding=1)
    return (diff / CHANGE_LEVEL).clamp(0.0, 1.0)


def to_latent_grid(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask [B, 1, H, W] in [0, 1] area-averaged to the latent grid [B, 1, h, w]."""
    return F.adaptive_avg_pool2d(mask.float(), size).clamp(0.0, 1.0)


def masked_mean(error: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ p·e / Σ p per sample, for error [B, C, h, w] and pixel weights [B, 1, h, w]; [B] float32."""
    b = error.shape[0]
    p = weights.float().expand_as(error)
    return (p * error).reshape(b, -1).sum(1) / p.reshape(b, -1).sum(1).clamp_min(1e-12)


def region_psnr(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """PSNR of images a, b [3, H, W] in [0, 1] over a soft region [1, H, W]:

        mse = Σ_{c,y,x} m_yx (a − b)²_cyx / (3 · Σ m),    psnr = 10 · log10(1 / mse)  (dB)

    0-d float32; nan when the region is empty."""
    total = weights.sum() * a.shape[0]
    mse = (weights * (a.float() - b.float()) ** 2).sum() / total
    return torch.where(total > 0, 10 * torch.log10(1 / mse.clamp_min(1e-10)), torch.tensor(float("nan")))


def edit_psnr(
    prediction: torch.Tensor, control: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """How well an edit did, for images [3, H, W] in [0, 1] and the pair's change mask [1, H, W]:
    (PSNR of prediction against target inside the mask, PSNR of prediction against control outside
    it: preservation), in dB."""
    return region_psnr(prediction, target, mask), region_psnr(prediction, control, 1 - mask)


def pixel_change_mask(control: torch.Tensor, target: torch.Tensor, factor: int) -> torch.Tensor:
    """:func:`change_mask` of images [3, H, W] in [−1, 1] on a grid ``factor`` times coarser, back at
    [1, H, W] (nearest): the region the validation metrics compare."""
    h, w = target.shape[-2:]
    grid = change_mask(control[None], target[None], (max(1, h // factor), max(1, w // factor)))
    return F.interpolate(grid, size=(h, w), mode="nearest")[0]
