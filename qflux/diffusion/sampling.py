"""The flow-matching sampler both edit pipelines share: initial noise and the shifted Euler schedule.

x_T ~ N(0, I) from torch.Generator('cpu').manual_seed(seed)
σ_i = linspace(1, 1/N, N), shifted by μ(image tokens) as the scheduler config says
x ← x + (σ_{i+1} − σ_i)·v̂(x, σ_i)          (FlowMatchEulerDiscreteScheduler.step)
"""

from __future__ import annotations

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
