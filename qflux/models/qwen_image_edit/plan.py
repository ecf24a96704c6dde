"""What the memory planner (:mod:`qflux.memory.planner`) needs of Qwen-Image-Edit: a micro-batch of the run's
shapes, the length of its prompt embedding, and the training loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from qflux.diffusion.zeros import zero_latents
from qflux.memory.planner import Inputs, PlanModel
from qflux.models.qwen_image_edit.conditioning import vae_encode
from qflux.models.qwen_image_edit.loaders import ENCODERS, QWEN_IMAGE_EDIT
from qflux.models.qwen_image_edit.loss import QwenImageEditBatch, make_loss_fn
from qflux.models.qwen_image_edit.predict import CONDITION_AREA, PLUS_VL_AREA

INSTRUCTION_TOKENS = 64
"""Tokens allowed for the template's tail and the instruction itself beside the vision tokens."""


def text_tokens(encoder: Mapping[str, Any], variant: str, controls: int) -> int:
    """Length S of the prompt embedding: each control image's vision tokens (its vision-language
    input of ``CONDITION_AREA`` for Edit, ``PLUS_VL_AREA`` per image for Edit-Plus, in patches of
    ``patch_size`` merged ``spatial_merge_size``² at a time) plus :data:`INSTRUCTION_TOKENS`."""
    vision = encoder.get("vision_config", {})
    pixels_per_token = (int(vision.get("patch_size", 14)) * int(vision.get("spatial_merge_size", 2))) ** 2
    area = CONDITION_AREA if variant == "edit" else PLUS_VL_AREA
    return controls * (area // pixels_per_token) + INSTRUCTION_TOKENS


def fake_batch(configs: Mapping[str, Mapping[str, Any]], inputs: Inputs, dtype: torch.dtype) -> QwenImageEditBatch:
    """A micro-batch of zeros: target latents [B, C, H/f, W/f], one latent per control image, the
    prompt embedding [B, S, D] and its mask."""
    vae, b, n = configs["vae"], inputs.batch_size, inputs.text_tokens
    flow, controls = zero_latents(vae, int(vae["z_dim"]), b, inputs.target, inputs.controls)
    embeds = torch.zeros(b, n, int(configs["transformer"]["joint_attention_dim"]), dtype=dtype)
    return QwenImageEditBatch(**flow, controls=controls, embeds=embeds, mask=torch.ones(b, n, dtype=torch.long))


def plan_model() -> PlanModel:
    """Qwen-Image-Edit for the planner."""
    return PlanModel(
        files=QWEN_IMAGE_EDIT,
        encoders=ENCODERS,
        batch=fake_batch,
        loss=make_loss_fn,
        vae_encode=vae_encode,
    )
