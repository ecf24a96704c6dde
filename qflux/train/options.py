"""What a family's loader and its ``denoise`` take from the config, the same for every family: the
keyword arguments the recipes pass on (``load_x(path, include=..., **load_options(cfg, run))``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from qflux.config.schema import RecipeConfig
from qflux.diffusion.flow import Objective
from qflux.train.batch import Conditioning
from qflux.train.run import Run, placements
from qflux.weights.dtypes import torch_dtype
from qflux.weights.quantize import storage_by_component


def preview_options(
    cfg: RecipeConfig, cond: Conditioning, lora: Mapping[str, torch.Tensor], steps: int
) -> dict[str, Any]:
    """A family ``denoise``'s keyword arguments for a training preview (validation, sample.png): the
    target's latent size [h, w], ``steps`` steps, the run's seed, the LoRA and the noise in ``model.dtype``."""
    hw = (cond.latents.shape[-2], cond.latents.shape[-1])
    return {"latent_hw": hw, "num_inference_steps": steps, "seed": cfg.seed, "lora": lora,
            "noise_dtype": torch_dtype(cfg.model.dtype)}  # fmt: skip


def load_options(cfg: RecipeConfig, run: Run | None = None) -> dict[str, Any]:
    """A family loader's keyword arguments: ``model.dtype``, each component's device (:func:`placements`),
    storage (``model.quantize``, ``model.quantize_text_encoders``) and single file (``model.transformer_file``)."""
    quantize = storage_by_component(cfg.model)
    files = {} if cfg.model.transformer_file is None else {"transformer": cfg.model.transformer_file}
    return {"weight_dtype": torch_dtype(cfg.model.dtype), "devices": placements(cfg, run), "quantize": quantize,
            "files": files}  # fmt: skip


def plan_options(cfg: RecipeConfig) -> dict[str, Any]:
    """A family ``plan_model``'s keyword arguments: the run's objective (``train.loss``, ``train.preserve``: the base
    model's extra forward is planned), whether its batches carry a change mask (``train.loss_mask``) and a preserve
    prompt (``train.preserve_prompt``), and its token routing (``train.route``: fewer tokens in the routed blocks)."""
    routed = cfg.train.route == "tread" and cfg.train.route_ratio > 0
    return {"objective": Objective.from_config(cfg.train), "masked": cfg.train.loss_mask != "none",
            "preserve_prompt": cfg.train.preserve_prompt is not None,
            "route": (cfg.train.route_ratio, cfg.train.route_blocks) if routed else None}  # fmt: skip
