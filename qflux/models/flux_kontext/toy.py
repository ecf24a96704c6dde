"""The toy FLUX.1 Kontext: the real model code at the toy world's size (:mod:`qflux.toy`), in the
diffusers folder layout.

Its shapes (``TOY``, overrides of the tiny builder's "small" preset):

| component | config |
| --- | --- |
| VAE | ``AutoencoderKL``, 3 levels (32, 64, 64 channels): ×4 down, 16 channels; 64² px → 16×16 latent, 64 tokens |
| transformer | ``FluxTransformer2DModel``, 2 double and 4 single blocks, 8 heads × 32, guidance embedding |
| CLIP | 2 layers of width 64 |
| T5 | 2 layers of width 64; every word of the toy grammar is one token |

:func:`build_toy_start` writes the random starting point; the VAE and the transformer are then trained on
the toy world (``python -m qflux.toy train-vae`` and ``pretrain``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qflux.models.flux_kontext.tiny import build_flux_kontext

TOY = {
    "latent_channels": 16,
    "vae": {"block_out_channels": (32, 64, 64), "norm_num_groups": 16},
    "transformer": {"num_layers": 2, "num_single_layers": 4, "attention_head_dim": 32, "num_attention_heads": 8,
                    "axes_dims_rope": (8, 12, 12)},
    "clip": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2},
    "t5": {"d_model": 64, "d_ff": 128, "d_kv": 32, "num_heads": 2, "num_layers": 2},
}  # fmt: skip
"""The toy's shapes, as overrides of :func:`~qflux.models.flux_kontext.tiny.build_flux_kontext`'s "small" preset."""


def build_toy_start(out_dir: str | Path, words: Sequence[str], seed: int = 0) -> Path:
    """The toy FLUX.1 Kontext before training: random weights of the :data:`TOY` shapes, a T5 tokenizer with
    each of ``words`` (the toy grammar's vocabulary) as one token."""
    return build_flux_kontext(out_dir, seed=seed, size="small", overrides=TOY, words=words)
