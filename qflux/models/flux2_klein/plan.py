"""What the memory planner (:mod:`qflux.memory.planner`) needs of FLUX.2 [klein]: a micro-batch of the run's
shapes and the training loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from qflux.diffusion.latents import vae_scale_factor
from qflux.memory.planner import Inputs, PlanModel
from qflux.models.flux2_klein.loaders import ENCODERS, FLUX2_KLEIN
from qflux.models.flux2_klein.loss import Flux2KleinBatch, make_loss_fn


def fake_batch(configs: Mapping[str, Mapping[str, Any]], inputs: Inputs, dtype: torch.dtype) -> Flux2KleinBatch:
    """A micro-batch of zeros: latents [B, C, H/f, W/f] of the target and each reference, the prompt's
    tokens [B, L, 3D] and positions [B, L, 4] (L = ``model.max_sequence_length``)."""
    vae, t = configs["vae"], configs["transformer"]
    f, c, b = vae_scale_factor(vae), int(vae["latent_channels"]), inputs.batch_size
    w, h = inputs.target
    return Flux2KleinBatch(
        latents=torch.zeros(b, c, h // f, w // f),
        references=tuple(torch.zeros(b, c, ch // f, cw // f) for cw, ch in inputs.controls),
        text=torch.zeros(b, inputs.text_tokens, int(t["joint_attention_dim"]), dtype=dtype),
        text_ids=torch.zeros(b, inputs.text_tokens, 4, dtype=torch.long),
        noise=torch.zeros(b, c, h // f, w // f),
        sigmas=torch.full((b,), 0.5),
    )


def plan_model() -> PlanModel:
    """FLUX.2 [klein] for the planner."""
    return PlanModel(
        files=FLUX2_KLEIN, encoders=ENCODERS, batch=fake_batch, loss=lambda t: make_loss_fn(t, weighting_scheme="none")
    )
