"""The FLUX.2 LoRA recipes' commands, one set for both variants (:data:`KLEIN_SPEC`, :data:`DEV_SPEC`):
``python -m recipes.flux2_klein_lora`` and ``python -m recipes.flux2_dev_lora``
``[train|cache|predict|plan|check] [--config=F] [...]``.

With no arguments a recipe trains on the built-in default (a tiny random FLUX.2 of its variant and the
synthetic colour-inversion dataset) and writes, under ``logging.output_dir``: the LoRA
(``pytorch_lora_weights.safetensors``, which the variant's pipeline's ``load_lora_weights`` reads),
checkpoints, ``config.yaml``, ``loss.png`` and ``sample.png``.

A sample has 0 to 4 reference images, Edit-Plus's layout: ``control_images/NAME.png``, then
``NAME_control_1.png``, ...; each reference keeps its own size and aspect (the pipeline's way), at
its own position in time (T = 10, 20, ...). A run reads top to bottom in :func:`train`; what every
model shares is :mod:`qflux.train.run` and :mod:`qflux.train.driver`. The variants differ in their prompt
encoder (Qwen3, Mistral Small 3.1) and guidance ([klein]: CFG in predict; [dev]: the guidance-distilled
transformer reads ``model.guidance_scale`` in training, validation and predict).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import torch

from qflux.config.errors import QfluxError
from qflux.config.parse import load_config
from qflux.data.dataset import collate_pairs
from qflux.data.images import image_arg, save_image
from qflux.data.pairs import PairRule
from qflux.diffusion.flow import Objective
from qflux.lora.adapter import load_lora_file
from qflux.memory.command import PlanTarget, recipe_main, warn_if_too_big
from qflux.models.flux2 import DEV_FAMILY, KLEIN_FAMILY
from qflux.models.flux2 import cache as kcache
from qflux.models.flux2.batch import cached_conditioning, encode_conditioning, text_tensors, to_batch
from qflux.models.flux2.conditioning import PromptEmbeds, encode_prompt, vae_decode
from qflux.models.flux2.loaders import DEV, KLEIN, Flux2Models, Variant
from qflux.models.flux2.loss import make_loss_fn
from qflux.models.flux2.plan import plan_model
from qflux.models.flux2.predict import CONTROLS, denoise, training_mu
from qflux.models.flux2.predict import predict as flux2_predict
from qflux.train.batch import Conditioning, DataPath, with_mask
from qflux.train.cache import CacheReport
from qflux.train.cache_path import CachePath, cache_command, cached_data, module_cache
from qflux.train.driver import decoder, train_lora
from qflux.train.family import Family
from qflux.train.options import load_options, plan_options, preview_options
from qflux.train.run import ModelOps, Run, RunResult, family_folder, pair_dataset, training_run

MAX_REFERENCES = 4
PAIRS = PairRule((0, MAX_REFERENCES), CONTROLS)
"""0 to 4 reference images per sample, each at its own size (the pipelines' way)."""

Flux2Config = Any
"""A variant's root config (:class:`~qflux.models.flux2.config.Flux2KleinConfig` or ``Flux2DevConfig``)."""


@attrs.frozen
class Flux2Spec:
    """Which FLUX.2 a recipe trains (a frozen record the commands take): its family record (config, names,
    built-in model) and its model (folder, encoder, pipeline)."""

    family: Family
    variant: Variant


KLEIN_SPEC = Flux2Spec(KLEIN_FAMILY, KLEIN)
"""FLUX.2 [klein]'s recipe (``recipes/flux2_klein_lora.py``)."""
DEV_SPEC = Flux2Spec(DEV_FAMILY, DEV)
"""FLUX.2 [dev]'s recipe (``recipes/flux2_dev_lora.py``).

``model.guidance_scale`` goes to every transformer call; a transformer without a guidance embedding
([klein]'s) ignores it (:func:`qflux.models.flux2.loss.guidance_values`), and predict reads it as [klein]'s CFG
scale."""


def train(r: Flux2Spec, cfg: Flux2Config) -> RunResult:
    """Train a LoRA as configured: the data and model folder are checked, the models load, the LoRA
    is attached, then the loop runs and the outputs are written. SIGINT/SIGTERM save a checkpoint."""
    with training_run(cfg, r.family, PAIRS) as run:
        if run.finished is not None:
            return run.finished
        models, data = _inputs(r, cfg, run)
        return train_lora(cfg, run, r.family, models, data, _ops(r, cfg, run, models))


def _ops(r: Flux2Spec, cfg: Flux2Config, run: Run, models: Flux2Models) -> ModelOps:
    """The model's own functions the shared loop calls: its batch, preview (validation, sample.png),
    decoding (a VAE loaded for the call when training from the cache) and loss."""
    decode = decoder(vae_decode, models.vae, lambda: _load(r, cfg, run.model_dir, ("vae",)).vae)
    loss = partial(make_loss_fn, objective=Objective.from_config(cfg.train), guidance_scale=cfg.model.guidance_scale)
    return ModelOps(to_batch, partial(_preview, r, cfg, models), decode, r.family.naming, r.variant.pipeline_cls(),
                    loss, mu=training_mu)  # fmt: skip


def _load(r: Flux2Spec, cfg: Flux2Config, path: Path, include: Sequence[str], run: Run | None = None) -> Flux2Models:
    """The ``include``d components (the transformer on the run's own device)."""
    return r.variant.files.load(path, include=include, **load_options(cfg, run))


def _inputs(r: Flux2Spec, cfg: Flux2Config, run: Run) -> tuple[Flux2Models, DataPath]:
    """Training's models and data path: the transformer and the cache, or the encoders as well."""
    warn_if_too_big(cfg, _plan_target(r, cfg), run)  # before anything loads (CUDA)
    if cfg.cache.use_cache:  # the missing entries are computed first, with the encoders
        load_encoders = partial(_load, r, cfg, run.model_dir, r.family.encoders)
        data = cached_data(_cache(r, cfg, run.model_dir), run, cfg.cache.cache_dir, load_encoders)
        return _load(r, cfg, run.model_dir, ("transformer",), run), data
    models = _load(r, cfg, run.model_dir, ("transformer", *r.family.encoders), run)
    seq = cfg.model.max_sequence_length
    encode_text = r.variant.text, models.text_encoder, models.tokenizer
    empty = text_tensors(encode_prompt(*encode_text, [""], seq))
    kept = cfg.train.preserve_prompt
    preserve = None if kept is None else text_tensors(encode_prompt(*encode_text, [kept], seq))
    encode = with_mask(partial(encode_conditioning, r.variant.text, models, max_sequence_length=seq))
    return models, DataPath(pair_dataset(cfg, run.model_dir), collate_pairs, encode, empty, preserve)


def _cache(r: Flux2Spec, cfg: Flux2Config, path: Path) -> CachePath:
    """This model's cache of ``cache.cache_dir``, for the folder's encoders and the configured dtype."""
    spec = kcache.cache_spec(r.variant.text, path, cfg.model.dtype, cfg.model.max_sequence_length,
                             cfg.train.loss_mask, cfg.train.preserve_prompt)  # fmt: skip
    root = Path(cfg.cache.cache_dir)

    def preserve() -> dict[str, torch.Tensor] | None:
        kept = kcache.read_preserve_prompt(spec, root)
        return None if kept is None else text_tensors(kept)

    empty = partial(kcache.read_empty_prompt, spec, root)
    return module_cache(kcache, spec, root, cached_conditioning, lambda: text_tensors(empty()), preserve)


def cache(r: Flux2Spec, cfg: Flux2Config) -> CacheReport:
    """Compute the cache entries the configured dataset needs (under torchrun, each rank every
    world-th sample); returns the computed/reused counts."""
    path = family_folder(cfg, r.family)
    return cache_command(cfg, path, PAIRS, _cache(r, cfg, path), partial(_load, r, cfg, path, r.family.encoders))


def distilled(path: Path) -> bool:
    """Whether the folder's pipeline is step-distilled (``is_distilled`` in model_index.json: no CFG)."""
    return bool(json.loads((path / "model_index.json").read_text()).get("is_distilled", False))


def _preview(r: Flux2Spec, cfg: Flux2Config, models: Flux2Models, cond: Conditioning, lora: Any,
             steps: int) -> torch.Tensor:  # fmt: skip
    """One sample's conditioning denoised at its target size (no CFG; [dev] at ``model.guidance_scale``)."""
    text = PromptEmbeds(tokens=cond.text["tokens"], ids=cond.text["ids"])
    options = preview_options(cfg, cond, lora, steps)
    return denoise(models.transformer, models.scheduler.config, cond.controls, text, None,
                   guidance_scale=cfg.model.guidance_scale, **options)  # fmt: skip


def predict_command(r: Flux2Spec) -> Any:
    """The variant's ``predict`` command (its docstring is the command's help)."""

    def predict(prompt: str, image: str | list[str] | None = None, out: str = "edited.png",
                lora: str | None = None, seed: int = 0, num_inference_steps: int = 50,
                guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                config: str | None = None, **overrides: Any) -> None:  # fmt: skip
        """Edit: ``predict --image=A.png[,B.png] --prompt="..." --out=OUT.png [--lora=FILE] [--model.*=...]``.

        The pipeline's defaults: 50 steps; [klein]: CFG 4 against the empty prompt (not on a step-distilled
        model); [dev]: guidance 4 fed to the guidance-distilled transformer; the output at the first reference's
        size (floored to multiples of 16; 1024² without one). References are sized as training sizes them
        (``data.control_size``, ``data.control_max_pixels``).

        Args:
            prompt: the edit instruction.
            image: 0 to 4 reference images, comma-separated.
            out: where the edited image is written (folders are made).
            lora: a LoRA file qflux wrote (any kind), or a diffusers / ComfyUI / kohya LoRA.
            seed: seed of the initial noise.
            num_inference_steps: denoising steps.
            guidance_scale: [klein]'s CFG scale or [dev]'s guidance value (null: model.guidance_scale).
            height: output height in pixels.
            width: output width in pixels.
        """
        _predict(r, prompt, image, out, lora, seed, num_inference_steps, guidance_scale, height, width, config,
                 overrides)  # fmt: skip

    return predict


def _predict(r: Flux2Spec, prompt: str, image: str | list[str] | None, out: str, lora: str | None, seed: int,
             num_inference_steps: int, guidance_scale: float | None, height: int | None, width: int | None,
             config: str | None, overrides: dict[str, Any]) -> None:  # fmt: skip
    """``predict``'s work (:func:`predict_command`)."""
    cfg: Flux2Config = load_config(r.family.config, config, overrides)
    images = image_arg(
        image, PAIRS.controls, f"{r.family.pipeline} takes 0 to {MAX_REFERENCES} images, comma-separated,"
    )
    path = family_folder(cfg, r.family)
    models = _load(r, cfg, path, ("transformer", *r.family.encoders))
    if lora is not None:
        load_lora_file(models.transformer, lora, naming=r.family.naming, pipeline_cls=r.variant.pipeline_cls())
    scale = cfg.model.guidance_scale if guidance_scale is None else guidance_scale
    try:
        result = flux2_predict(models, r.variant.text, images, prompt, height=height, width=width, seed=seed,
                               num_inference_steps=num_inference_steps, guidance_scale=scale, distilled=distilled(path),
                               max_sequence_length=cfg.model.max_sequence_length,
                               sizing=PAIRS.control.at_inference(cfg.data))  # fmt: skip
    except ValueError as e:  # the pipeline's own checks (an image under 64 px)
        raise QfluxError(f"--image: {e}") from None
    save_image(result, out)


def _plan_target(r: Flux2Spec, cfg: Flux2Config) -> PlanTarget:
    seq = cfg.model.max_sequence_length
    return PlanTarget(
        attrs.evolve(plan_model(r.variant, cfg.model.guidance_scale), **plan_options(cfg)),
        r.family.pipeline,
        ("transformer", *r.family.encoders),
        MAX_REFERENCES,
        lambda configs, n: seq,
        PAIRS.control.resolve(cfg.data).max_pixels,
    )


def main(r: Flux2Spec, argv: list[str] | None = None) -> None:
    """Entry point: no arguments trains the built-in default; errors print one message and exit 2."""
    recipe_main(r.family, train=partial(train, r), cache=partial(cache, r), predict=predict_command(r),
                rule=lambda _: PAIRS, target=partial(_plan_target, r), argv=argv)  # fmt: skip
