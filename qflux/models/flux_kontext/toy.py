"""The toy FLUX.1 Kontext: the real model code at the toy world's size (:mod:`qflux.toy`), in the
diffusers folder layout.

Its shapes (``TOY``, overrides of the tiny builder's "small" preset):

| component | config |
| --- | --- |
| VAE | ``AutoencoderKL``, 3 levels (32, 64, 64 channels): ×4 down, 16 channels; 64² px → 16×16 latent, 64 tokens |
| transformer | ``FluxTransformer2DModel``, 2 double and 4 single blocks, 8 heads × 32, guidance embedding |
| CLIP | 2 layers of width 64 |
| T5 | 2 layers of width 64; every word of the toy grammar is one token; prompts of :data:`SEQUENCE` tokens |

:func:`build_toy_start` writes the random starting point; the VAE and the transformer are then trained on
the toy world (``python -m qflux.toy build``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import torch

from qflux.data.dataset import PairDataset, collate_pairs
from qflux.models.flux_kontext.batch import encode_conditioning, text_tensors, to_batch
from qflux.models.flux_kontext.conditioning import PromptEmbeds, encode_prompt_with, vae_decode
from qflux.models.flux_kontext.loaders import FluxKontextModels
from qflux.models.flux_kontext.loss import make_loss_fn
from qflux.models.flux_kontext.names import NAMING
from qflux.models.flux_kontext.predict import denoise
from qflux.models.flux_kontext.tiny import build_flux_kontext
from qflux.train.batch import Conditioning, DataPath, with_mask
from qflux.train.run import ModelOps

SEQUENCE = 32
"""T5 tokens of a toy prompt (its tokenizer's ``model_max_length``, so ``model.max_sequence_length``'s default on
the toy): the grammar's longest instruction is 6 words."""
TOY = {
    "latent_channels": 16,
    "text_length": SEQUENCE,
    "vae": {"block_out_channels": (32, 64, 64), "norm_num_groups": 16},
    "transformer": {"num_layers": 2, "num_single_layers": 4, "attention_head_dim": 32, "num_attention_heads": 8,
                    "axes_dims_rope": (8, 12, 12)},
    "clip": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2},
    "t5": {"d_model": 64, "d_ff": 128, "d_kv": 32, "num_heads": 2, "num_layers": 2},
}  # fmt: skip
"""The toy's shapes, as overrides of :func:`~qflux.models.flux_kontext.tiny.build_flux_kontext`'s "small" preset."""
FOLDER = Path(__file__).parent / "toy_model"
"""The trained toy, committed (``python -m qflux.toy model DIR`` copies it; ``builtin:toy-flux-kontext``)."""
GUIDANCE = 2.5
"""The guidance value the toy transformer is trained and sampled at (Kontext's default)."""


def build_toy_start(out_dir: str | Path, words: Sequence[str], seed: int = 0) -> Path:
    """The toy FLUX.1 Kontext before training: random weights of the :data:`TOY` shapes, a T5 tokenizer with
    each of ``words`` (the toy grammar's vocabulary) as one token."""
    return build_flux_kontext(out_dir, seed=seed, size="small", overrides=TOY, words=words)


def toy_paths(models: FluxKontextModels) -> tuple[DataPath, ModelOps]:
    """The data path (pairs encoded by the toy's VAE and text encoders) and the model's functions (batch,
    loss, sampling at :data:`GUIDANCE`, decoding) that pretraining the toy transformer uses."""
    encode = with_mask(partial(encode_conditioning, models, max_sequence_length=SEQUENCE))
    empty = text_tensors(encode_prompt_with(models, [""], SEQUENCE))
    data = DataPath(PairDataset, collate_pairs, encode, empty)

    def preview(cond: Conditioning, lora: Mapping[str, torch.Tensor], steps: int) -> torch.Tensor:
        text = PromptEmbeds(pooled=cond.text["pooled"], tokens=cond.text["tokens"])
        hw = (cond.latents.shape[-2], cond.latents.shape[-1])
        return denoise(models.transformer, models.scheduler.config, cond.controls[0], text, None, latent_hw=hw,
                       num_inference_steps=steps, guidance_scale=GUIDANCE, lora=lora)  # fmt: skip

    def decode(latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [vae_decode(models.vae, z) for z in latents]

    from diffusers import FluxKontextPipeline  # deferred: heavy import

    loss = partial(make_loss_fn, guidance_scale=GUIDANCE)
    return data, ModelOps(to_batch, preview, decode, NAMING, FluxKontextPipeline, loss)
