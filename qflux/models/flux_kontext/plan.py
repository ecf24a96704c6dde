"""What the memory planner (:mod:`qflux.memory.planner`) needs of FLUX.1 Kontext: a micro-batch of the run's
shapes and the training loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from qflux.diffusion.latents import vae_scale_factor
from qflux.memory.planner import Inputs, PlanModel
from qflux.models.flux_kontext.loaders import ENCODERS, FLUX_KONTEXT
from qflux.models.flux_kontext.loss import FluxKontextBatch, make_loss_fn


def fake_batch(configs: Mapping[str, Mapping[str, Any]], inputs: Inputs, dtype: torch.dtype) -> FluxKontextBatch:
    """A micro-batch of zeros: latents [B, C, H/f, W/f] of the target and the control, the CLIP
    pooled embedding [B, P] and the T5 tokens [B, S, D] (S = ``model.max_sequence_length``)."""
    vae, t = configs["vae"], configs["transformer"]
    f, c, b = vae_scale_factor(vae), int(vae["latent_channels"]), inputs.batch_size
    (w, h), (cw, ch) = inputs.target, inputs.controls[0]
    return FluxKontextBatch(
        latents=torch.zeros(b, c, h // f, w // f),
        control_latents=torch.zeros(b, c, ch // f, cw // f),
        pooled=torch.zeros(b, int(t["pooled_projection_dim"]), dtype=dtype),
        prompt_embeds=torch.zeros(b, inputs.text_tokens, int(t["joint_attention_dim"]), dtype=dtype),
        noise=torch.zeros(b, c, h // f, w // f),
        sigmas=torch.full((b,), 0.5),
    )


def plan_model(guidance_scale: float) -> PlanModel:
    """FLUX.1 Kontext for the planner."""
    return PlanModel(
        files=FLUX_KONTEXT,
        encoders=ENCODERS,
        batch=fake_batch,
        loss=lambda t: make_loss_fn(t, guidance_scale=guidance_scale, weighting_scheme="none"),
    )
