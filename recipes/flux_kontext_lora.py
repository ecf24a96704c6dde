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

import torch

from qflux.config.cli import main as cli_main
from qflux.config.parse import load_config
from qflux.data.dataset import collate_pairs
from qflux.data.images import load_rgb, save_image
from qflux.data.pairs import PairRule
from qflux.errors import QfluxError
from qflux.lora.adapter import load_lora_file
from qflux.memory.command import PlanTarget, run_plan, warn_if_too_big
from qflux.models.flux_kontext import FAMILY
from qflux.models.flux_kontext import cache as kcache
from qflux.models.flux_kontext.batch import cached_conditioning, encode_conditioning, text_tensors, to_batch
from qflux.models.flux_kontext.conditioning import PromptEmbeds, encode_prompt_with, vae_decode
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.models.flux_kontext.loaders import FluxKontextModels, load_flux_kontext
from qflux.models.flux_kontext.loss import make_loss_fn
from qflux.models.flux_kontext.plan import plan_model
from qflux.models.flux_kontext.predict import denoise
from qflux.models.flux_kontext.predict import predict as kontext_predict
from qflux.train.batch import Conditioning, DataPath, with_mask
from qflux.train.cache import CacheReport
from qflux.train.cache_path import CachePath, cache_command, cached_data, module_cache
from qflux.train.check import run_check
from qflux.train.driver import decoder, finish, train_loop
from qflux.train.run import ModelOps, Run, RunResult, model_folder, pair_dataset, placements, training_run
from qflux.train.start import announce, attach_lora, first_state
from qflux.weights.dtypes import torch_dtype
from qflux.weights.quantize import storage_by_component

PAIRS = PairRule((1, 1), "target")
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
    with training_run(cfg, pipeline=FAMILY.pipeline, components=FAMILY.components, rule=PAIRS, variant=None) as run:
        if run.finished is not None:
            return run.finished
        warn_if_too_big(cfg, _plan_target(cfg), run)
        models, data = _inputs(cfg, run)
        lora0 = attach_lora(models.transformer, cfg, run, naming=FAMILY.naming, pipeline_cls=pipeline_cls())
        loss_fn = make_loss_fn(
            models.transformer, guidance_scale=cfg.model.guidance_scale, weighting_scheme=cfg.train.weighting_scheme
        )
        state = first_state(cfg, run, lora0)
        announce(cfg, run, models, ("transformer", *FAMILY.encoders), state, FAMILY.pipeline)
        load_vae = partial(_load, cfg, run.model_dir, ("vae",))  # from the cache: the VAE only to decode
        decode = decoder(vae_decode, models.vae, lambda: load_vae().vae)
        ops = ModelOps(to_batch, partial(_preview, cfg, models), decode, FAMILY.naming, pipeline_cls())
        state, interrupted, seconds = train_loop(cfg, run, state, data, loss_fn, models, ops)
        return finish(cfg, run, state, lora0, models, data, ops, interrupted, seconds)


def _load(cfg: FluxKontextConfig, path: Path, include: Sequence[str], run: Run | None = None) -> FluxKontextModels:
    """The ``include``d components on ``devices`` (the transformer on the run's own device)."""
    dtype, quantize = torch_dtype(cfg.model.dtype), storage_by_component(cfg.model)
    return load_flux_kontext(path, dtype, include=include, devices=placements(cfg, run), quantize=quantize)


def _inputs(cfg: FluxKontextConfig, run: Run) -> tuple[FluxKontextModels, DataPath]:
    """Training's models and data path: the transformer and the cache, or every encoder as well."""
    if cfg.cache.use_cache:  # the missing entries are computed first, with the encoders
        load_encoders = partial(_load, cfg, run.model_dir, FAMILY.encoders)
        data = cached_data(_cache(cfg, run.model_dir), run, cfg.cache.cache_dir, load_encoders)
        return _load(cfg, run.model_dir, ("transformer",), run), data
    models = _load(cfg, run.model_dir, ("transformer", *FAMILY.encoders), run)
    seq = cfg.model.max_sequence_length
    empty = text_tensors(encode_prompt_with(models, [""], seq))
    encode = with_mask(partial(encode_conditioning, models, max_sequence_length=seq))
    return models, DataPath(pair_dataset(cfg, run.model_dir), collate_pairs, encode, empty)


