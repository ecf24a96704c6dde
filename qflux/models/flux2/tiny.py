"""Tiny random FLUX.2 [klein] and [dev] in the diffusers layout, built offline (``python -m qflux.tiny
flux2_klein DIR``, ``python -m qflux.tiny flux2_dev DIR``).

FLUX.2 [klein] (``Flux2KleinPipeline``) reads a Qwen3 causal LM's hidden states at layers 9, 18 and 27
(stacked along the feature axis: the transformer's ``joint_attention_dim`` is 3 × the encoder's width),
a ``Flux2Transformer2DModel`` on 2×2-patchified latents (``in_channels`` = 4 × the VAE's latent
channels), and ``AutoencoderKLFlux2``, whose patchified latents are normalised by its batch-norm's
running statistics. The tiny model keeps every one of those relations at small widths: a Qwen3 of 28
layers (so layer 27 exists) of width 16, a transformer of width 32, a 4-channel VAE with non-trivial
running statistics, and a tokenizer built in code with a Qwen3-style chat template (``enable_thinking``).

FLUX.2 [dev] (``Flux2Pipeline``) has the same transformer and VAE, its transformer with a guidance
embedding, and reads Mistral Small 3.1 (``Mistral3ForConditionalGeneration``) at layers 10, 20 and 30 after
BFL's system message: the tiny one has a Mistral text model of 31 layers of width 16 with a one-layer Pixtral
vision tower (unused for text), and a byte-level tokenizer built in code with Mistral's control tokens, chat
template and a whole-word token for each word of the system message (52 tokens for it and
"make it red"; 184 with byte tokens alone).
The tokenizer saves as a plain tokenizer, not the Pixtral processor (whose image half needs torchvision).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from qflux.weights import tiny_parts

QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
"""Qwen3's chat template, reduced to what the pipeline renders: user turns, the generation prompt and
the empty thinking block that ``enable_thinking=False`` adds."""

_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "latent_channels": 4,
        "transformer": {"num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
                        "axes_dims_rope": (4, 4, 4, 4), "timestep_guidance_channels": 32, "mlp_ratio": 3.0},
        # layer 27 must exist: hidden_states[27] is the output of the 27th layer
        "text": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 28, "num_attention_heads": 2,
                 "num_key_value_heads": 1, "head_dim": 8},
        # three downsamplings: ×8, as the real VAE
        "vae": {"block_out_channels": (8, 16, 16, 16), "layers_per_block": 1, "norm_num_groups": 4},
    },
}  # fmt: skip

_DEV_TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 31, "num_attention_heads": 2,
             "num_key_value_heads": 1, "head_dim": 8}  # fmt: skip
"""The tiny Mistral text model: layer 30 must exist (hidden_states[30] is the output of the 30th layer)."""

_DEV_VISION = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
               "image_size": 64, "patch_size": 8, "head_dim": 8}  # fmt: skip
"""The tiny Pixtral vision tower (loaded with the encoder, never run for text)."""

_SCHEDULER = {"shift": 3.0, "time_shift_type": "exponential"}
"""FLUX.2's flow-matching scheduler settings (its pipeline computes μ per run: the rest are diffusers' defaults)."""


def build_flux2_klein(
    out_dir: str | Path, seed: int = 0, size: str = "tiny", overrides: tiny_parts.Overrides | None = None
) -> Path:
    """Write a tiny random FLUX.2 [klein] model folder (diffusers layout) to ``out_dir``.

    Args:
        seed: weights (and the VAE's running statistics) are a deterministic function of this seed.
        overrides: changes to the preset, per section (``transformer``, ``text``, ``vae``) or plain
            key (``latent_channels``).

    Returns:
        The folder; ``Flux2KleinPipeline.from_pretrained(path)`` loads it.
    """
    # deferred: diffusers is a heavy import
    from diffusers import Flux2KleinPipeline

    p = tiny_parts.preset(_PRESETS, size, overrides)
    with tiny_parts.seeded(seed):  # drawn in this order: text encoder, transformer, VAE
        text = _text_encoder(p["text"])
        components = _image_parts(p, 3 * p["text"]["hidden_size"], guidance=False, seed=seed)  # klein: no guidance
    return tiny_parts.save_pipeline(Flux2KleinPipeline, out_dir, {**components, **text, "is_distilled": False})


def build_flux2_dev(
    out_dir: str | Path, seed: int = 0, size: str = "tiny", overrides: tiny_parts.Overrides | None = None
) -> Path:
    """Write a tiny random FLUX.2 [dev] model folder (diffusers layout) to ``out_dir``.

    Args:
        seed: weights (and the VAE's running statistics) are a deterministic function of this seed.
        overrides: changes to [klein]'s preset (``transformer``, ``vae``, ``latent_channels``) and to the Mistral
            text model (``text``).

    Returns:
        The folder; ``Flux2Pipeline.from_pretrained(path)`` loads it.
    """
    # deferred: diffusers is a heavy import
    from diffusers import Flux2Pipeline

    p = tiny_parts.preset(_PRESETS, size, overrides)
    text_settings = {**_DEV_TEXT, **(overrides or {}).get("text", {})}
    with tiny_parts.seeded(seed):  # drawn in this order: text encoder, transformer, VAE
        text = _mistral(text_settings)
        components = _image_parts(p, 3 * text_settings["hidden_size"], guidance=True, seed=seed)
    return tiny_parts.save_pipeline(Flux2Pipeline, out_dir, {**components, **text})


def _image_parts(p: dict[str, Any], text_width: int, *, guidance: bool, seed: int) -> dict[str, Any]:
    """The transformer (on ``text_width``-wide prompt embeddings; with a guidance embedding when ``guidance``),
    the VAE and the scheduler of preset ``p``. Call inside the builder's seeded RNG."""
    # deferred: diffusers is a heavy import
    from diffusers import Flux2Transformer2DModel

    z = p["latent_channels"]
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * z,  # 2×2-patchified latents
        joint_attention_dim=text_width,  # three hidden-state layers, stacked
        guidance_embeds=guidance,
        **p["transformer"],
    )
    vae = _vae(p["vae"], z, seed)
    return {"transformer": transformer, "vae": vae, "scheduler": tiny_parts.flow_scheduler(**_SCHEDULER)}


def _mistral(settings: dict[str, Any]) -> dict[str, Any]:
    """A Mistral 3 vision-language model with a text model of ``settings`` and its tokenizer, as the pipeline's
    components (drawn from the global RNG, which the builder seeds)."""
    # deferred: diffusers and transformers are heavy imports
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    tok = tiny_parts.mistral_tokenizer(sorted(set(re.findall(r"[A-Za-z]+", SYSTEM_MESSAGE))))
    special = tiny_parts.MISTRAL_SPECIAL_TOKENS
    ids = dict(zip(special, tok.convert_tokens_to_ids(list(special)), strict=True))
    vocab = -(-len(tok) // 16) * 16
    text = MistralConfig(vocab_size=vocab, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                         pad_token_id=ids["<pad>"], rope_theta=1000000000.0, **settings)  # fmt: skip
    config = Mistral3Config(text_config=text, vision_config=PixtralVisionConfig(**_DEV_VISION),
                            image_token_index=ids["[IMG]"], tie_word_embeddings=False)  # fmt: skip
    return {"text_encoder": Mistral3ForConditionalGeneration(config), "tokenizer": tok}


def _text_encoder(settings: dict[str, Any]) -> dict[str, Any]:
    """A Qwen3 causal LM of ``settings`` with its tokenizer, as the pipeline's components (the LM drawn from the
    global RNG, which the builder seeds)."""
    # deferred: transformers is a heavy import
    from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM

    tok = tiny_parts.chat_tokenizer(Qwen2Tokenizer)
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    config = Qwen3Config(rope_theta=1000000.0, tie_word_embeddings=True, **tiny_parts.chat_text_config(tok), **settings)
    return {"text_encoder": Qwen3ForCausalLM(config), "tokenizer": tok}


def _vae(settings: dict[str, Any], z: int, seed: int) -> Any:
    """``AutoencoderKLFlux2`` of ``z`` latent channels (a VAE of n block widths downsamples by
    2^(n−1)), its batch-norm statistics drawn from ``seed`` + 1 so that normalising is not the identity.
    Call inside the builder's seeded RNG."""
    # deferred: diffusers is a heavy import
    from diffusers import AutoencoderKLFlux2

    n = len(settings["block_out_channels"])
    vae = AutoencoderKLFlux2(latent_channels=z, down_block_types=("DownEncoderBlock2D",) * n,
                             up_block_types=("UpDecoderBlock2D",) * n, **settings)  # fmt: skip
    gen = torch.Generator().manual_seed(seed + 1)
    vae.bn.running_mean.copy_((torch.randn(4 * z, generator=gen) * 0.2).round(decimals=4))
    vae.bn.running_var.copy_((1 + torch.rand(4 * z, generator=gen)).round(decimals=4))
    return vae
