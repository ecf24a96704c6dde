"""FLUX.2 [klein] LoRA: ``python -m recipes.flux2_klein_lora [train|cache|predict|plan|check] [--config=F] [...]``.

With no arguments it trains on the built-in default (a tiny random FLUX.2 [klein] and the synthetic
colour-inversion dataset) and writes, under ``logging.output_dir``: the LoRA
(``pytorch_lora_weights.safetensors``, which ``Flux2KleinPipeline.load_lora_weights`` reads),
checkpoints, ``config.yaml``, ``loss.png`` and ``sample.png``.

A sample has 0 to 4 reference images, Edit-Plus's layout: ``control_images/NAME.png``, then
``NAME_control_1.png``, ...; each reference keeps its own size and aspect (the pipeline's way), at
its own position in time (T = 10, 20, ...). A run reads top to bottom in :func:`train`; what every
model shares is :mod:`qflux.train.run` and :mod:`qflux.train.driver`.
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
from qflux.models.flux2_klein import FAMILY
from qflux.models.flux2_klein import cache as kcache
from qflux.models.flux2_klein.batch import cached_conditioning, encode_conditioning, text_tensors, to_batch
from qflux.models.flux2_klein.conditioning import PromptEmbeds, encode_prompt, vae_decode
from qflux.models.flux2_klein.config import Flux2KleinConfig
from qflux.models.flux2_klein.loaders import Flux2KleinModels, load_flux2_klein
from qflux.models.flux2_klein.loss import make_loss_fn
from qflux.models.flux2_klein.plan import plan_model
from qflux.models.flux2_klein.predict import CONTROLS, denoise, training_mu
from qflux.models.flux2_klein.predict import predict as klein_predict
from qflux.train.batch import Conditioning, DataPath, with_mask
from qflux.train.cache import CacheReport
from qflux.train.cache_path import CachePath, cache_command, cached_data, module_cache
from qflux.train.driver import decoder, train_lora
from qflux.train.options import load_options, plan_options, preview_options
from qflux.train.run import ModelOps, Run, RunResult, family_folder, pair_dataset, training_run

MAX_REFERENCES = 4
PAIRS = PairRule((0, MAX_REFERENCES), CONTROLS)
"""0 to 4 reference images per sample, each at its own size (the pipeline's way)."""


def pipeline_cls() -> Any:
    """``Flux2KleinPipeline``: LoRA files are written and read through it."""
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline


def train(cfg: Flux2KleinConfig) -> RunResult:
    """Train a LoRA as configured: the data and model folder are checked, the models load, the LoRA
    is attached, then the loop runs and the outputs are written. SIGINT/SIGTERM save a checkpoint."""
    with training_run(cfg, FAMILY, PAIRS) as run:
        if run.finished is not None:
            return run.finished
        models, data = _inputs(cfg, run)
        return train_lora(cfg, run, FAMILY, models, data, _ops(cfg, run, models))


def _ops(cfg: Flux2KleinConfig, run: Run, models: Flux2KleinModels) -> ModelOps:
    """The model's own functions the shared loop calls: its batch, preview (validation, sample.png),
    decoding (a VAE loaded for the call when training from the cache) and loss."""
    decode = decoder(vae_decode, models.vae, lambda: _load(cfg, run.model_dir, ("vae",)).vae)
    loss = partial(make_loss_fn, objective=Objective.from_config(cfg.train))
    return ModelOps(to_batch, partial(_preview, cfg, models), decode, FAMILY.naming, pipeline_cls(), loss,
                    mu=training_mu)  # fmt: skip


def _load(cfg: Flux2KleinConfig, path: Path, include: Sequence[str], run: Run | None = None) -> Flux2KleinModels:
    """The ``include``d components (the transformer on the run's own device)."""
    return load_flux2_klein(path, include=include, **load_options(cfg, run))


def _inputs(cfg: Flux2KleinConfig, run: Run) -> tuple[Flux2KleinModels, DataPath]:
    """Training's models and data path: the transformer and the cache, or the encoders as well."""
    warn_if_too_big(cfg, _plan_target(cfg), run)  # before anything loads (CUDA)
    if cfg.cache.use_cache:  # the missing entries are computed first, with the encoders
        load_encoders = partial(_load, cfg, run.model_dir, FAMILY.encoders)
        data = cached_data(_cache(cfg, run.model_dir), run, cfg.cache.cache_dir, load_encoders)
        return _load(cfg, run.model_dir, ("transformer",), run), data
    models = _load(cfg, run.model_dir, ("transformer", *FAMILY.encoders), run)
    seq = cfg.model.max_sequence_length
    empty = text_tensors(encode_prompt(models.text_encoder, models.tokenizer, [""], seq))
    kept = cfg.train.preserve_prompt
    preserve = None if kept is None else text_tensors(encode_prompt(models.text_encoder, models.tokenizer, [kept], seq))
    encode = with_mask(partial(encode_conditioning, models, max_sequence_length=seq))
    return models, DataPath(pair_dataset(cfg, run.model_dir), collate_pairs, encode, empty, preserve)


def _cache(cfg: Flux2KleinConfig, path: Path) -> CachePath:
    """This model's cache of ``cache.cache_dir``, for the folder's encoders and the configured dtype."""
    spec = kcache.cache_spec(path, cfg.model.dtype, cfg.model.max_sequence_length, cfg.train.loss_mask,
                             cfg.train.preserve_prompt)  # fmt: skip
    root = Path(cfg.cache.cache_dir)

    def preserve() -> dict[str, torch.Tensor] | None:
        kept = kcache.read_preserve_prompt(spec, root)
        return None if kept is None else text_tensors(kept)

    empty = partial(kcache.read_empty_prompt, spec, root)
    return module_cache(kcache, spec, root, cached_conditioning, lambda: text_tensors(empty()), preserve)


def cache(cfg: Flux2KleinConfig) -> CacheReport:
    """Compute the cache entries the configured dataset needs (under torchrun, each rank every
    world-th sample); returns the computed/reused counts."""
    path = family_folder(cfg, FAMILY)
    return cache_command(cfg, path, PAIRS, _cache(cfg, path), partial(_load, cfg, path, FAMILY.encoders))


def distilled(path: Path) -> bool:
    """Whether the folder's pipeline is step-distilled (``is_distilled`` in model_index.json: no CFG)."""
    return bool(json.loads((path / "model_index.json").read_text()).get("is_distilled", False))


def _preview(cfg: Flux2KleinConfig, models: Flux2KleinModels, cond: Conditioning, lora: Any,
             steps: int) -> torch.Tensor:  # fmt: skip
    """One sample's conditioning denoised at its target size (no CFG)."""
    text = PromptEmbeds(tokens=cond.text["tokens"], ids=cond.text["ids"])
    options = preview_options(cfg, cond, lora, steps)
    return denoise(
        models.transformer, models.scheduler.config, cond.controls, text, None, guidance_scale=1.0, **options
    )


def predict(prompt: str, image: str | list[str] | None = None, out: str = "edited.png",
            lora: str | None = None, seed: int = 0, num_inference_steps: int = 50,
            guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
            config: str | None = None, **overrides: Any) -> None:  # fmt: skip
    """Edit: ``predict --image=A.png[,B.png] --prompt="..." --out=OUT.png [--lora=FILE] [--model.*=...]``.

    The pipeline's defaults: 50 steps, CFG 4 against the empty prompt (not on a step-distilled
    model), the output at the first reference's size (floored to multiples of 16; 1024² without one).
    References are sized as training sizes them (``data.control_size``, ``data.control_max_pixels``).

    Args:
        prompt: the edit instruction.
        image: 0 to 4 reference images, comma-separated.
        out: where the edited image is written (folders are made).
        lora: a LoRA file qflux wrote (any kind), or a diffusers / ComfyUI / kohya LoRA.
        seed: seed of the initial noise.
        num_inference_steps: denoising steps.
        guidance_scale: the CFG scale (null: model.guidance_scale).
        height: output height in pixels.
        width: output width in pixels.
    """
    cfg = load_config(Flux2KleinConfig, config, overrides)
    images = image_arg(image, PAIRS.controls, f"FLUX.2 [klein] takes 0 to {MAX_REFERENCES} images, comma-separated,")
    path = family_folder(cfg, FAMILY)
    models = _load(cfg, path, ("transformer", *FAMILY.encoders))
    if lora is not None:
        load_lora_file(models.transformer, lora, naming=FAMILY.naming, pipeline_cls=pipeline_cls())
    scale = cfg.model.guidance_scale if guidance_scale is None else guidance_scale
    try:
        result = klein_predict(models, images, prompt, height=height, width=width, seed=seed,
                               num_inference_steps=num_inference_steps, guidance_scale=scale, distilled=distilled(path),
                               max_sequence_length=cfg.model.max_sequence_length,
                               sizing=PAIRS.control.at_inference(cfg.data))  # fmt: skip
    except ValueError as e:  # the pipeline's own checks (an image under 64 px)
        raise QfluxError(f"--image: {e}") from None
    save_image(result, out)


def _plan_target(cfg: Flux2KleinConfig) -> PlanTarget:
    seq = cfg.model.max_sequence_length
    return PlanTarget(
        attrs.evolve(plan_model(), **plan_options(cfg)),
        FAMILY.pipeline,
        ("transformer", *FAMILY.encoders),
        MAX_REFERENCES,
        lambda configs, n: seq,
        PAIRS.control.resolve(cfg.data).max_pixels,
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point: no arguments trains the built-in default; errors print one message and exit 2."""
    recipe_main(FAMILY, train=train, cache=cache, predict=predict, rule=lambda _: PAIRS, target=_plan_target, argv=argv)


if __name__ == "__main__":
    main()