def _cache(cfg: FluxKontextConfig, path: Path) -> CachePath:
    """This model's cache of ``cache.cache_dir``, for the folder's encoders and the configured dtype."""
    spec = kcache.cache_spec(path, cfg.model.dtype, cfg.model.max_sequence_length, cfg.train.loss_mask)
    root = Path(cfg.cache.cache_dir)
    return module_cache(
        kcache, spec, root, cached_conditioning, lambda: text_tensors(kcache.read_empty_prompt(spec, root))
    )


def _preview(
    cfg: FluxKontextConfig, models: FluxKontextModels, cond: Conditioning, lora: Any, steps: int
) -> torch.Tensor:
    """One sample's conditioning denoised at its target size (the training guidance, no true CFG)."""
    return denoise(
        models.transformer,
        models.scheduler.config,
        cond.controls[0] if cond.controls else None,
        PromptEmbeds(pooled=cond.text["pooled"], tokens=cond.text["tokens"]),
        None,
        latent_hw=(cond.latents.shape[-2], cond.latents.shape[-1]),
        num_inference_steps=steps,
        guidance_scale=cfg.model.guidance_scale,
        seed=cfg.seed,
        lora=lora,
        noise_dtype=torch_dtype(cfg.model.dtype),
    )


def cache(cfg: FluxKontextConfig) -> CacheReport:
    """Compute the cache entries the configured dataset needs (under torchrun, each rank every
    world-th sample); returns the computed/reused counts."""
    path = model_folder(cfg.model.pretrained_model_name_or_path, None, FAMILY.components, FAMILY.pipeline)
    return cache_command(cfg, path, PAIRS, _cache(cfg, path), partial(_load, cfg, path, FAMILY.encoders))


def predict(
    image: str,
    prompt: str,
    out: str = "edited.png",
    lora: str | None = None,
    seed: int = 0,
    num_inference_steps: int = 28,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    true_cfg_scale: float = 1.0,
    config: str | None = None,
    **overrides: Any,
) -> None:
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
        height: output height in pixels (default: the image's, floored to the model's multiple).
        width: output width in pixels (default: the image's, floored to the model's multiple).
        negative_prompt: with true_cfg_scale > 1, true classifier-free guidance against this prompt.
        true_cfg_scale: the true CFG scale (used with negative_prompt).
    """
    cfg = load_config(FluxKontextConfig, config, overrides)
    if not Path(image).is_file():
        raise QfluxError(f"input image '{image}' does not exist; pass --image=PATH")
    path = model_folder(cfg.model.pretrained_model_name_or_path, None, FAMILY.components, FAMILY.pipeline)
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
        max_sequence_length=cfg.model.max_sequence_length,
    )
    save_image(result, out)


def _plan_target(cfg: FluxKontextConfig) -> PlanTarget:
    return PlanTarget(plan_model(cfg.model.guidance_scale), FAMILY.pipeline, ("transformer", *FAMILY.encoders), 1,
                      lambda configs, n: cfg.model.max_sequence_length)  # fmt: skip


def plan(cfg: FluxKontextConfig, *, vram: float | None, as_json: bool = False, controls: int | None = None) -> int:
    """Print the run's peak GPU memory and its alternatives, planned on fake tensors; returns the
    exit status (0: fits in ``vram`` GiB; 3: does not)."""
    return run_plan(cfg, _plan_target(cfg), partial(_folder, cfg), vram=vram, as_json_output=as_json,
                    controls=controls)  # fmt: skip


def _folder(cfg: FluxKontextConfig) -> Path:
    return model_folder(cfg.model.pretrained_model_name_or_path, None, FAMILY.components, FAMILY.pipeline)


def check(cfg: FluxKontextConfig) -> int:
    """Check the dataset: its errors (exit 2, as train gives them), then a warning per pair that will
    likely train badly (a target moved or re-framed against its control, identical to it, of another
    aspect; a too-short instruction); exit 0 when there are only warnings."""
    return run_check(cfg, PAIRS, partial(_folder, cfg))


def main(argv: list[str] | None = None) -> None:
    """Entry point: no arguments trains the built-in default; errors print one message and exit 2."""
    cli_main("flux_kontext_lora", FAMILY.pipeline, FAMILY.config, train=train, cache=cache, predict=predict,
             plan=plan, check=check, argv=argv)  # fmt: skip


if __name__ == "__main__":
    main()
