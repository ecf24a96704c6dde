"""A tiny random Qwen-Image-Edit (Edit, 2509, 2511) in the diffusers folder layout, built offline.

``python -m qflux.tiny qwen_image_edit DIR [--seed=0]`` (and ``qwen_image_edit_plus``, ``qwen_image_edit_2511``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qflux.models.qwen_image_edit.processor import qwen_processor
from qflux.weights.tiny_parts import CHAT_SPECIAL_TOKENS, Overrides, chat_tokenizer, preset

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
    # deferred: diffusers and transformers take seconds to import
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImageTransformer2DModel

    # deferred: transformers is a heavy import
    from transformers import Qwen2Tokenizer

    if variant not in QWEN_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(QWEN_VARIANTS)}")
    p = preset(_QWEN_PRESETS, size, overrides)
    out = Path(out_dir)
    tok = chat_tokenizer(Qwen2Tokenizer)
    ids = dict(zip(CHAT_SPECIAL_TOKENS, tok.convert_tokens_to_ids(list(CHAT_SPECIAL_TOKENS)), strict=True))
    z = p["z_dim"]
    vocab = -(-len(tok) // 16) * 16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _text_encoder(p, ids, vocab)
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
    scheduler = _scheduler()
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


def _text_encoder(p: dict[str, Any], ids: dict[str, int], vocab: int) -> Any:
    """Qwen2.5-VL (vision tower included) of preset ``p`` (drawn from the global RNG, which the builder seeds)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # deferred: heavy import

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
    return Qwen2_5_VLForConditionalGeneration(config)


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


def _scheduler() -> Any:
    """Qwen-Image's flow-matching scheduler settings."""
    from diffusers import FlowMatchEulerDiscreteScheduler  # deferred: heavy import

    return FlowMatchEulerDiscreteScheduler(
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
