"""Qwen-Image-Edit LoRA: ``python -m recipes.qwen_image_edit_lora [train|cache|predict] [--config=F] [--a.b=c ...]``.

With no arguments it trains on the built-in default (a tiny random Qwen-Image-Edit model and the
synthetic colour-inversion dataset) and writes, under ``logging.output_dir``: the LoRA
(``pytorch_lora_weights.safetensors`` for diffusers' ``QwenImageEditPipeline`` and
``..._comfyui.safetensors``), checkpoints, ``config.yaml``, ``loss.png`` and ``sample.png``.

``model.variant: edit_plus`` trains Qwen-Image-Edit-2509, whose samples have 0 to 3 control images
(``control_images/NAME.png``, ``NAME_control_1.png``, ``NAME_control_2.png``); ``edit_2511``
trains Qwen-Image-Edit-2511 on the same inputs (its transformer modulates the control tokens at
t = 0: ``zero_cond_t``). Each sample's prompt
is embedded with its own control image(s), resized as the pipeline resizes them. A run reads top to
bottom in :func:`train`; what every model shares is :mod:`qflux.train.run` and :mod:`qflux.train.driver`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import torch
from PIL import Image

from qflux.config.parse import load_config
from qflux.data.images import image_arg, save_image
from qflux.data.pairs import PairRule
from qflux.diffusion.flow import Objective
from qflux.lora.adapter import load_lora_file
from qflux.memory.command import PlanTarget, recipe_main, warn_if_too_big
from qflux.models.qwen_image_edit import FAMILY
from qflux.models.qwen_image_edit import cache as qcache
from qflux.models.qwen_image_edit.batch import (
    QwenPairDataset,
    cached_conditioning,
    collate_qwen_pairs,
    encode_conditioning,
    to_batch,
)
from qflux.models.qwen_image_edit.conditioning import vae_decode
from qflux.models.qwen_image_edit.config import QwenImageEditConfig
from qflux.models.qwen_image_edit.loaders import QwenImageEditModels, check_variant, load_qwen_image_edit
from qflux.models.qwen_image_edit.loss import make_loss_fn
from qflux.models.qwen_image_edit.plan import plan_model, text_tokens
from qflux.models.qwen_image_edit.predict import control_rule, denoise
from qflux.models.qwen_image_edit.predict import predict as qwen_predict
from qflux.train.batch import Conditioning, DataPath, with_mask
from qflux.train.cache import CacheReport
from qflux.train.cache_path import CachePath, cache_command, cached_data, module_cache
from qflux.train.driver import decoder, train_lora
from qflux.train.options import load_options, plan_options, preview_options
from qflux.train.run import ModelOps, Run, RunResult, family_folder, pair_dataset, training_run

PAIRS = {"edit": PairRule((1, 1), control_rule("edit")), "edit_plus": PairRule((0, 3), control_rule("edit_plus")),
         "edit_2511": PairRule((0, 3), control_rule("edit_2511"))}  # fmt: skip
"""Control images per sample of each variant; each is sized at its own aspect, as the pipelines do."""


def pipeline_cls() -> Any:
    """``QwenImageEditPipeline``: LoRA files are written and read through it."""
    from diffusers import QwenImageEditPipeline

    return QwenImageEditPipeline


def train(cfg: QwenImageEditConfig) -> RunResult:
    """Train a LoRA as configured: the data and model folder are checked, the models load (the
    transformer and the encoders, or the cache), the LoRA is attached, then the loop runs and the
    outputs are written. SIGINT/SIGTERM save a checkpoint and return early."""
    with training_run(cfg, FAMILY, PAIRS[cfg.model.variant]) as run:
        if run.finished is not None:
            return run.finished
        models, data = _inputs(cfg, run)
        return train_lora(cfg, run, FAMILY, models, data, _ops(cfg, run, models))


def _ops(cfg: QwenImageEditConfig, run: Run, models: QwenImageEditModels) -> ModelOps:
    """The model's own functions the shared loop calls: its batch, preview (validation, sample.png),
    decoding (a VAE loaded for the call when training from the cache) and loss."""
    decode = decoder(vae_decode, models.vae, lambda: _load(cfg, run.model_dir, ("vae",)).vae)
    loss = partial(make_loss_fn, objective=Objective.from_config(cfg.train))
    return ModelOps(to_batch, partial(_preview, cfg, models), decode, FAMILY.naming, pipeline_cls(), loss)


def _load(cfg: QwenImageEditConfig, path: Path, include: Sequence[str], run: Run | None = None) -> QwenImageEditModels:
    """The ``include``d components (the transformer on the run's own device)."""
    if "transformer" in include:
        check_variant(path, cfg.model.variant)
    return load_qwen_image_edit(path, include=include, **load_options(cfg, run))


def _inputs(cfg: QwenImageEditConfig, run: Run) -> tuple[QwenImageEditModels, DataPath]:
    """Training's models and data path: the transformer and the cache, or every encoder as well.
    Each sample carries its own empty-instruction embedding (it sees the sample's images)."""
    warn_if_too_big(cfg, _plan_target(cfg), run)  # before anything loads (CUDA)
    if cfg.cache.use_cache:  # the missing entries are computed first, with the encoders
        load_encoders = partial(_load, cfg, run.model_dir, FAMILY.encoders)
        data = cached_data(_cache(cfg, run.model_dir), run, cfg.cache.cache_dir, load_encoders)
        return _load(cfg, run.model_dir, ("transformer",), run), data
    models = _load(cfg, run.model_dir, ("transformer", *FAMILY.encoders), run)
    variant = cfg.model.variant
    pairs = pair_dataset(cfg, run.model_dir)
    return models, DataPath(lambda samples: QwenPairDataset(pairs(samples), variant), collate_qwen_pairs,
                            with_mask(partial(encode_conditioning, models, variant=variant,
                                              preserve_prompt=cfg.train.preserve_prompt)), None)  # fmt: skip


def _cache(cfg: QwenImageEditConfig, path: Path) -> CachePath:
    """This model's cache of ``cache.cache_dir``, for the folder's encoders, the dtype and the variant."""
    spec = qcache.cache_spec(path, cfg.model.dtype, cfg.model.variant, cfg.train.loss_mask, cfg.train.preserve_prompt)
    return module_cache(qcache, spec, Path(cfg.cache.cache_dir), cached_conditioning, lambda: None)


def _preview(cfg: QwenImageEditConfig, models: QwenImageEditModels, cond: Conditioning, lora: Any,
             steps: int) -> torch.Tensor:  # fmt: skip
    """One sample's conditioning denoised at its target size (no true CFG)."""
    text = (cond.text["embeds"], cond.text["mask"])
    options = preview_options(cfg, cond, lora, steps)
    return denoise(models.transformer, models.scheduler.config, cond.controls, text, None, **options)


def cache(cfg: QwenImageEditConfig) -> CacheReport:
    """Compute the cache entries the configured dataset needs (under torchrun, each rank every
    world-th sample); returns the computed/reused counts."""
    path = family_folder(cfg, FAMILY)
    return cache_command(
        cfg, path, PAIRS[cfg.model.variant], _cache(cfg, path), partial(_load, cfg, path, FAMILY.encoders)
    )


def _images(image: str | list[str] | tuple[str, ...] | None, variant: str) -> list[Image.Image]:
    """The control image(s) of ``--image``: one path, or (Edit-Plus) a comma-separated list or none."""
    want = "exactly one image" if variant == "edit" else "0 to 3 images, comma-separated"
    return image_arg(image, PAIRS[variant].controls, f"model.variant '{variant}' takes {want}")


def predict(prompt: str, image: str | list[str] | None = None, out: str = "edited.png",
            lora: str | None = None, seed: int = 0, num_inference_steps: int = 50, height: int | None = None,
            width: int | None = None, negative_prompt: str | None = None, true_cfg_scale: float = 4.0,
            config: str | None = None, **overrides: Any) -> None:  # fmt: skip
    """Edit: ``predict --image=IN.png --prompt="..." --out=OUT.png [--lora=FILE] [--model.*=...]``.

    The pipeline's defaults: 50 steps, true CFG (scale 4) only with ``--negative_prompt``, the
    output at the (last) control image's ~1024² size. Edit-Plus takes ``--image=A.png,B.png``. Controls are
    sized as training sizes them (``data.control_size``, ``data.control_max_pixels``; at most ``data.max_pixels``).

    Args:
        prompt: the edit instruction.
        image: the image to edit; Edit-Plus (model.variant: edit_plus) takes 0 to 3, comma-separated.
        out: where the edited image is written (folders are made).
        lora: a LoRA file: diffusers, ComfyUI or kohya format (the files qflux writes, at any width), or a
            DoRA, LoKr or LoHa file qflux wrote.
        seed: seed of the initial noise.
        num_inference_steps: denoising steps.
        height: output height in pixels (default: the last control image's ~1024² size).
        width: output width in pixels (default: the last control image's ~1024² size).
        negative_prompt: with true_cfg_scale > 1, true classifier-free guidance against this prompt.
        true_cfg_scale: the true CFG scale (used with negative_prompt).
    """
    cfg = load_config(QwenImageEditConfig, config, overrides)
    images = _images(image, cfg.model.variant)
    models = _load(cfg, family_folder(cfg, FAMILY), ("transformer", *FAMILY.encoders))
    if lora is not None:
        load_lora_file(models.transformer, lora, naming=FAMILY.naming, pipeline_cls=pipeline_cls())
    result = qwen_predict(models, images, prompt, variant=cfg.model.variant, height=height, width=width,
                          num_inference_steps=num_inference_steps, seed=seed, negative_prompt=negative_prompt,
                          true_cfg_scale=true_cfg_scale,
                          sizing=PAIRS[cfg.model.variant].control.at_inference(cfg.data))  # fmt: skip
    save_image(result, out)


def _plan_target(cfg: QwenImageEditConfig) -> PlanTarget:
    variant = cfg.model.variant
    model = attrs.evolve(plan_model(), **plan_options(cfg))
    return PlanTarget(model, FAMILY.pipeline, ("transformer", *FAMILY.encoders), PAIRS[variant].controls[1],
                      lambda configs, n: text_tokens(configs["text_encoder"], variant, n),
                      PAIRS[variant].control.resolve(cfg.data).max_pixels)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Entry point: no arguments trains the built-in default; errors print one message and exit 2."""
    recipe_main(
        FAMILY,
        train=train,
        cache=cache,
        predict=predict,
        rule=lambda cfg: PAIRS[cfg.model.variant],
        target=_plan_target,
        argv=argv,
    )


if __name__ == "__main__":
    main()
