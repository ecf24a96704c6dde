"""FLUX.1 Kontext LoRA: ``python -m recipes.flux_kontext_lora [train|cache|predict] [--config=F] [--a.b=c ...]``.

With no arguments it trains on the built-in default (a tiny random model and a synthetic
colour-inversion dataset) and writes, under ``logging.output_dir``: the LoRA
(``pytorch_lora_weights.safetensors``, diffusers format), ``config.yaml``, ``loss.png`` and
``sample.png`` (control | target | before | after).

``cache`` fills the embedding cache; ``train`` with ``cache.use_cache=true`` then loads only the
transformer. The recipe is parse → build → loop → save; the maths lives in ``qflux``.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import torch
import yaml
from tqdm import tqdm

from qflux.builtin import resolve_dataset_path, resolve_model_path
from qflux.config import FluxKontextConfig
from qflux.config_parse import load_config, to_dict
from qflux.console import quiet_known_warnings
from qflux.data import PairDataset, PairSample, batch_stream, collate_pairs, load_rgb, scan_pairs
from qflux.devices import resolve_device
from qflux.errors import QfluxError
from qflux.flux_kontext import cache as kcache
from qflux.flux_kontext.batch import assemble_batch, cached_conditioning, encode_conditioning
from qflux.flux_kontext.conditioning import encode_prompt_with
from qflux.flux_kontext.loaders import COMPONENTS, PIPELINE, FluxKontextModels, load_flux_kontext, torch_dtype
from qflux.flux_kontext.predict import predict as kontext_predict
from qflux.flux_kontext.predict import to_pil
from qflux.flux_kontext.step import make_loss_fn
from qflux.lora import inject_lora, load_lora_file, save_lora
from qflux.model_dir import resolve_model_dir
from qflux.plots import save_image_row, save_loss_curve
from qflux.schedules import learning_rate
from qflux.train_state import StepHParams, TrainState, init_train_state, train_step

LOG_EVERY = 10  # optimizer steps between progress-bar updates of the mean loss (the only host syncs)
ENCODERS = ("vae", "text_encoder", "text_encoder_2")


@attrs.frozen(eq=False)
class RunResult:
    """What a finished training run hands back to an in-process caller (tests, notebooks)."""

    config: FluxKontextConfig
    state: TrainState
    initial_lora: dict[str, torch.Tensor]
    losses: list[float]
    step_seconds: list[float]
    """Wall time of each optimizer step, batch preparation included."""
    models: FluxKontextModels
    lora_path: Path


def _pipeline_cls() -> Any:
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline


def _model_dir(cfg: FluxKontextConfig) -> Path:
    return resolve_model_dir(resolve_model_path(cfg.model.pretrained_model_name_or_path), COMPONENTS, pipeline=PIPELINE)


def _samples(cfg: FluxKontextConfig) -> list[PairSample]:
    """The checked dataset (before any model loads)."""
    root = resolve_dataset_path(cfg.data.dataset_path)
    return scan_pairs(root, cfg.data.max_pixels, skip_invalid=cfg.data.skip_invalid, warn=tqdm.write)


def _devices(section: Any, prefix: str, names: dict[str, str]) -> dict[str, torch.device]:
    """{component: device} from config keys ``names[component]`` of ``section``."""
    return {comp: resolve_device(getattr(section, key), key=f"{prefix}.{key}") for comp, key in names.items()}


def run(cfg: FluxKontextConfig) -> RunResult:
    """Train a LoRA as configured and write the outputs; returns the final state and losses."""
    out, tr, opt, sch = Path(cfg.logging.output_dir), cfg.train, cfg.optimizer, cfg.lr_scheduler
    samples = _samples(cfg)
    path, dtype, seq = _model_dir(cfg), torch_dtype(cfg.model.dtype), cfg.model.max_sequence_length
    device = resolve_device(tr.device, key="train.device")
    if cfg.cache.use_cache:
        root = Path(cfg.cache.cache_dir)
        spec = kcache.cache_spec(path, cfg.model.dtype, seq)
        entries = kcache.sample_entries(spec, root, samples)
        problems = kcache.verify_cache(spec, root, entries)
        if problems:
            # computed now with the encoders, which are freed before the transformer loads
            print(f"cache '{root}': {len(problems)} entries missing or corrupt (first: {problems[0]}); computing them")
            _fill(cfg, samples, path)
        models = load_flux_kontext(path, dtype, include=("transformer",), devices={"transformer": device})
        empty = kcache.read_empty_prompt(spec, root)
        dataset, collate, to_cond = kcache.CachedPairDataset(entries), kcache.collate_cached, cached_conditioning
    else:
        names = {
            "vae": "vae_encoder_device",
            "text_encoder": "text_encoder_device",
            "text_encoder_2": "text_encoder_2_device",
        }
        models = load_flux_kontext(path, dtype, devices={"transformer": device, **_devices(tr, "train", names)})
        empty = encode_prompt_with(models, [""], seq)
        dataset, collate = PairDataset(samples), collate_pairs
        to_cond = partial(encode_conditioning, models, max_sequence_length=seq)
    transformer = models.transformer
    if tr.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    lora0 = inject_lora(transformer, cfg.model.lora, seed=cfg.seed)
    state = init_train_state({k: v.to(device) for k, v in lora0.items()}, cfg.seed)
    loss_fn = make_loss_fn(transformer, guidance_scale=tr.guidance_scale, weighting_scheme=tr.weighting_scheme)
    hp = StepHParams(
        betas=opt.betas,
        eps=opt.eps,
        weight_decay=opt.weight_decay,
        max_grad_norm=tr.max_grad_norm,
        engine="autograd" if tr.gradient_checkpointing else "func",
    )
    stream = batch_stream(
        dataset,
        samples,
        cfg.data.batch_size,
        seed=cfg.seed,
        shuffle=cfg.data.shuffle,
        num_workers=cfg.data.num_workers,
        collate_fn=collate,
    )
    sched_cfg = models.scheduler.config
    losses: list[torch.Tensor] = []
    step_seconds: list[float] = []
    with tqdm(total=tr.max_train_steps, desc="train", unit="step") as bar:
        while state.step < tr.max_train_steps:
            started = time.perf_counter()
            micro = [
                assemble_batch(cfg, sched_cfg, to_cond(next(stream)), empty, (cfg.seed, state.step, m), device)
                for m in range(tr.gradient_accumulation_steps)
            ]
            lr = learning_rate(
                state.step,
                base_lr=opt.lr,
                kind=sch.scheduler_type,
                warmup_steps=sch.warmup_steps,
                total_steps=tr.max_train_steps,
                num_cycles=sch.num_cycles,
            )
            state, metrics = train_step(
                state, micro, loss_fn=loss_fn, lr=torch.tensor(lr, dtype=torch.float64), hp=hp, module=transformer
            )
            losses.append(metrics["loss"])
            step_seconds.append(time.perf_counter() - started)
            bar.update(1)
            if state.step % LOG_EVERY == 0 or state.step == tr.max_train_steps:
                recent = torch.stack(losses[-LOG_EVERY:]).mean().item()
                bar.set_postfix(loss=f"{recent:.4f}", lr=f"{lr:.2e}")
    loss_values = torch.stack(losses).tolist()
    out.mkdir(parents=True, exist_ok=True)
    lora_path = save_lora(out, transformer, state.lora, dtype=torch_dtype(tr.save_dtype), pipeline_cls=_pipeline_cls())
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    save_loss_curve(loss_values, out / "loss.png")
    if cfg.logging.write_sample:
        _write_sample(cfg, _with_encoders(cfg, path, models), samples[0], state.lora, out / "sample.png")
    print(f"saved LoRA to {lora_path}; loss {loss_values[0]:.4f} → {loss_values[-1]:.4f}")
    return RunResult(cfg, state, lora0, loss_values, step_seconds, models, lora_path)


def _with_encoders(cfg: FluxKontextConfig, path: Path, models: FluxKontextModels) -> FluxKontextModels:
    """``models`` with any encoder it lacks (training from the cache) loaded on the predict devices."""
    missing = tuple(name for name in ENCODERS if getattr(models, name) is None)
    if not missing:
        return models
    devices = _devices(cfg.predict.devices, "predict.devices", {n: n for n in missing})
    extra = load_flux_kontext(path, torch_dtype(cfg.model.dtype), include=missing, devices=devices)
    return attrs.evolve(models, **{n: getattr(extra, n) for n in missing})


def _write_sample(cfg: FluxKontextConfig, models: FluxKontextModels, sample: PairSample, lora: Any, path: Path) -> None:
    """control | target | base model | with LoRA, same seed for both predictions."""
    control = load_rgb(sample.control)
    kw = {"seed": cfg.seed, "max_sequence_length": cfg.model.max_sequence_length}
    before = to_pil(kontext_predict(models, control, sample.prompt, **kw))
    after = to_pil(kontext_predict(models, control, sample.prompt, lora=lora, **kw))
    save_image_row([control, load_rgb(sample.target), before, after], ["control", "target", "before", "after"], path)


def train(config: str | None = None, **overrides: Any) -> None:
    """Train a LoRA: ``train [--config=recipes/configs/flux_kontext_bf16.yaml] [--section.key=value ...]``."""
    run(load_config(FluxKontextConfig, config, overrides))


def fill(cfg: FluxKontextConfig) -> kcache.CacheReport:
    """Compute the cache entries the configured dataset needs; returns the computed/reused counts."""
    return _fill(cfg, _samples(cfg), _model_dir(cfg))


def _fill(cfg: FluxKontextConfig, samples: list[PairSample], path: Path) -> kcache.CacheReport:
    root = Path(cfg.cache.cache_dir)
    spec = kcache.cache_spec(path, cfg.model.dtype, cfg.model.max_sequence_length)
    names = {
        "vae": "vae_encoder_device",
        "text_encoder": "text_encoder_device",
        "text_encoder_2": "text_encoder_2_device",
    }
    devices = _devices(cfg.cache, "cache", names)
    models = load_flux_kontext(path, torch_dtype(cfg.model.dtype), include=ENCODERS, devices=devices)
    report = kcache.fill_cache(
        spec, models, samples, root, progress=lambda jobs: tqdm(jobs, desc="cache", unit="entry")
    )
    for reason in report.replaced:
        print(f"recomputed corrupt entry: {reason}")
    print(f"cache '{root}': {report.computed} entries computed, {report.reused} reused")
    return report


def cache(config: str | None = None, **overrides: Any) -> None:
    """Fill the embedding cache: ``cache [--config=...] [--cache.cache_dir=DIR] [--section.key=value ...]``."""
    fill(load_config(FluxKontextConfig, config, overrides))


def predict(
    image: str,
    prompt: str,
    out: str = "edited.png",
    lora: str | None = None,
    seed: int = 0,
    num_inference_steps: int = 28,
    guidance_scale: float = 2.5,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    true_cfg_scale: float = 1.0,
    config: str | None = None,
    **overrides: Any,
) -> None:
    """Edit one image: ``predict --image=IN.png --prompt="..." --out=OUT.png [--lora=FILE] [--model.*=...]``."""
    cfg = load_config(FluxKontextConfig, config, overrides)
    src = Path(image)
    if not src.is_file():
        raise QfluxError(f"input image '{src}' does not exist; pass --image=PATH")
    devices = _devices(cfg.predict.devices, "predict.devices", {n: n for n in ("transformer", *ENCODERS)})
    models = load_flux_kontext(_model_dir(cfg), torch_dtype(cfg.model.dtype), devices=devices)
    if lora is not None:
        load_lora_file(models.transformer, lora, pipeline_cls=_pipeline_cls())
    result = kontext_predict(
        models,
        load_rgb(src),
        prompt,
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        negative_prompt=negative_prompt,
        true_cfg_scale=true_cfg_scale,
        max_sequence_length=cfg.model.max_sequence_length,
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    to_pil(result).save(out)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: no arguments trains the built-in default; errors print one message and exit 2."""
    import fire

    quiet_known_warnings()
    args = sys.argv[1:] if argv is None else argv
    try:
        fire.Fire(
            {"train": train, "cache": cache, "predict": predict}, command=args or ["train"], name="flux_kontext_lora"
        )
    except QfluxError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
