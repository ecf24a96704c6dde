"""What the memory planner (:mod:`qflux.memory.planner`) needs of FLUX.1 Kontext: a micro-batch of the run's
shapes and the training loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from qflux.diffusion.zeros import zero_latents
from qflux.memory.planner import Inputs, PlanModel
from qflux.models.flux_kontext.conditioning import vae_encode
from qflux.models.flux_kontext.loaders import ENCODERS, FLUX_KONTEXT
from qflux.models.flux_kontext.loss import FluxKontextBatch, make_loss_fn


def fake_batch(configs: Mapping[str, Mapping[str, Any]], inputs: Inputs, dtype: torch.dtype) -> FluxKontextBatch:
    """A micro-batch of zeros: latents [B, C, H/f, W/f] of the target and the control, the CLIP
    pooled embedding [B, P] and the T5 tokens [B, S, D] (S = ``model.max_sequence_length``)."""
    vae, t, b = configs["vae"], configs["transformer"], inputs.batch_size
    flow, (control,) = zero_latents(vae, int(vae["latent_channels"]), b, inputs.target, inputs.controls[:1])
    pooled = torch.zeros(b, int(t["pooled_projection_dim"]), dtype=dtype)
    prompt_embeds = torch.zeros(b, inputs.text_tokens, int(t["joint_attention_dim"]), dtype=dtype)
    return FluxKontextBatch(**flow, control_latents=control, pooled=pooled, prompt_embeds=prompt_embeds)


def plan_model(guidance_scale: float) -> PlanModel:
    """FLUX.1 Kontext for the planner."""
    return PlanModel(
        files=FLUX_KONTEXT,
        encoders=ENCODERS,
        batch=fake_batch,
        loss=lambda t, objective: make_loss_fn(t, objective, guidance_scale=guidance_scale),
        vae_encode=vae_encode,
    )
