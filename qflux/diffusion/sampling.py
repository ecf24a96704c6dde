"""The flow-matching sampler the edit pipelines share: initial noise, the shifted Euler schedule,
the denoising loop and classifier-free guidance.

x_T ~ N(0, I) from torch.Generator('cpu').manual_seed(seed)
σ_i = linspace(1, 1/N, N), shifted by μ(image tokens) as the scheduler config says
x ← x + (σ_{i+1} − σ_i)·v̂(x, σ_i)          (FlowMatchEulerDiscreteScheduler.step)
CFG: v̂ = v̂_neg + s·(v̂_pos − v̂_neg)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from qflux.diffusion.flow import resolution_mu


def initial_noise(shape: tuple[int, ...], seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The pipelines' starting latents: drawn on the CPU from ``seed``, then moved to ``device``."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype).to(device)


def euler_scheduler(
    scheduler_config: Any, num_inference_steps: int, image_seq_len: int, device: torch.device, mu: float | None = None
) -> Any:
    """A fresh ``FlowMatchEulerDiscreteScheduler`` set to the pipelines' sigmas for an image of
    ``image_seq_len`` tokens; iterate ``.timesteps`` and call ``.step``. ``mu``: the shift's μ when
    the pipeline computes its own (FLUX.2's empirical one); by default the config's resolution μ.

    One step with a ``shift_terminal`` (Qwen-Image) would stretch [1] to 0/0: diffusers' pipelines
    return NaN there. A single step goes from σ = 1 to 0 without the stretch instead.
    """
    # deferred: diffusers is a heavy import
    from diffusers import FlowMatchEulerDiscreteScheduler

    overrides = {"shift_terminal": None} if num_inference_steps == 1 else {}
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config, **overrides)
    sc = scheduler.config
    if mu is None:
        mu = resolution_mu(
            image_seq_len,
            sc.get("base_image_seq_len", 256),
            sc.get("max_image_seq_len", 4096),
            sc.get("base_shift", 0.5),
            sc.get("max_shift", 1.15),
        )
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=device)
    scheduler.set_begin_index(0)
    return scheduler


def euler_denoise(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    scheduler_config: Any,
    num_inference_steps: int,
    image_seq_len: int,
    mu: float | None = None,
) -> torch.Tensor:
    """The pipelines' denoising loop: from x_T = ``noise``, one Euler step per timestep of
    :func:`euler_scheduler` (``mu`` as there).

        x ← x + (σ_{i+1} − σ_i)·v̂(x, t_i),   t_i = 1000·σ_i

    Args:
        velocity: (x, t) → v̂ in x's shape; x the current latents (any layout: a latent image or
            packed tokens), t the 0-d timestep on x's device.
        noise: x_T, on the device the loop runs on.
        image_seq_len: the image's token count (the schedule's resolution shift).

    Returns:
        x_0 in ``noise``'s layout (in v̂'s dtype after the first step, as the scheduler returns it).
    """
    scheduler = euler_scheduler(scheduler_config, num_inference_steps, image_seq_len, noise.device, mu=mu)
    latents = noise
    for t in scheduler.timesteps:
        latents = scheduler.step(velocity(latents, t), t, latents, return_dict=False)[0]
    return latents


def guided(positive: torch.Tensor, negative: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: v̂ = v̂_neg + s·(v̂_pos − v̂_neg) (any shapes that broadcast)."""
    return negative + scale * (positive - negative)


def cfg_batch(
    positive: Sequence[torch.Tensor], negative: Sequence[torch.Tensor] | None, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """A prompt's tensors on ``device``, each [1, ...]; with a ``negative`` prompt, [positive ; negative]
    [2, ...], so guidance evaluates both in one transformer call (split the output with ``v[:1]``, ``v[1:]``)."""
    if negative is None:
        return tuple(p.to(device) for p in positive)
    return tuple(torch.cat([p.to(device), n.to(device)]) for p, n in zip(positive, negative, strict=True))
