"""Tiny random models in the standard diffusers folder layout, built offline and deterministically.

``python -m qflux.tiny flux_kontext DIR [--seed=0]`` writes a complete FLUX.1-Kontext folder
(transformer with guidance embedding, VAE, CLIP and T5 with tokenizers built in code, scheduler)
that ``FluxKontextPipeline.from_pretrained(DIR)`` and the qflux loaders both read.

The shapes keep the real model's structure (VAE downsampling ×8, 2×2 packing, CLIP pooled
projection, T5 sequence, 3-axis RoPE) at a width small enough for a 2-core CPU.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch

__all__ = ["build_flux_kontext", "build_qwen_image_edit", "clip_tokenizer", "qwen_tokenizer", "t5_tokenizer"]

# Characters the tiny tokenizers know; anything else maps to the unknown token.
_ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,!?'-:;()"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte→unicode table (printable stand-ins for all 256 bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def clip_tokenizer() -> Any:
    """A byte-level CLIP BPE tokenizer over all 256 bytes plus a few merges, built in code."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [("e", "d</w>"), ("i", "n"), ("t", "h"), ("th", "e</w>"), ("o", "n</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def t5_tokenizer() -> Any:
    """A unigram T5 tokenizer over single characters and a few words, built in code."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    words = ["▁the", "▁make", "▁turn", "▁color", "▁image", "▁invert", "▁flip", "▁red", "▁blue"]
    pieces += [(w, -3.0) for w in words]
    pieces += [(c, -5.0) for c in _ALPHABET]
    pieces += [("▁" + c, -4.0) for c in _ALPHABET]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


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


Overrides = Mapping[str, Any]


def _preset(presets: Mapping[str, dict[str, Any]], size: str, overrides: Overrides | None) -> dict[str, Any]:
    """The preset ``size`` with ``overrides`` merged in: a section's keys are updated
    (``{"vae": {"block_out_channels": (8, 16, 16)}}``), a plain key is replaced."""
    if size not in presets:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(presets)}")
    p = dict(presets[size])
    for key, value in (overrides or {}).items():
        if key not in p:
            raise ValueError(f"unknown tiny-model setting {key!r}; choose from {sorted(p)}")
        p[key] = {**p[key], **value} if isinstance(p[key], dict) else value
    return p


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
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    p = _preset(_PRESETS, size, overrides)
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
        levels = len(p["vae"]["block_out_channels"])
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            layers_per_block=1,
            latent_channels=latent_channels,
            **p["vae"],  # 4 levels in the presets: downsampling ×8, as in FLUX
            sample_size=64,
            shift_factor=0.1159,  # FLUX.1 values
            scaling_factor=0.3611,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
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


# The special tokens of Qwen2.5-VL's chat and vision template, in its order.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip


def qwen_tokenizer() -> Any:
    """A byte-level Qwen2 BPE tokenizer over all 256 bytes, a few merges and the chat/vision
    special tokens, built in code."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab[QWEN_SPECIAL_TOKENS[0]] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    return tok


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


QWEN_VARIANTS = ("edit", "edit_plus", "edit_2511")
"""Qwen-Image-Edit, -2509 (Plus) and -2511 (Plus with ``zero_cond_t``)."""


def build_qwen_image_edit(
    out_dir: str | Path, seed: int = 0, size: str = "tiny", variant: str = "edit", overrides: Overrides | None = None
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
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from qflux.models.qwen_image_edit.processor import qwen_processor

    if variant not in QWEN_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(QWEN_VARIANTS)}")
    p = _preset(_QWEN_PRESETS, size, overrides)
    out = Path(out_dir)
    tok = qwen_tokenizer()
    ids = dict(zip(QWEN_SPECIAL_TOKENS, tok.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS)), strict=True))
    z = p["z_dim"]
    vocab = -(-len(tok) // 16) * 16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        special = {"bos_token_id": None, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}
        text = dict(p["text"], vocab_size=vocab, rope_theta=1000000.0, **special,
                    rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"})  # fmt: skip
        config = Qwen2_5_VLConfig(
            text_config=text,
            vision_config=dict(p["vision"], out_hidden_size=p["text"]["hidden_size"]),
            vocab_size=vocab,
            **special,
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            vision_token_id=ids["<|vision_pad|>"],
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
        )
        text_encoder = Qwen2_5_VLForConditionalGeneration(config)
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * z,  # 2×2 packed latents
            out_channels=z,
            joint_attention_dim=p["text"]["hidden_size"],
            guidance_embeds=False,
            zero_cond_t=variant == "edit_2511",
            **p["transformer"],
        )
        gen = torch.Generator().manual_seed(seed + 1)
        vae = AutoencoderKLQwenImage(
            base_dim=p["vae"]["base_dim"],
            z_dim=z,
            dim_mult=list(p["vae"]["dim_mult"]),
            num_res_blocks=1,
            temperal_downsample=list(p["vae"]["temperal_downsample"]),
            latents_mean=(torch.randn(z, generator=gen) * 0.2).round(decimals=4).tolist(),
            latents_std=(1 + torch.rand(z, generator=gen)).round(decimals=4).tolist(),
        )
    scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen-Image's settings
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    pipeline_cls = QwenImageEditPipeline if variant == "edit" else QwenImageEditPlusPipeline
    pipe = pipeline_cls(
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        text_encoder=text_encoder,
        tokenizer=tok,
        processor=qwen_processor(tok, **p["processor"]),
    )
    pipe.save_pretrained(out)
    return out


_BUILDERS: dict[str, Callable[..., Path]] = {
    "flux_kontext": build_flux_kontext,
    "qwen_image_edit": build_qwen_image_edit,
    "qwen_image_edit_plus": partial(build_qwen_image_edit, variant="edit_plus"),
    "qwen_image_edit_2511": partial(build_qwen_image_edit, variant="edit_2511"),
    "flux2_klein": lambda *a, **k: _flux2_klein(*a, **k),
}


def _flux2_klein(*args: Any, **kwargs: Any) -> Path:
    from qflux.models.flux2_klein.tiny import build_flux2_klein  # it builds on this module's tokenizer and presets

    return build_flux2_klein(*args, **kwargs)


def main(model: str, out_dir: str, seed: int = 0, size: str = "tiny") -> None:
    """CLI: ``python -m qflux.tiny flux_kontext|qwen_image_edit|qwen_image_edit_plus|qwen_image_edit_2511|flux2_klein
    DIR [--seed=0] [--size=...]``."""
    if model not in _BUILDERS:
        raise SystemExit(f"unknown tiny model {model!r}; choose one of {sorted(_BUILDERS)}")
    try:
        path = _BUILDERS[model](out_dir, seed=seed, size=size)
    except ValueError as e:  # an unknown size names the ones there are
        raise SystemExit(str(e)) from None
    print(f"wrote tiny {model} model to {path}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
