"""A tiny random Qwen-Image-Edit (Edit, 2509, 2511) in the diffusers folder layout, built offline.

``python -m qflux.tiny qwen_image_edit DIR [--seed=0]`` (and ``qwen_image_edit_plus``, ``qwen_image_edit_2511``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qflux.models.qwen_image_edit.processor import qwen_processor
from qflux.weights import tiny_parts

_QWEN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "z_dim": 4,
        "transformer": {"num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 3,
                        "axes_dims_rope": (8, 4, 4)},
        "text": {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "num_key_value_heads": 2},
        "vision": {"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2},
        # three downsamplings: ×8, as the real VAE
        "vae": {"base_dim": 8, "dim_mult": (1, 2, 4, 4), "temperal_downsample": (False, True, True)},
        # the vision encoder sees at most 64 merged patches (28×28 px each) of any control image
        "processor": {"size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 64}},
    },
}  # fmt: skip

_SCHEDULER = {"shift": 1.0, "base_shift": 0.5, "max_shift": 0.9, "base_image_seq_len": 256, "max_image_seq_len": 8192,
              "shift_terminal": 0.02, "time_shift_type": "exponential"}  # fmt: skip
"""Qwen-Image's flow-matching scheduler settings."""

QWEN_VARIANTS = ("edit", "edit_plus", "edit_2511")
"""Qwen-Image-Edit, -2509 (Plus) and -2511 (Plus with ``zero_cond_t``)."""


def build_qwen_image_edit(
    out_dir: str | Path,
    seed: int = 0,
    size: str = "tiny",
    variant: str = "edit",
    overrides: tiny_parts.Overrides | None = None,
) -> Path:
    """Write a tiny random Qwen-Image-Edit model folder (diffusers layout) to ``out_dir``.

    A Qwen2.5-VL text encoder (vision tower included) with a tokenizer built in code, the Qwen2-VL
    processor (PIL image processor, no torchvision), the QwenImage transformer, the QwenImage VAE
    with non-trivial ``latents_mean`` / ``latents_std``, and Qwen-Image's scheduler settings.

    Args:
        variant: "edit" (``QwenImageEditPipeline``), "edit_plus" (``QwenImageEditPlusPipeline``,
            2509: the same components, several control images) or "edit_2511" (the Plus pipeline
            with the transformer's ``zero_cond_t``: control tokens modulated at t = 0).
        overrides: changes to the preset, per section (``transformer``, ``text``, ``vision``,
            ``vae``, ``processor``) or plain key (``z_dim``); a VAE with n ``temperal_downsample``
            entries downsamples by 2^n.

    Returns:
        The folder. ``QwenImageEditPipeline.from_pretrained(path, processor=load_qwen_processor(path
        / "processor"))`` loads it.
    """
    # deferred: diffusers takes seconds to import
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImageTransformer2DModel

    if variant not in QWEN_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(QWEN_VARIANTS)}")
    p = tiny_parts.preset(_QWEN_PRESETS, size, overrides)
    z = p["z_dim"]
    with tiny_parts.seeded(seed):  # drawn in this order: text encoder, transformer, VAE
        text = _text_encoder(p)
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * z,  # 2×2 packed latents
            out_channels=z,
            joint_attention_dim=p["text"]["hidden_size"],
            guidance_embeds=False,
            zero_cond_t=variant == "edit_2511",
            **p["transformer"],
        )
        vae = _vae(p, seed)
    components = {"transformer": transformer, "vae": vae, "scheduler": tiny_parts.flow_scheduler(**_SCHEDULER), **text}
    pipeline_cls = QwenImageEditPipeline if variant == "edit" else QwenImageEditPlusPipeline
    return tiny_parts.save_pipeline(pipeline_cls, out_dir, components)


def _text_encoder(p: dict[str, Any]) -> dict[str, Any]:
    """Qwen2.5-VL (vision tower included) of preset ``p`` with its tokenizer and processor, as the pipeline's
    components (the encoder drawn from the global RNG, which the builder seeds)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer  # deferred: heavy

    tok = tiny_parts.chat_tokenizer(Qwen2Tokenizer)
    ids = tiny_parts.chat_token_ids(tok)
    special = tiny_parts.chat_text_config(tok)  # vocab_size and the bos, eos and pad ids
    text = dict(p["text"], rope_theta=1000000.0, **special,
                rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"})  # fmt: skip
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(p["vision"], out_hidden_size=p["text"]["hidden_size"]),
        **special,
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    return {"text_encoder": text_encoder, "tokenizer": tok, "processor": qwen_processor(tok, **p["processor"])}


def _vae(p: dict[str, Any], seed: int) -> Any:
    """The QwenImage VAE of preset ``p`` with non-trivial latent statistics (from ``seed + 1``)."""
    from diffusers import AutoencoderKLQwenImage  # deferred: heavy import

    gen = torch.Generator().manual_seed(seed + 1)
    return AutoencoderKLQwenImage(
        base_dim=p["vae"]["base_dim"],
        z_dim=p["z_dim"],
        dim_mult=list(p["vae"]["dim_mult"]),
        num_res_blocks=1,
        temperal_downsample=list(p["vae"]["temperal_downsample"]),
        latents_mean=(torch.randn(p["z_dim"], generator=gen) * 0.2).round(decimals=4).tolist(),
        latents_std=(1 + torch.rand(p["z_dim"], generator=gen)).round(decimals=4).tolist(),
    )
