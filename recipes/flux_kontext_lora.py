"""FLUX.1 Kontext LoRA: ``python -m recipes.flux_kontext_lora [train|cache|predict] [--config=F] [--a.b=c ...]``.

With no arguments it trains on the built-in default (a tiny random model and a synthetic
colour-inversion dataset) and writes, under ``logging.output_dir``: the LoRA
(``pytorch_lora_weights.safetensors``, diffusers format, and ``..._comfyui.safetensors``),
checkpoints, ``config.yaml``, ``loss.png`` and ``sample.png`` (control | target | before | after).

``cache`` fills the embedding cache; ``train`` with ``cache.use_cache=true`` then loads only the
transformer. A run reads top to bottom in :func:`train`: the model's own steps are here, what every
model shares is :mod:`qflux.train.run` and :mod:`qflux.train.driver`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import torch

from qflux.config.errors import QfluxError
from qflux.config.parse import load_config
from qflux.data.controls import ControlRule
from qflux.data.dataset import collate_pairs
from qflux.data.images import load_rgb, save_image
from qflux.data.pairs import PairRule
from qflux.diffusion.flow import Objective
from qflux.lora.adapter import load_lora_file
from qflux.memory.command import PlanTarget, recipe_main, warn_if_too_big
from qflux.models.flux_kontext import FAMILY
from qflux.models.flux_kontext import cache as kcache
from qflux.models.flux_kontext.batch import cached_conditioning, encode_conditioning, text_tensors, to_batch
from qflux.models.flux_kontext.conditioning import (
    PromptEmbeds,
    encode_prompt_with,
    long_prompts,
    text_length,
    vae_decode,
)
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.models.flux_kontext.loaders import FluxKontextModels, load_flux_kontext
from qflux.models.flux_kontext.loss import make_loss_fn
from qflux.models.flux_kontext.plan import plan_model
from qflux.models.flux_kontext.predict import denoise
from qflux.models.flux_kontext.predict import predict as kontext_predict
from qflux.train.batch import Conditioning, DataPath, with_mask
from qflux.train.cache import CacheReport
from qflux.train.cache_path import CachePath, cache_command, cached_data, module_cache
from qflux.train.driver import decoder, train_lora
from qflux.train.options import load_options, plan_options, preview_options
from qflux.train.run import ModelOps, Run, RunResult, family_folder, pair_dataset, training_run

PAIRS = PairRule((1, 1), ControlRule("target"))
"""One control image per sample, sized like its target's bucket (the pipeline gives the output the
control's size)."""


def pipeline_cls() -> Any:
    """``FluxKontextPipeline``: LoRA files are written and read through it."""
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline


def train(cfg: FluxKontextConfig) -> RunResult:
    """Train a LoRA as configured: the data and model folder are checked, the models load (the
    transformer and the encoders, or the cache), the LoRA is attached, then the loop runs and the
    outputs are written. SIGINT/SIGTERM save a checkpoint and return early."""
    with training_run(cfg, FAMILY, PAIRS) as run:
        if run.finished is not None:
            return run.finished
        _warn_long_prompts(cfg, run)
        models, data = _inputs(cfg, run)
        return train_lora(cfg, run, FAMILY, models, data, _ops(cfg, run, models))


def _warn_long_prompts(cfg: FluxKontextConfig, run: Run) -> None:
    """Say which instructions are longer than the T5 tokens the model reads (they would be cut), and the key."""
    seq = text_length(cfg.model.max_sequence_length, run.model_dir)
    tokenizer = _load(cfg, run.model_dir, ()).tokenizer_2  # the tokenizers and scheduler, no weights
    long = long_prompts(tokenizer, [(s.name, s.prompt) for s in run.samples], seq)
    if long and run.world.is_main:
        named = ", ".join(f"{name} ({n} tokens)" for name, n in long[:3]) + (", ..." if len(long) > 3 else "")
        print(f"warning: {len(long)} instruction(s) are longer than the {seq} T5 tokens the model reads, so their "
              f"ends are cut: {named}; set model.max_sequence_length (up to 512) to keep them whole")  # fmt: skip


def _ops(cfg: FluxKontextConfig, run: Run, models: FluxKontextModels) -> ModelOps:
    """The model's own functions the shared loop calls: its batch, preview (validation, sample.png),
    decoding (a VAE loaded for the call when training from the cache) and loss."""
    decode = decoder(vae_decode, models.vae, lambda: _load(cfg, run.model_dir, ("vae",)).vae)
    guidance = cfg.model.guidance_scale
    loss = partial(make_loss_fn, objective=Objective.from_config(cfg.train), guidance_scale=guidance)
    return ModelOps(to_batch, partial(_preview, cfg, models), decode, FAMILY.naming, pipeline_cls(), loss)


def _load(cfg: FluxKontextConfig, path: Path, include: Sequence[str], run: Run | None = None) -> FluxKontextModels:
    """The ``include``d components (the transformer on the run's own device)."""
    return load_flux_kontext(path, include=include, **load_options(cfg, run))


