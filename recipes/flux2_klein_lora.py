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

import torch

from qflux.config.cli import main as cli_main
from qflux.config.parse import load_config
from qflux.data.dataset import collate_pairs
from qflux.data.images import image_arg, save_image
from qflux.data.pairs import PairRule
from qflux.errors import QfluxError
from qflux.lora.adapter import load_lora_file
from qflux.memory.command import PlanTarget, run_plan, warn_if_too_big
from qflux.models.flux2_klein import FAMILY
from qflux.models.flux2_klein import cache as kcache
from qflux.models.flux2_klein.batch import cached_conditioning, encode_conditioning, text_tensors, to_batch
from qflux.models.flux2_klein.conditioning import PromptEmbeds, encode_prompt, vae_decode
from qflux.models.flux2_klein.config import Flux2KleinConfig
from qflux.models.flux2_klein.loaders import Flux2KleinModels, load_flux2_klein
from qflux.models.flux2_klein.loss import make_loss_fn
from qflux.models.flux2_klein.plan import plan_model
from qflux.models.flux2_klein.predict import denoise
from qflux.models.flux2_klein.predict import predict as klein_predict
from qflux.train.batch import Conditioning, DataPath, with_mask
from qflux.train.cache import CacheReport
from qflux.train.cache_path import CachePath, cache_command, cached_data, module_cache
from qflux.train.check import run_check
from qflux.train.driver import decoder, finish, train_loop
from qflux.train.run import ModelOps, Run, RunResult, model_folder, pair_dataset, placements, training_run
from qflux.train.start import announce, attach_lora, first_state
from qflux.weights.dtypes import torch_dtype
from qflux.weights.quantize import storage_by_component

MAX_REFERENCES = 4
PAIRS = PairRule((0, MAX_REFERENCES), "own")
"""0 to 4 reference images per sample, each at its own size (the pipeline's way)."""


def pipeline_cls() -> Any:
    """``Flux2KleinPipeline``: LoRA files are written and read through it."""
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline


def train(cfg: Flux2KleinConfig) -> RunResult:
    """Train a LoRA as configured: the data and model folder are checked, the models load, the LoRA
    is attached, then the loop runs and the outputs are written. SIGINT/SIGTERM save a checkpoint."""
    with training_run(cfg, pipeline=FAMILY.pipeline, components=FAMILY.components, rule=PAIRS, variant=None) as run:
        if run.finished is not None:
            return run.finished
        warn_if_too_big(cfg, _plan_target(cfg), run)
        models, data = _inputs(cfg, run)
        lora0 = attach_lora(models.transformer, cfg, run, naming=FAMILY.naming, pipeline_cls=pipeline_cls())
        loss_fn = make_loss_fn(models.transformer, weighting_scheme=cfg.train.weighting_scheme)
        state = first_state(cfg, run, lora0)
        announce(cfg, run, models, ("transformer", *FAMILY.encoders), state, FAMILY.pipeline)
        load_vae = partial(_load, cfg, run.model_dir, ("vae",))  # from the cache: the VAE only to decode
        decode = decoder(vae_decode, models.vae, lambda: load_vae().vae)
        ops = ModelOps(to_batch, partial(_preview, cfg, models), decode, FAMILY.naming, pipeline_cls())
        state, interrupted, seconds = train_loop(cfg, run, state, data, loss_fn, models, ops)
        return finish(cfg, run, state, lora0, models, data, ops, interrupted, seconds)


def _folder(cfg: Flux2KleinConfig) -> Path:
    return model_folder(cfg.model.pretrained_model_name_or_path, None, FAMILY.components, FAMILY.pipeline)


def _load(cfg: Flux2KleinConfig, path: Path, include: Sequence[str], run: Run | None = None) -> Flux2KleinModels:
    """The ``include``d components on ``devices`` (the transformer on the run's own device)."""
    dtype, quantize = torch_dtype(cfg.model.dtype), storage_by_component(cfg.model)
    return load_flux2_klein(path, dtype, include=include, devices=placements(cfg, run), quantize=quantize)


def _inputs(cfg: Flux2KleinConfig, run: Run) -> tuple[Flux2KleinModels, DataPath]:
    """Training's models and data path: the transformer and the cache, or the encoders as well."""
    if cfg.cache.use_cache:  # the missing entries are computed first, with the encoders
        load_encoders = partial(_load, cfg, run.model_dir, FAMILY.encoders)
        data = cached_data(_cache(cfg, run.model_dir), run, cfg.cache.cache_dir, load_encoders)
        return _load(cfg, run.model_dir, ("transformer",), run), data
    models = _load(cfg, run.model_dir, ("transformer", *FAMILY.encoders), run)
    seq = cfg.model.max_sequence_length
    empty = text_tensors(encode_prompt(models.text_encoder, models.tokenizer, [""], seq))
    encode = with_mask(partial(encode_conditioning, models, max_sequence_length=seq))
    return models, DataPath(pair_dataset(cfg, run.model_dir), collate_pairs, encode, empty)


