"""Qwen-Image's ComfyUI names: ComfyUI's Qwen-Image model uses diffusers' own module names
(comfy/ldm/qwen_image/model.py), so a LoRA keeps them under ``diffusion_model.``, nothing fused."""

from __future__ import annotations

from qflux.lora.formats import ComfyNames

NAMING = "qwen"
"""The name Qwen-Image-Edit's LoRA files are written and read under."""
NAMES = ComfyNames(same=True, label="Qwen-Image")