def _inputs(cfg: FluxKontextConfig, run: Run) -> tuple[FluxKontextModels, DataPath]:
    """Training's models and data path: the transformer and the cache, or every encoder as well."""
    warn_if_too_big(cfg, _plan_target(cfg), run)  # before anything loads (CUDA)
    if cfg.cache.use_cache:  # the missing entries are computed first, with the encoders
        load_encoders = partial(_load, cfg, run.model_dir, FAMILY.encoders)
        data = cached_data(_cache(cfg, run.model_dir), run, cfg.cache.cache_dir, load_encoders)
        return _load(cfg, run.model_dir, ("transformer",), run), data
    models = _load(cfg, run.model_dir, ("transformer", *FAMILY.encoders), run)
    seq = text_length(cfg.model.max_sequence_length, run.model_dir)
    empty = text_tensors(encode_prompt_with(models, [""], seq))
    kept = cfg.train.preserve_prompt
    preserve = None if kept is None else text_tensors(encode_prompt_with(models, [kept], seq))
    encode = with_mask(partial(encode_conditioning, models, max_sequence_length=seq))
    return models, DataPath(pair_dataset(cfg, run.model_dir), collate_pairs, encode, empty, preserve)


def _cache(cfg: FluxKontextConfig, path: Path) -> CachePath:
    """This model's cache of ``cache.cache_dir``, for the folder's encoders and the configured dtype."""
    seq = text_length(cfg.model.max_sequence_length, path)
    spec = kcache.cache_spec(path, cfg.model.dtype, seq, cfg.train.loss_mask, cfg.train.preserve_prompt)
    root = Path(cfg.cache.cache_dir)

    def preserve() -> dict[str, torch.Tensor] | None:
        kept = kcache.read_preserve_prompt(spec, root)
        return None if kept is None else text_tensors(kept)

    empty = partial(kcache.read_empty_prompt, spec, root)
    return module_cache(kcache, spec, root, cached_conditioning, lambda: text_tensors(empty()), preserve)


def _preview(
    cfg: FluxKontextConfig, models: FluxKontextModels, cond: Conditioning, lora: Any, steps: int
) -> torch.Tensor:
    """One sample's conditioning denoised at its target size (the training guidance, no true CFG)."""
    control = cond.controls[0] if cond.controls else None
    text = PromptEmbeds(pooled=cond.text["pooled"], tokens=cond.text["tokens"])
    options = preview_options(cfg, cond, lora, steps)
    transformer, scheduler = models.transformer, models.scheduler.config
    return denoise(transformer, scheduler, control, text, None, guidance_scale=cfg.model.guidance_scale, **options)


def cache(cfg: FluxKontextConfig) -> CacheReport:
    """Compute the cache entries the configured dataset needs (under torchrun, each rank every
    world-th sample); returns the computed/reused counts."""
    path = family_folder(cfg, FAMILY)
    return cache_command(cfg, path, PAIRS, _cache(cfg, path), partial(_load, cfg, path, FAMILY.encoders))


def predict(image: str, prompt: str, out: str = "edited.png", lora: str | None = None, seed: int = 0,
            num_inference_steps: int = 28, guidance_scale: float | None = None, height: int | None = None,
            width: int | None = None, negative_prompt: str | None = None, true_cfg_scale: float = 1.0,
            config: str | None = None, **overrides: Any) -> None:  # fmt: skip
    """Edit one image: ``predict --image=IN.png --prompt="..." --out=OUT.png [--lora=FILE] [--model.*=...]``.

    Args:
        image: the image to edit (PNG, JPEG or WebP).
        prompt: the edit instruction.
        out: where the edited image is written (folders are made).
        lora: a LoRA file: diffusers, ComfyUI or kohya format (the files qflux writes, at any width), or a
            DoRA, LoKr or LoHa file qflux wrote.
        seed: seed of the initial noise.
        num_inference_steps: denoising steps.
        guidance_scale: the guidance value fed to the guidance-distilled transformer (null: model.guidance_scale).
        height: output height in pixels (default: the image's, floored to the model's multiple); the control is
            sized as training sizes it (``data.control_size``, ``data.control_max_pixels``).
        width: output width in pixels (default: the image's, floored to the model's multiple).
        negative_prompt: with true_cfg_scale > 1, true classifier-free guidance against this prompt.
        true_cfg_scale: the true CFG scale (used with negative_prompt).
    """
    cfg = load_config(FluxKontextConfig, config, overrides)
    if not Path(image).is_file():
        raise QfluxError(f"input image '{image}' does not exist; pass --image=PATH")
    path = family_folder(cfg, FAMILY)
    models = _load(cfg, path, ("transformer", *FAMILY.encoders))
    if lora is not None:
        load_lora_file(models.transformer, lora, naming=FAMILY.naming, pipeline_cls=pipeline_cls())
    result = kontext_predict(
        models,
        load_rgb(Path(image)),
        prompt,
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=cfg.model.guidance_scale if guidance_scale is None else guidance_scale,
        seed=seed,
        negative_prompt=negative_prompt,
        true_cfg_scale=true_cfg_scale,
        max_sequence_length=text_length(cfg.model.max_sequence_length, path),
        control=PAIRS.control.at_inference(cfg.data),
    )
    save_image(result, out)


def _plan_target(cfg: FluxKontextConfig) -> PlanTarget:
    """The plan's model, components and prompt length (a local folder's tokenizer's, else FLUX.1's 512)."""
    named = Path(cfg.model.pretrained_model_name_or_path)
    seq = text_length(cfg.model.max_sequence_length, named if named.is_dir() else None)
    model = attrs.evolve(plan_model(cfg.model.guidance_scale), **plan_options(cfg))
    return PlanTarget(model, FAMILY.pipeline, ("transformer", *FAMILY.encoders), 1,
                      lambda configs, n: seq, PAIRS.control.resolve(cfg.data).max_pixels)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Entry point: no arguments trains the built-in default; errors print one message and exit 2."""
    recipe_main(FAMILY, train=train, cache=cache, predict=predict, rule=lambda _: PAIRS, target=_plan_target, argv=argv)


if __name__ == "__main__":
    main()
