"""A tiny random FLUX.1 Kontext in the standard diffusers folder layout, built offline and deterministically.

``python -m qflux.tiny flux_kontext DIR [--seed=0]`` writes a complete FLUX.1-Kontext folder
(transformer with guidance embedding, VAE, CLIP and T5 with tokenizers built in code, scheduler)
that ``FluxKontextPipeline.from_pretrained(DIR)`` and the qflux loaders both read.

The shapes keep the real model's structure (VAE downsampling ×8, 2×2 packing, CLIP pooled
projection, T5 sequence, 3-axis RoPE) at a width small enough for a 2-core CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qflux.weights.tiny_parts import Overrides, clip_tokenizer, preset, t5_tokenizer

# Shapes per preset. "tiny" is for tests and the default run; "small" is large enough that compute
# matters on a CPU and that the text encoders outweigh the transformer, as they do for FLUX.1.
_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "latent_channels": 4,
        "transformer": {"num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
                        "axes_dims_rope": (4, 6, 6)},
        "clip": {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2},
        "t5": {"d_model": 32, "d_ff": 37, "d_kv": 8, "num_heads": 4, "num_layers": 2},
        "vae": {"block_out_channels": (8, 16, 16, 16), "norm_num_groups": 4},
    },
    "small": {
        "latent_channels": 16,
        "transformer": {"num_layers": 2, "num_single_layers": 4, "attention_head_dim": 64, "num_attention_heads": 4,
                        "axes_dims_rope": (16, 24, 24)},
        "clip": {"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4, "num_hidden_layers": 4},
        "t5": {"d_model": 512, "d_ff": 2048, "d_kv": 64, "num_heads": 8, "num_layers": 12},
        "vae": {"block_out_channels": (32, 64, 64, 64), "norm_num_groups": 8},
    },
}  # fmt: skip


def build_flux_kontext(
    out_dir: str | Path, seed: int = 0, size: str = "tiny", overrides: Overrides | None = None
) -> Path:
    """Write a tiny random FLUX.1-Kontext model folder (diffusers layout) to ``out_dir``.

    Args:
        out_dir: destination folder; created if missing.
        seed: weights are a deterministic function of this seed.
        size: "tiny" (tests, default run) or "small" (CPU benchmarks: width 256, 2 double and 4
            single blocks, 16 latent channels, a 12-layer T5 of width 512).
        overrides: changes to the preset, per section (``transformer``, ``clip``, ``t5``, ``vae``)
            or plain key (``latent_channels``): other widths, head dims and VAE depths (a VAE of
            n ``block_out_channels`` downsamples by 2^(n−1)).

    Returns:
        The folder path. ``FluxKontextPipeline.from_pretrained(path)`` loads it.
    """
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel  # deferred: diffusers takes seconds to import

    p = preset(_PRESETS, size, overrides)
    out = Path(out_dir)
    tok = clip_tokenizer()
    tok2 = t5_tokenizer()
    latent_channels = p["latent_channels"]
    # fork_rng keeps the seeding local: the caller's global RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * latent_channels,  # 2×2 packed latents
            joint_attention_dim=p["t5"]["d_model"],
            pooled_projection_dim=p["clip"]["hidden_size"],
            guidance_embeds=True,
            **p["transformer"],  # axes_dims_rope sums to attention_head_dim
        )
        clip, t5 = _text_encoders(p, tok, tok2)
        vae = _vae(p)
    scheduler = _scheduler()
    pipe = FluxKontextPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=tok2,
        transformer=transformer,
    )
    pipe.save_pretrained(out)
    return out


def _text_encoders(p: dict[str, Any], tok: Any, tok2: Any) -> tuple[Any, Any]:
    """CLIP and T5 of preset ``p`` (drawn from the global RNG, which the builder seeds)."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel  # deferred: heavy import

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
    return clip, t5


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


def _scheduler() -> Any:
    """FLUX.1's flow-matching scheduler settings."""
    from diffusers import FlowMatchEulerDiscreteScheduler  # deferred: heavy import

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
