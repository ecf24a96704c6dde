"""What the memory planner (:mod:`qflux.memory.planner`) needs of FLUX.2: a micro-batch of the run's
shapes and the training loss."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch

from qflux.diffusion.zeros import zero_latents
from qflux.memory.planner import Inputs, PlanModel
from qflux.models.flux2.conditioning import vae_encode
from qflux.models.flux2.loaders import ENCODERS, Variant
from qflux.models.flux2.loss import Flux2Batch, make_loss_fn


def fake_batch(configs: Mapping[str, Mapping[str, Any]], inputs: Inputs, dtype: torch.dtype) -> Flux2Batch:
    """A micro-batch of zeros: latents [B, C, H/f, W/f] of the target and each reference, the prompt's
    tokens [B, L, 3D] and positions [B, L, 4] (L = ``model.max_sequence_length``)."""
    vae, b, n = configs["vae"], inputs.batch_size, inputs.text_tokens
    flow, references = zero_latents(vae, int(vae["latent_channels"]), b, inputs.target, inputs.controls)
    text = torch.zeros(b, n, int(configs["transformer"]["joint_attention_dim"]), dtype=dtype)
    return Flux2Batch(**flow, references=references, text=text, text_ids=torch.zeros(b, n, 4, dtype=torch.long))


def plan_model(variant: Variant, guidance_scale: float | None) -> PlanModel:
    """A FLUX.2 variant for the planner (``guidance_scale``: the guidance-distilled transformer's value)."""
    loss = partial(make_loss_fn, guidance_scale=guidance_scale)
    return PlanModel(files=variant.files, encoders=ENCODERS, batch=fake_batch, loss=loss, vae_encode=vae_encode)