def _cache(cfg: Flux2KleinConfig, path: Path) -> CachePath:
    """This model's cache of ``cache.cache_dir``, for the folder's encoders and the configured dtype."""
    spec = kcache.cache_spec(path, cfg.model.dtype, cfg.model.max_sequence_length, cfg.train.loss_mask)
    root = Path(cfg.cache.cache_dir)
    return module_cache(
        kcache, spec, root, cached_conditioning, lambda: text_tensors(kcache.read_empty_prompt(spec, root))
    )


def cache(cfg: Flux2KleinConfig) -> CacheReport:
    """Compute the cache entries the configured dataset needs (under torchrun, each rank every
    world-th sample); returns the computed/reused counts."""
    path = _folder(cfg)
    return cache_command(cfg, path, PAIRS, _cache(cfg, path), partial(_load, cfg, path, FAMILY.encoders))


def distilled(path: Path) -> bool:
    """Whether the folder's pipeline is step-distilled (``is_distilled`` in model_index.json: no CFG)."""
    return bool(json.loads((path / "model_index.json").read_text()).get("is_distilled", False))


def _preview(cfg: Flux2KleinConfig, models: Flux2KleinModels, cond: Conditioning, lora: Any,
             steps: int) -> torch.Tensor:  # fmt: skip
    """One sample's conditioning denoised at its target size (no CFG)."""
    return denoise(
        models.transformer,
        models.scheduler.config,
        cond.controls,
        PromptEmbeds(tokens=cond.text["tokens"], ids=cond.text["ids"]),
        None,
        latent_hw=(cond.latents.shape[-2], cond.latents.shape[-1]),
        num_inference_steps=steps,
        guidance_scale=1.0,
        seed=cfg.seed,
        lora=lora,
        noise_dtype=torch_dtype(cfg.model.dtype),
    )


def predict(
    prompt: str,
    image: str | list[str] | None = None,
    out: str = "edited.png",
    lora: str | None = None,
    seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    config: str | None = None,
    **overrides: Any,
) -> None:
    """Edit: ``predict --image=A.png[,B.png] --prompt="..." --out=OUT.png [--lora=FILE] [--model.*=...]``.

    The pipeline's defaults: 50 steps, CFG 4 against the empty prompt (not on a step-distilled
    model), the output at the first reference's size (floored to multiples of 16; 1024² without one).

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
    path = _folder(cfg)
    models = _load(cfg, path, ("transformer", *FAMILY.encoders))
    if lora is not None:
        load_lora_file(models.transformer, lora, naming=FAMILY.naming, pipeline_cls=pipeline_cls())
    scale = cfg.model.guidance_scale if guidance_scale is None else guidance_scale
    try:
        result = klein_predict(models, images, prompt, height=height, width=width, seed=seed,
                               num_inference_steps=num_inference_steps, guidance_scale=scale, distilled=distilled(path),
                               max_sequence_length=cfg.model.max_sequence_length)  # fmt: skip
    except ValueError as e:  # the pipeline's own checks (an image under 64 px)
        raise QfluxError(f"--image: {e}") from None
    save_image(result, out)


def plan(cfg: Flux2KleinConfig, *, vram: float | None, as_json: bool = False, controls: int | None = None) -> int:
    """Print the run's peak GPU memory and its alternatives, planned on fake tensors; returns the
    exit status (0: fits in ``vram`` GiB; 3: does not)."""
    return run_plan(cfg, _plan_target(cfg), partial(_folder, cfg), vram=vram, as_json_output=as_json,
                    controls=controls)  # fmt: skip


def _plan_target(cfg: Flux2KleinConfig) -> PlanTarget:
    seq = cfg.model.max_sequence_length
    return PlanTarget(
        plan_model(), FAMILY.pipeline, ("transformer", *FAMILY.encoders), MAX_REFERENCES, lambda configs, n: seq
    )


def check(cfg: Flux2KleinConfig) -> int:
    """Check the dataset: its errors (exit 2, as train gives them), then a warning per pair that will
    likely train badly; exit 0 when there are only warnings."""
    return run_check(cfg, PAIRS, partial(_folder, cfg))


def main(argv: list[str] | None = None) -> None:
    """Entry point: no arguments trains the built-in default; errors print one message and exit 2."""
    cli_main("flux2_klein_lora", FAMILY.pipeline, FAMILY.config, train=train, cache=cache, predict=predict,
             plan=plan, check=check, argv=argv)  # fmt: skip


if __name__ == "__main__":
    main()
