"""A tiny random FLUX.1 Kontext in the standard diffusers folder layout, built offline and deterministically.

``python -m qflux.tiny flux_kontext DIR [--seed=0]`` writes a complete FLUX.1-Kontext folder
(transformer with guidance embedding, VAE, CLIP and T5 with tokenizers built in code, scheduler)
that ``FluxKontextPipeline.from_pretrained(DIR)`` and the qflux loaders both read.

The shapes keep the real model's structure (VAE downsampling ×8, 2×2 packing, CLIP pooled
projection, T5 sequence, 3-axis RoPE) at a width small enough for a 2-core CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qflux.weights import tiny_parts

# Each setting's value in the "tiny" preset (tests and the default run) and in the "small" one, large enough that
# compute matters on a CPU and that the text encoders outweigh the transformer, as they do for FLUX.1.
_PRESETS = tiny_parts.by_size(("tiny", "small"), {
    "latent_channels": (4, 16),
    "text_length": (512, 512),  # the T5 tokenizer's model_max_length: model.max_sequence_length's default
    "transformer": {"num_layers": (1, 2), "num_single_layers": (2, 4), "attention_head_dim": (16, 64),
                    "num_attention_heads": (2, 4), "axes_dims_rope": ((4, 6, 6), (16, 24, 24))},
    "clip": {"hidden_size": (32, 256), "intermediate_size": (37, 1024), "num_attention_heads": (4, 4),
             "num_hidden_layers": (2, 4)},
    "t5": {"d_model": (32, 512), "d_ff": (37, 2048), "d_kv": (8, 64), "num_heads": (4, 8), "num_layers": (2, 12)},
    "vae": {"block_out_channels": ((8, 16, 16, 16), (32, 64, 64, 64)), "norm_num_groups": (4, 8)},
})  # fmt: skip

_SCHEDULER = {"shift": 3.0, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
"""FLUX.1's flow-matching scheduler settings."""


def build_flux_kontext(
    out_dir: str | Path,
    seed: int = 0,
    size: str = "tiny",
    overrides: tiny_parts.Overrides | None = None,
    words: Sequence[str] = (),
) -> Path:
    """Write a tiny random FLUX.1-Kontext model folder (diffusers layout) to ``out_dir``.

    Args:
        out_dir: destination folder; created if missing.
        seed: weights are a deterministic function of this seed.
        size: "tiny" (tests, default run) or "small" (CPU benchmarks: width 256, 2 double and 4
            single blocks, 16 latent channels, a 12-layer T5 of width 512).
        overrides: changes to the preset, per section (``transformer``, ``clip``, ``t5``, ``vae``)
            or plain key (``latent_channels``, ``text_length``): other widths, head dims and VAE depths (a VAE of
            n ``block_out_channels`` downsamples by 2^(n−1)).
        words: whole-word pieces of the T5 tokenizer (a toy world's vocabulary).

    Returns:
        The folder path. ``FluxKontextPipeline.from_pretrained(path)`` loads it.
    """
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel  # deferred: diffusers takes seconds to import

    p = tiny_parts.preset(_PRESETS, size, overrides)
    with tiny_parts.seeded(seed):  # drawn in this order: transformer, CLIP, T5, VAE
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * p["latent_channels"],  # 2×2 packed latents
            joint_attention_dim=p["t5"]["d_model"],
            pooled_projection_dim=p["clip"]["hidden_size"],
            guidance_embeds=True,
            **p["transformer"],  # axes_dims_rope sums to attention_head_dim
        )
        text = _text_encoders(p, words)
        vae = _vae(p)
    components = {"transformer": transformer, "vae": vae, "scheduler": tiny_parts.flow_scheduler(**_SCHEDULER), **text}
    return tiny_parts.save_pipeline(FluxKontextPipeline, out_dir, components)


def _text_encoders(p: dict[str, Any], words: Sequence[str] = ()) -> dict[str, Any]:
    """CLIP and T5 of preset ``p`` with their tokenizers, as the pipeline's components (the encoders drawn from the
    global RNG, which the builder seeds)."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel  # deferred: heavy import

    tok, tok2 = tiny_parts.clip_tokenizer(), tiny_parts.t5_tokenizer(words, p["text_length"])
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            **p["clip"],
            max_position_embeddings=77,
            projection_dim=p["clip"]["hidden_size"],
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            hidden_act="gelu",
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tok2),
            **p["t5"],
            relative_attention_num_buckets=8,
            pad_token_id=tok2.pad_token_id,
            eos_token_id=tok2.eos_token_id,
            decoder_start_token_id=tok2.pad_token_id,
        )
    )
    return {"text_encoder": clip, "tokenizer": tok, "text_encoder_2": t5, "tokenizer_2": tok2}


def _vae(p: dict[str, Any]) -> Any:
    """The FLUX VAE of preset ``p`` (its depth from ``block_out_channels``)."""
    from diffusers import AutoencoderKL  # deferred: heavy import

    levels = len(p["vae"]["block_out_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1,
        latent_channels=p["latent_channels"],
        **p["vae"],  # 4 levels in the presets: downsampling ×8, as in FLUX
        sample_size=64,
        shift_factor=0.1159,  # FLUX.1 values
        scaling_factor=0.3611,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
