"""FLUX.1 Kontext LoRA: ``python -m recipes.flux_kontext_lora [train|cache|predict] [--config=F] [--a.b=c ...]``.

With no arguments it trains on the built-in default (a tiny random model and a synthetic
colour-inversion dataset) and writes, under ``logging.output_dir``: the LoRA
(``pytorch_lora_weights.safetensors``, diffusers format), ``config.yaml``, ``loss.png`` and
``sample.png`` (control | target | before | after).

``cache`` fills the embedding cache; ``train`` with ``cache.use_cache=true`` then loads only the
transformer. The recipe is parse → build → loop → save; the maths lives in ``qflux``.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import torch
import yaml
from tqdm import tqdm

from qflux.builtin import resolve_dataset_path, resolve_model_path
from qflux.checkpoint import incompatibilities, latest_checkpoint, load_checkpoint, remove_partial, save_checkpoint
from qflux.config import FluxKontextConfig
from qflux.config_parse import load_config, to_dict
from qflux.data import PairDataset, PairSample, batch_stream, collate_pairs, load_rgb, scan_pairs
from qflux.devices import resolve_device
from qflux.distributed import World, all_reduce_sum, any_rank, barrier, init_world, rank_device, shard_frozen_base
from qflux.errors import QfluxError
from qflux.flux_kontext import cache as kcache
from qflux.flux_kontext.batch import assemble_batch, cached_conditioning, encode_conditioning, eval_batches
from qflux.flux_kontext.conditioning import PromptEmbeds, encode_prompt_with, vae_decode
from qflux.flux_kontext.loaders import COMPONENTS, PIPELINE, FluxKontextModels, load_flux_kontext, torch_dtype
from qflux.flux_kontext.predict import denoise, to_image, to_pil
from qflux.flux_kontext.predict import predict as kontext_predict
from qflux.flux_kontext.step import make_loss_fn
from qflux.fp8 import check_fp8_device
from qflux.frozen_linear import prepare_frozen_base
from qflux.lora import LORA_WEIGHT_NAME, inject_lora, load_lora_file, lora_from_file, save_lora, save_lora_comfyui
from qflux.model_dir import resolve_model_dir
from qflux.plots import save_image_row, save_loss_curve
from qflux.schedules import learning_rate
from qflux.signals import stop_signals
from qflux.tracking import Tracker, open_tracker
from qflux.train_state import (
    GradEngine,
    StepHParams,
    TrainState,
    evaluate_loss,
    init_train_state,
    make_train_step,
    resolve_compile,
)
from qflux.validation import ValidationSet, validation_grid, validation_set

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
    interrupted: bool = False
    """True when SIGINT/SIGTERM stopped the run (a checkpoint was saved; no final outputs)."""


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


@attrs.frozen(eq=False)
class Inputs:
    """The models and data source of a training run (encoders, or the cache)."""

    models: FluxKontextModels
    dataset: Any
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    to_conditioning: Callable[[dict[str, Any]], Any]
    empty: PromptEmbeds
    make_dataset: Callable[[list[PairSample]], Any]
    """The same data path over other samples (validation)."""


def _inputs(
    cfg: FluxKontextConfig,
    samples: list[PairSample],
    path: Path,
    device: torch.device,
    extra: list[PairSample],
    world: World,
) -> Inputs:
    """Load what training needs: only the transformer with the cache, else every encoder too.

    Args:
        extra: more samples read through the same path (validation); cached with the training ones.
    """
    dtype, seq = torch_dtype(cfg.model.dtype), cfg.model.max_sequence_length
    if cfg.cache.use_cache:
        root = Path(cfg.cache.cache_dir)
        spec = kcache.cache_spec(path, cfg.model.dtype, seq)
        entries = kcache.sample_entries(spec, root, samples + extra)
        problems = kcache.verify_cache(spec, root, entries)
        if world.size > 1 and any_rank(bool(problems), device) and not problems:
            problems = ["another rank found entries missing"]  # fill together: _fill has a barrier
        if problems:  # computed now with the encoders, which are freed before the transformer loads
            print(f"cache '{root}': {len(problems)} entries missing or corrupt (first: {problems[0]}); computing them")
            _fill(cfg, samples + extra, path, world)
        models = load_flux_kontext(path, dtype, include=("transformer",), devices={"transformer": device})
        return Inputs(
            models,
            kcache.CachedPairDataset(entries[: len(samples)]),
            kcache.collate_cached,
            cached_conditioning,
            kcache.read_empty_prompt(spec, root),
            lambda more: kcache.CachedPairDataset(kcache.sample_entries(spec, root, more)),
        )
    names = {
        "vae": "vae_encoder_device",
        "text_encoder": "text_encoder_device",
        "text_encoder_2": "text_encoder_2_device",
    }
    models = load_flux_kontext(path, dtype, devices={"transformer": device, **_devices(cfg.train, "train", names)})
    to_cond = partial(encode_conditioning, models, max_sequence_length=seq)
    empty = encode_prompt_with(models, [""], seq)
    return Inputs(models, PairDataset(samples), collate_pairs, to_cond, empty, PairDataset)


# keys that must match to resume: they decide the LoRA's shape, its base model and the random draws
RESUME_KEYS = [
    "model.pretrained_model_name_or_path",
    "model.lora.r",
    "model.lora.lora_alpha",
    "model.lora.target_modules",
    "seed",
]


def _resume(cfg: FluxKontextConfig, fresh: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """The state to start from: ``fresh``, or the checkpoint ``resume_from_checkpoint`` names."""
    where = cfg.resume_from_checkpoint
    if where is None:
        return fresh, {}
    path = latest_checkpoint(cfg.logging.output_dir) if where == "latest" else Path(where)
    if path is None:
        print(f"no checkpoint in '{cfg.logging.output_dir}' yet: starting fresh")
        return fresh, {}
    ckpt = load_checkpoint(path)
    differ = incompatibilities(ckpt.config, to_dict(cfg), RESUME_KEYS)
    shapes = {k: tuple(v.shape) for k, v in ckpt.state.lora.items()}
    if not differ and shapes != {k: tuple(v.shape) for k, v in fresh.lora.items()}:
        differ = ["the LoRA tensors (names or shapes)"]
    if differ:
        raise QfluxError(f"cannot resume from '{path}': it differs from this run in " + "; ".join(differ))
    device = next(iter(fresh.lora.values())).device
    state = attrs.evolve(
        ckpt.state,
        lora={k: v.to(device) for k, v in ckpt.state.lora.items()},
        opt=ckpt.state.opt._replace(
            exp_avg={k: v.to(device) for k, v in ckpt.state.opt.exp_avg.items()},
            exp_avg_sq={k: v.to(device) for k, v in ckpt.state.opt.exp_avg_sq.items()},
        ),
    )
    print(f"resuming from '{path}' at step {state.step}")
    return state, ckpt.meta


def _check_finite(worst: torch.Tensor, limit: int, step: int, out: Path) -> None:
    """Stop the run when ``limit`` steps in a row had a non-finite loss or gradient."""
    if worst.item() >= limit:
        raise QfluxError(
            f"stopped at step {step}: {limit} steps in a row had a non-finite loss or gradient (their updates "
            f"were skipped); the last checkpoint is {latest_checkpoint(out) or 'none'}. Lower optimizer.lr or "
            "check the data, then resume from that checkpoint"
        )


def _quiet_unless(main: bool) -> contextlib.AbstractContextManager[Any]:
    """Ranks other than 0 print nothing (their progress bars are off too)."""
    return contextlib.nullcontext() if main else contextlib.redirect_stdout(io.StringIO())


def run(cfg: FluxKontextConfig) -> RunResult:
    """Train a LoRA as configured and write the outputs; returns the final state and losses.

    Checkpoints every ``train.checkpointing_steps``; SIGINT/SIGTERM save one and return early.
    Under torchrun with several ranks, trains data-parallel (``train.distributed``); rank 0 alone
    prints and writes files.
    """
    device = resolve_device(cfg.train.device, key="train.device")
    world = init_world(device.type)
    with _quiet_unless(world.is_main):
        return _run(cfg, world, rank_device(world, device))


def _run(cfg: FluxKontextConfig, world: World, device: torch.device) -> RunResult:
    out, tr, opt, sch = Path(cfg.logging.output_dir), cfg.train, cfg.optimizer, cfg.lr_scheduler
    samples, path = _samples(cfg), _model_dir(cfg)
    mode = resolve_compile(tr.compile, device)
    if world.size > 1 and mode == "full":
        raise QfluxError("train.compile: true cannot run under torchrun (collectives in the graph); use regional")
    if tr.fp8_matmul:
        check_fp8_device(device)  # before any model loads
    vset = None
    if cfg.validation.enabled:
        vset = validation_set(cfg.validation, cfg.data.dataset_path, cfg.data.max_pixels)
    if world.is_main:
        for partial_dir in remove_partial(out):
            print(f"removed '{partial_dir}', left by a checkpoint write that was interrupted")
    inputs = _inputs(cfg, samples, path, device, vset.samples if vset else [], world)
    transformer = inputs.models.transformer
    if tr.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    lora0 = inject_lora(transformer, cfg.model.lora, seed=cfg.seed)
    if cfg.model.lora.pretrained_weight is not None:
        lora0 = lora_from_file(transformer, cfg.model.lora.pretrained_weight, lora0, pipeline_cls=_pipeline_cls())
    prepare_frozen_base(transformer, fp8_matmul=tr.fp8_matmul, device=device, compile_mode=mode)
    sharded = world.size > 1 and tr.distributed == "fsdp"
    if sharded:
        blocks = shard_frozen_base(transformer, world)
        print(f"FSDP2: frozen base sharded across {world.size} ranks ({blocks} blocks); LoRA replicated")
    state, meta = _resume(cfg, init_train_state({k: v.to(device) for k, v in lora0.items()}, cfg.seed))
    loss_fn = make_loss_fn(transformer, guidance_scale=tr.guidance_scale, weighting_scheme=tr.weighting_scheme)
    # FSDP2's unsharding runs as module hooks that torch.func transforms do not see: autograd engine
    autograd = tr.gradient_checkpointing or mode == "regional" or sharded
    engine: GradEngine = "autograd" if autograd else "func"
    hp = StepHParams(opt.betas, opt.eps, opt.weight_decay, tr.max_grad_norm, engine)
    reduce = all_reduce_sum if world.size > 1 else None
    step_fn = make_train_step(loss_fn, hp, module=transformer, compile=mode, reduce=reduce)
    position = tuple(meta.get("data_position", (0, 0)))
    stream = batch_stream(
        inputs.dataset,
        samples,
        cfg.data.batch_size,
        seed=cfg.seed,
        shuffle=cfg.data.shuffle,
        num_workers=cfg.data.num_workers,
        collate_fn=inputs.collate,
        start=(int(position[0]), int(position[1])),
        shard=(world.rank, world.size),
    )
    history: list[float] = list(meta.get("losses", []))
    losses: list[torch.Tensor] = []
    seconds: list[float] = []
    # non-finite steps: current run length, longest run, total (device tensors: read at log cadence)
    streak = worst = torch.zeros((), device=device)
    skipped = torch.full((), float(meta.get("nonfinite_total", 0)), device=device)
    sched_cfg = inputs.models.scheduler.config
    logdir = out / cfg.logging.logging_dir
    tracker = open_tracker(cfg.logging.report_to if world.is_main else "none", logdir)
    validate = _validator(cfg, path, inputs, vset, loss_fn, device, tracker, world) if vset else None
    pending: list[dict[str, torch.Tensor]] = []  # metrics of the steps since the last log (device tensors)

    def log_window() -> None:
        """Send the pending steps' metrics to the tracker (one host sync for the whole window)."""
        if not pending:
            return
        rows = torch.stack([torch.stack([m["loss"], m["grad_norm"], m["lr"].float()]) for m in pending]).tolist()
        first = state.step - len(pending) + 1
        window_s = sum(seconds[-len(pending) :])
        rate = len(pending) / window_s if window_s > 0 else float("nan")
        per_step = cfg.data.batch_size * tr.gradient_accumulation_steps
        for i, (loss_v, norm_v, lr_v) in enumerate(rows):
            values = {"train/loss": loss_v, "train/grad_norm": norm_v, "train/lr": lr_v}
            if i == len(rows) - 1:
                values |= {"train/steps_per_s": rate, "train/samples_per_s": rate * per_step}
            tracker.scalars(first + i, values)
        pending.clear()

    def checkpoint() -> Path:
        all_losses = history + (torch.stack(losses).tolist() if losses else [])
        body = {"data_position": list(position), "losses": all_losses, "nonfinite_total": int(skipped.item())}
        write = partial(
            save_lora,
            transformer=transformer,
            lora=state.lora,
            dtype=torch_dtype(tr.save_dtype),
            pipeline_cls=_pipeline_cls(),
        )
        saved = out / f"checkpoint-{state.step}"
        if world.is_main:
            saved = save_checkpoint(
                out, state, body, to_dict(cfg), write_lora=write, total_limit=tr.checkpoints_total_limit
            )
            if all_losses:
                save_loss_curve(all_losses, out / "loss.png")
        barrier(world)
        return saved

    with (
        stop_signals() as stopped,
        tqdm(initial=state.step, total=tr.max_train_steps, desc="train", unit="step", disable=not world.is_main) as bar,
    ):
        if validate is not None and state.step < tr.max_train_steps:
            validate(state)  # before the first step of this run
        while state.step < tr.max_train_steps:
            started = time.perf_counter()
            micro, shares = [], []
            for m in range(tr.gradient_accumulation_steps):
                position, raw = next(stream)
                cond = inputs.to_conditioning(raw)
                keys = (cfg.seed, state.step, m)
                micro.append(assemble_batch(cfg, sched_cfg, cond, inputs.empty, keys, device, raw["offset"]))
                # this rank's share of the micro-batch's global mean, over K accumulated micro-batches
                shares.append(cond.latents.shape[0] / raw["global_size"] / tr.gradient_accumulation_steps)
            lr = learning_rate(state.step, base_lr=opt.lr, kind=sch.scheduler_type, warmup_steps=sch.warmup_steps,
                               total_steps=tr.max_train_steps, num_cycles=sch.num_cycles)  # fmt: skip
            lr_t = torch.tensor(lr, dtype=torch.float64)
            weights = torch.tensor(shares, device=device) if world.size > 1 else None
            state, metrics = step_fn(state, micro, lr_t, weights)
            losses.append(metrics["loss"])
            pending.append(metrics)
            streak = (streak + 1) * (1 - metrics["finite"])
            worst, skipped = torch.maximum(worst, streak), skipped + (1 - metrics["finite"])
            seconds.append(time.perf_counter() - started)
            bar.update(1)
            ckpt_due = tr.checkpointing_steps and state.step % tr.checkpointing_steps == 0
            if world.size > 1 and any_rank(bool(stopped), device) and not stopped:
                stopped.append("another rank's stop request")
            if state.step % LOG_EVERY == 0 or state.step == tr.max_train_steps or ckpt_due or stopped:
                _check_finite(worst, tr.max_nonfinite_steps, state.step, out)
                recent = torch.stack(losses[-LOG_EVERY:]).nanmean().item()
                bar.set_postfix(loss=f"{recent:.4f}", lr=f"{lr:.2e}", skipped=int(skipped.item()))
                log_window()
            if validate is not None and (
                state.step % cfg.validation.validation_steps == 0 or state.step == tr.max_train_steps
            ):
                log_window()
                validate(state)
            if ckpt_due or stopped:
                saved = checkpoint()
                if stopped:
                    bar.write(
                        f"interrupted by {stopped[0]} at step {state.step}; saved {saved}. Resume with the same "
                        "command plus --resume_from_checkpoint=latest"
                    )
                    break
    log_window()
    tracker.close()
    loss_values = history + (torch.stack(losses).tolist() if losses else [])
    lora_path = out / LORA_WEIGHT_NAME
    if not stopped:
        save_dtype = torch_dtype(tr.save_dtype)
        if world.is_main and tr.lora_format in ("comfyui", "both"):
            lora_path = save_lora_comfyui(out, transformer, state.lora, dtype=save_dtype)
        if world.is_main and tr.lora_format in ("diffusers", "both"):
            lora_path = save_lora(out, transformer, state.lora, dtype=save_dtype, pipeline_cls=_pipeline_cls())
        if world.is_main:
            (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
            save_loss_curve(loss_values, out / "loss.png")
        if cfg.logging.write_sample:  # every rank predicts (a sharded base needs them all); rank 0 writes
            models = _with_encoders(cfg, path, inputs.models)
            _write_sample(cfg, models, samples[0], state.lora, out / "sample.png", write=world.is_main)
        barrier(world)
        if loss_values:
            print(f"saved LoRA to {lora_path}; loss {loss_values[0]:.4f} → {loss_values[-1]:.4f}")
    return RunResult(cfg, state, lora0, loss_values, seconds, inputs.models, lora_path, interrupted=bool(stopped))


def _with_encoders(cfg: FluxKontextConfig, path: Path, models: FluxKontextModels) -> FluxKontextModels:
    """``models`` with any encoder it lacks (training from the cache) loaded on the predict devices."""
    missing = tuple(name for name in ENCODERS if getattr(models, name) is None)
    if not missing:
        return models
    devices = _devices(cfg.predict.devices, "predict.devices", {n: n for n in missing})
    extra = load_flux_kontext(path, torch_dtype(cfg.model.dtype), include=missing, devices=devices)
    return attrs.evolve(models, **{n: getattr(extra, n) for n in missing})


def _write_sample(
    cfg: FluxKontextConfig, models: FluxKontextModels, sample: PairSample, lora: Any, path: Path, *, write: bool = True
) -> None:
    """control | target | base model | with LoRA, same seed for both predictions."""
    control = load_rgb(sample.control)
    kw = {"seed": cfg.seed, "max_sequence_length": cfg.model.max_sequence_length}
    before = to_pil(kontext_predict(models, control, sample.prompt, **kw))
    after = to_pil(kontext_predict(models, control, sample.prompt, lora=lora, **kw))
    if write:
        save_image_row(
            [control, load_rgb(sample.target), before, after], ["control", "target", "before", "after"], path
        )


def _hw(size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) → (height, width)."""
    return size[1], size[0]


def _validator(
    cfg: FluxKontextConfig,
    path: Path,
    inputs: Inputs,
    vset: ValidationSet,
    loss_fn: Callable[..., torch.Tensor],
    device: torch.device,
    tracker: Tracker,
    world: World,
) -> Callable[[TrainState], None]:
    """Build ``validate(state)``: the validation loss (fixed σ and noise) and a grid of predictions.

    The samples' conditioning comes through the training data path (the cache when it is on) and is
    encoded once, here. Decoding needs the VAE: training from the cache loads it on
    ``predict.devices.vae`` for each validation and frees it after, so validation holds no memory
    between calls beyond the samples' small conditioning tensors.
    """
    dataset = inputs.make_dataset(vset.samples)
    conds = [inputs.to_conditioning(inputs.collate([dataset[i]])) for i in range(len(vset.samples))]
    sched_cfg = inputs.models.scheduler.config
    with_target = [c for c, t in zip(conds, vset.has_target, strict=True) if t]
    batches = eval_batches(cfg, sched_cfg, with_target, inputs.empty, seed=cfg.seed, device=device)
    dtype = torch_dtype(cfg.model.dtype)
    out = Path(cfg.logging.output_dir) / "validation"

    def validate(state: TrainState) -> None:
        values = {}
        if batches:
            values["val/loss"] = evaluate_loss(loss_fn, state.lora, batches).item()
        latents = [
            denoise(
                inputs.models.transformer,
                sched_cfg,
                cond.control,
                PromptEmbeds(pooled=cond.pooled, tokens=cond.tokens),
                None,
                size=(sample.target_size[1], sample.target_size[0])
                if has_t
                else (sample.control_size[1], sample.control_size[0]),
                num_inference_steps=cfg.validation.num_inference_steps,
                guidance_scale=cfg.train.guidance_scale,
                seed=cfg.seed,
                lora=state.lora,
                noise_dtype=dtype,
            )
            for cond, sample, has_t in zip(conds, vset.samples, vset.has_target, strict=True)
        ]
        vae = inputs.models.vae
        if vae is None:  # training from the cache: the VAE only for this decode
            device_vae = resolve_device(cfg.predict.devices.vae, key="predict.devices.vae")
            vae = load_flux_kontext(path, dtype, include=("vae",), devices={"vae": device_vae}).vae
        images = [to_image(vae_decode(vae, z)) for z in latents]
        del vae
        if not world.is_main:  # every rank computed (a sharded base needs them all); rank 0 writes
            return
        grid = validation_grid(vset, images, out / f"step-{state.step:06d}.png")
        tracker.image(state.step, "val/grid", grid)
        if values:
            tracker.scalars(state.step, values)
            tqdm.write(f"step {state.step}: validation loss {values['val/loss']:.4f}")

    return validate


def train(config: str | None = None, **overrides: Any) -> None:
    """Train a LoRA: ``train [--config=recipes/configs/flux_kontext_bf16.yaml] [--section.key=value ...]``."""
    run(load_config(FluxKontextConfig, config, overrides))


def fill(cfg: FluxKontextConfig) -> kcache.CacheReport:
    """Compute the cache entries the configured dataset needs; returns the computed/reused counts.

    Under torchrun, each rank computes every world-th sample (rank 0 reports its own share)."""
    world = init_world(resolve_device(cfg.cache.vae_encoder_device, key="cache.vae_encoder_device").type)
    with _quiet_unless(world.is_main):
        return _fill(cfg, _samples(cfg), _model_dir(cfg), world)


def _fill(cfg: FluxKontextConfig, samples: list[PairSample], path: Path, world: World) -> kcache.CacheReport:
    root = Path(cfg.cache.cache_dir)
    spec = kcache.cache_spec(path, cfg.model.dtype, cfg.model.max_sequence_length)
    names = {
        "vae": "vae_encoder_device",
        "text_encoder": "text_encoder_device",
        "text_encoder_2": "text_encoder_2_device",
    }
    devices = _devices(cfg.cache, "cache", names)
    models = load_flux_kontext(path, torch_dtype(cfg.model.dtype), include=ENCODERS, devices=devices)
    mine = samples[world.rank :: world.size]
    report = kcache.fill_cache(
        spec,
        models,
        mine,
        root,
        progress=lambda jobs: tqdm(jobs, desc="cache", unit="entry", disable=not world.is_main),
    )
    barrier(world)  # every entry exists before any rank reads one
    for reason in report.replaced:
        print(f"recomputed corrupt entry: {reason}")
    share = f" (rank 0's share of {world.size})" if world.size > 1 else ""
    print(f"cache '{root}': {report.computed} entries computed, {report.reused} reused{share}")
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
