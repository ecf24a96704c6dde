"""What the memory planner (:mod:`qflux.memory.planner`) needs of FLUX.2 [klein]: a micro-batch of the run's
shapes and the training loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from qflux.diffusion.zeros import zero_latents
from qflux.memory.planner import Inputs, PlanModel
from qflux.models.flux2_klein.loaders import ENCODERS, FLUX2_KLEIN
from qflux.models.flux2_klein.loss import Flux2KleinBatch, make_loss_fn


def fake_batch(configs: Mapping[str, Mapping[str, Any]], inputs: Inputs, dtype: torch.dtype) -> Flux2KleinBatch:
    """A micro-batch of zeros: latents [B, C, H/f, W/f] of the target and each reference, the prompt's
    tokens [B, L, 3D] and positions [B, L, 4] (L = ``model.max_sequence_length``)."""
    vae, b, n = configs["vae"], inputs.batch_size, inputs.text_tokens
    flow, references = zero_latents(vae, int(vae["latent_channels"]), b, inputs.target, inputs.controls)
    text = torch.zeros(b, n, int(configs["transformer"]["joint_attention_dim"]), dtype=dtype)
    return Flux2KleinBatch(**flow, references=references, text=text, text_ids=torch.zeros(b, n, 4, dtype=torch.long))


def plan_model() -> PlanModel:
    """FLUX.2 [klein] for the planner."""
    return PlanModel(files=FLUX2_KLEIN, encoders=ENCODERS, batch=fake_batch, loss=make_loss_fn)
