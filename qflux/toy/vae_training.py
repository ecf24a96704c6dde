"""Training a toy model's VAE on the toy world: reconstruction of random scenes, any diffusers VAE.

    loss = mean |x̂ − x| + mean (x̂ − x)² + β · KL(q(z|x) ‖ N(0, I))      (x, x̂ in [−1, 1]; β small)

The scenes are drawn from a seeded generator, a fresh batch each step (the world is unlimited); held-out
scenes come from another seed. After training, the latents' mean and standard deviation over scenes give
the config's ``shift_factor`` and ``scaling_factor`` (z ↦ (z − shift) · scale has mean 0, std 1), as
the family's encode and decode read them. Nothing here names a model family: the family's toy builder
makes the VAE, this trains it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs
import numpy as np
import torch

from qflux.data.masks import region_psnr
from qflux.optim.schedules import lr_multiplier
from qflux.toy.world import random_scene, render


def scene_batch(rng: np.random.Generator, n: int, size: int) -> torch.Tensor:
    """``n`` random scenes as images [n, 3, size, size] in [−1, 1] (float32)."""
    arrays = [np.asarray(render(random_scene(rng, size)), dtype=np.float32) for _ in range(n)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of image batches [n, 3, H, W] in [−1, 1] over every pixel (:func:`qflux.data.masks.region_psnr`
    of the images in [0, 1], laid side by side)."""
    pred, ref = (((x.clamp(-1, 1) + 1) / 2).permute(1, 0, 2, 3).flatten(1, 2) for x in (a, b))  # [3, n·H, W]
    return float(region_psnr(pred, ref, torch.ones_like(ref[:1])))


@attrs.frozen
class VaeSettings:
    """How the toy VAE trains."""

    steps: int = 1500
    batch_size: int = 16
    lr: float = 1e-3
    """Peak AdamW learning rate, cosine-decayed to 5% of it over ``steps`` after 50 warm-up steps."""
    kl_weight: float = 1e-6
    """β."""
    seed: int = 0
    size: int = 64


def toy_lr(peak: float, step: int, steps: int, warmup: int) -> float:
    """The toy trainers' schedule: lr(step) = peak · min(1, (step + 1) / warmup) · (0.05 + 0.95 · c(step)), with c the
    half-cosine from 1 to 0 over ``steps`` (:func:`qflux.optim.schedules.lr_multiplier`)."""
    cosine = lr_multiplier(step, kind="cosine", warmup_steps=0, total_steps=steps)
    return peak * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * cosine)


def train_vae(vae: Any, settings: VaeSettings, progress: Callable[[Iterable[int]], Iterable[int]] = iter,
              log: Callable[[int, float], None] = lambda step, loss: None) -> None:  # fmt: skip
    """Train ``vae`` (a diffusers VAE: ``encode(x).latent_dist``, ``decode(z).sample``) in place on scenes."""
    rng = np.random.default_rng(settings.seed)
    noise = torch.Generator().manual_seed(settings.seed)  # the posterior's samples
    opt = torch.optim.AdamW(vae.parameters(), lr=settings.lr, weight_decay=0.0)
    vae.train()
    for step in progress(range(settings.steps)):
        for group in opt.param_groups:
            group["lr"] = toy_lr(settings.lr, step, settings.steps, warmup=50)
        x = scene_batch(rng, settings.batch_size, settings.size)
        posterior = vae.encode(x).latent_dist
        x_hat = vae.decode(posterior.sample(generator=noise)).sample
        loss = (x_hat - x).abs().mean() + ((x_hat - x) ** 2).mean() + settings.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        log(step, loss.item())
    vae.eval()


@torch.no_grad()
def latent_statistics(vae: Any, seed: int, n: int = 256, size: int = 64) -> tuple[float, float]:
    """(mean, std) of the posterior modes of ``n`` scenes: the config's shift_factor and 1 / scaling_factor."""
    z = vae.encode(scene_batch(np.random.default_rng(seed), n, size)).latent_dist.mode()
    return float(z.mean()), float(z.std())


@torch.no_grad()
def reconstruction_psnr(vae: Any, seed: int, n: int = 64, size: int = 64) -> float:
    """PSNR of decode(mode(encode(x))) against x over ``n`` held-out scenes (``seed``)."""
    x = scene_batch(np.random.default_rng(seed), n, size)
    return psnr(vae.decode(vae.encode(x).latent_dist.mode()).sample, x)
