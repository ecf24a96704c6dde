"""The LoRA training loop both recipes run: parse → build → loop → save, for any model family.

A :class:`Family` record says what differs between FLUX.1 Kontext and Qwen-Image-Edit (loaders,
conditioning, batch record, loss, preview, LoRA formats); everything else (data stream, keyed
randomness, the compiled train step, checkpoints and resume, signals, torchrun, validation,
tracking, the cache command) is this one module. The maths lives in ``qflux``.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
import yaml
from tqdm import tqdm

from qflux.batching import Conditioning, Prepared, no_dropout, prepare
from qflux.batching import eval_batches as shared_eval_batches
from qflux.builtin import resolve_dataset_path, resolve_model_path
from qflux.cache import CacheReport, Job
from qflux.checkpoint import incompatibilities, latest_checkpoint, load_checkpoint, remove_partial, save_checkpoint
from qflux.config_doc import command_help as build_help
from qflux.config_doc import function_options
from qflux.config_parse import to_dict
from qflux.data import PairSample, batch_stream, load_rgb, scan_pairs, to_image, to_pil
from qflux.devices import resolve_device
from qflux.distributed import World, all_reduce_sum, any_rank, barrier, init_world, rank_device, shard_frozen_base
from qflux.errors import QfluxError
from qflux.fp8 import check_fp8_device
from qflux.frozen_linear import prepare_frozen_base
from qflux.latents import size_multiple
from qflux.loading import component_config, torch_dtype
from qflux.lora import LORA_WEIGHT_NAME, inject_lora, load_lora_file, lora_from_file, save_lora, save_lora_comfyui
from qflux.lora_formats import Naming, check_convertible
from qflux.model_dir import resolve_model_dir
from qflux.plots import save_image_row, save_loss_curve
from qflux.quantize import count_layers
from qflux.run_dir import claim_output_dir
from qflux.schedules import learning_rate
from qflux.signals import stop_signals
from qflux.summary import LOSS_WINDOW, RunPlan, end_block, start_block
from qflux.tracking import Tracker, open_tracker
from qflux.train_state import (
    LossFn,
    StepHParams,
    TrainState,
    evaluate_loss,
    grad_engine,
    init_train_state,
    make_train_step,
    resolve_compile,
)
from qflux.validation import ValidationSet, validation_grid, validation_set

LOG_EVERY = LOSS_WINDOW  # optimizer steps between progress-bar updates of the mean loss (the only host syncs)
# config keys (of train and cache) that place each encoder
DEVICE_KEYS = {
    "vae": "vae_encoder_device",
    "text_encoder": "text_encoder_device",
    "text_encoder_2": "text_encoder_2_device",
}
# keys that must match to resume: they decide the LoRA's shape, its base model, its conditioning
# and the random draws (a key a model lacks reads as null in both)
RESUME_KEYS = [
    "model.pretrained_model_name_or_path",
    "model.variant",
    "model.lora.r",
    "model.lora.lora_alpha",
    "model.lora.target_modules",
    "seed",
]


@attrs.frozen(eq=False)
class DataPath:
    """Where a run's conditioning comes from: the encoders, or the cache."""

    make_dataset: Callable[[list[PairSample]], Any]
    """Map-style dataset over samples (training, or validation through the same path)."""
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    to_conditioning: Callable[[dict[str, Any]], Conditioning]
    empty: Mapping[str, torch.Tensor] | None
    """The empty prompt's tensors [1, ...], or None when each sample's conditioning carries its own."""


@attrs.frozen(eq=False)
class CachePath:
    """A model's cache, bound to one model folder, settings and cache root."""

    entries: Callable[[Sequence[PairSample]], list[Any]]
    """Each sample's entries (by content)."""
    verify: Callable[[list[Any]], list[str]]
    """Problems of the entries training would read."""
    fill: Callable[..., CacheReport]
    """``fill(models, samples, progress)`` computes what is missing."""
    dataset: Callable[[list[Any]], Any]
    """Map-style dataset over samples' entries."""
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    conditioning: Callable[[dict[str, Any]], Conditioning]
    empty: Callable[[], Mapping[str, torch.Tensor] | None]
    """Reads the empty prompt's tensors (None: each sample's conditioning carries its own)."""


@attrs.frozen(eq=False)
class Family:
    """What the loop needs to know about one model."""

    name: str
    """The recipe's command name (``flux_kontext_lora``)."""
    pipeline: str
    """The model's name in messages."""
    components: tuple[str, ...]
    """Subfolders a model folder must have."""
    pipeline_cls: Callable[[], Any]
    """The diffusers pipeline class (LoRA files are written and read through it)."""
    encoders: tuple[str, ...]
    """Components used only to encode (not loaded when training from the cache)."""
    load: Callable[..., Any]
    """``load(path, dtype, *, include, devices) → models`` (a record with one field per component)."""
    controls: Callable[[Any], tuple[int, int]]
    """(fewest, most) control images per sample for a config."""
    encoded: Callable[[Any, Any], DataPath]
    """``encoded(cfg, models)``: the data path through the encoders."""
    cached: Callable[[Any, Path], CachePath]
    """``cached(cfg, model_dir)``: the cache of this model and settings."""
    loss_fn: Callable[[Any, Any], LossFn]
    """``loss_fn(cfg, transformer)``: the pure objective ``(lora, batch) → loss``."""
    to_batch: Callable[[Prepared], Any]
    """The model's batch record from prepared tensors."""
    preview: Callable[..., torch.Tensor]
    """``preview(cfg, models, cond, lora, steps) → latents`` [1, C, h, w]: denoise one sample of
    conditioning at its target size, with a fixed seed (validation, sample.png)."""
    decode: Callable[[Any, torch.Tensor], torch.Tensor]
    """``decode(vae, latents) → images`` [1, 3, H, W] in [-1, 1]."""
    naming: Naming
    """How the model's ComfyUI LoRA files name modules (written at the end, read by ``--lora`` and
    ``model.lora.pretrained_weight``)."""


@attrs.frozen(eq=False)
class RunResult:
    """What a finished training run hands back to an in-process caller (tests, notebooks)."""

    config: Any
    state: TrainState
    initial_lora: dict[str, torch.Tensor]
    losses: list[float]
    step_seconds: list[float]
    """Wall time of each optimizer step, batch preparation included."""
    models: Any
    lora_path: Path
    interrupted: bool = False
    """True when SIGINT/SIGTERM stopped the run (a checkpoint was saved; no final outputs)."""


def model_dir(family: Family, cfg: Any) -> Path:
    """The resolved model folder of ``model.pretrained_model_name_or_path``."""
    name = resolve_model_path(cfg.model.pretrained_model_name_or_path, getattr(cfg.model, "variant", None))
    return resolve_model_dir(name, family.components, pipeline=family.pipeline)


def image_multiple(path: Path) -> int:
    """What image sides are multiples of for the model in ``path``: its VAE factor × 2, from the
    VAE's config (:func:`qflux.latents.size_multiple`)."""
    return size_multiple(component_config(path, "vae"))


def samples_of(family: Family, cfg: Any, path: Path) -> list[PairSample]:
    """The checked dataset, sized for the model in ``path`` (before any model loads)."""
    root = resolve_dataset_path(cfg.data.dataset_path)
    return scan_pairs(
        root,
        cfg.data.max_pixels,
        multiple=image_multiple(path),
        skip_invalid=cfg.data.skip_invalid,
        warn=tqdm.write,
        controls=family.controls(cfg),
    )


def devices(section: Any, prefix: str, names: Mapping[str, str]) -> dict[str, torch.device]:
    """{component: device} from config keys ``names[component]`` of ``section``."""
    return {comp: resolve_device(getattr(section, key), key=f"{prefix}.{key}") for comp, key in names.items()}


def predict_models(family: Family, cfg: Any, lora: str | None) -> Any:
    """Every component on ``predict.devices``, quantized as configured, with the LoRA file (if
    any) loaded into the transformer: what a recipe's ``predict`` command edits with."""
    places = devices(cfg.predict.devices, "predict.devices", {n: n for n in ("transformer", *family.encoders)})
    dtype = torch_dtype(cfg.model.dtype)
    models = family.load(model_dir(family, cfg), dtype, devices=places, quantize=quantize_plan(cfg))
    if lora is not None:
        load_lora_file(models.transformer, lora, naming=family.naming, pipeline_cls=family.pipeline_cls())
    return models


def save_edit(image: np.ndarray, out: str) -> None:
    """Write a predicted image [H, W, 3] in [0, 1] to ``out`` (folders made as needed)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    to_pil(image).save(out)
    print(f"wrote {out}")


def _encoder_keys(family: Family) -> dict[str, str]:
    return {n: DEVICE_KEYS[n] for n in family.encoders}


def quantize_plan(cfg: Any) -> dict[str, str]:
    """{component: how its frozen linears are stored}: ``model.quantize`` for the transformer and,
    with ``model.quantize_text_encoders``, for the text encoders."""
    text = cfg.model.quantize if cfg.model.quantize_text_encoders else "none"
    return {"transformer": cfg.model.quantize, "text_encoder": text, "text_encoder_2": text}


@attrs.frozen(eq=False)
class Inputs:
    """The models and data source of a training run (encoders, or the cache)."""

    models: Any
    dataset: Any
    data: DataPath


def _inputs(
    family: Family,
    cfg: Any,
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
    dtype = torch_dtype(cfg.model.dtype)
    if cfg.cache.use_cache:
        cache = family.cached(cfg, path)
        entries = cache.entries(samples + extra)
        problems = cache.verify(entries)
        if world.size > 1 and any_rank(bool(problems), device) and not problems:
            problems = ["another rank found entries missing"]  # fill together: _fill has a barrier
        if problems:  # computed now with the encoders, which are freed before the transformer loads
            print(f"cache '{cfg.cache.cache_dir}': {len(problems)} entries missing or corrupt (first: {problems[0]}); "
                  "computing them")  # fmt: skip
            _fill(family, cfg, samples + extra, path, world)
        models = family.load(
            path, dtype, include=("transformer",), devices={"transformer": device}, quantize=quantize_plan(cfg)
        )
        known = dict(zip(samples + extra, entries, strict=True))  # each image file is hashed once

        def make_dataset(chosen: list[PairSample]) -> Any:
            return cache.dataset([known[s] if s in known else cache.entries([s])[0] for s in chosen])

        data = DataPath(make_dataset, cache.collate, cache.conditioning, cache.empty())
        return Inputs(models, make_dataset(samples), data)
    places = {"transformer": device, **devices(cfg.train, "train", _encoder_keys(family))}
    include = ("transformer", *family.encoders)
    models = family.load(path, dtype, include=include, devices=places, quantize=quantize_plan(cfg))
    data = family.encoded(cfg, models)
    return Inputs(models, data.make_dataset(samples), data)


def _checkpoint_to_resume(cfg: Any) -> Path | None:
    """The checkpoint ``resume_from_checkpoint`` names (``latest``: the newest one), or None for a
    fresh run."""
    where = cfg.resume_from_checkpoint
    if where is None:
        return None
    path = latest_checkpoint(cfg.logging.output_dir) if where == "latest" else Path(where)
    if path is None:
        print(f"no checkpoint in '{cfg.logging.output_dir}' yet: starting fresh")
    return path


def _finished(cfg: Any, path: Path) -> RunResult | None:
    """A run whose checkpoint already reached ``train.max_train_steps``: said, and nothing changes."""
    ckpt = load_checkpoint(path)
    if ckpt.state.step < cfg.train.max_train_steps:
        return None
    print(
        f"the run in '{cfg.logging.output_dir}' has finished: {path.name} is at step {ckpt.state.step} and "
        f"train.max_train_steps is {cfg.train.max_train_steps}; nothing to do (raise train.max_train_steps to "
        "train on)"
    )
    lora_path = Path(cfg.logging.output_dir) / LORA_WEIGHT_NAME
    return RunResult(cfg, ckpt.state, dict(ckpt.state.lora), list(ckpt.meta.get("losses", [])), [], None, lora_path)


def _resume(cfg: Any, fresh: TrainState, path: Path | None) -> tuple[TrainState, dict[str, Any]]:
    """The state to start from: ``fresh``, or the checkpoint at ``path`` (checked against this run)."""
    if path is None:
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


def _claim(cfg: Any, out: Path) -> None:
    """A fresh run: refuse an output folder holding another run, or empty it with logging.overwrite."""
    removed = claim_output_dir(
        out,
        logging_dir=cfg.logging.logging_dir,
        overwrite=cfg.logging.overwrite,
        wanted_resume=cfg.resume_from_checkpoint is not None,
        keep={"model.lora.pretrained_weight": Path(w)} if (w := cfg.model.lora.pretrained_weight) else None,
    )
    if removed:
        names = ", ".join(p.name for p in removed)
        print(f"logging.overwrite: removed the previous run's {len(removed)} item(s) in '{out}': {names}")


def _check_finite(worst: torch.Tensor, limit: int, step: int, out: Path) -> None:
    """Stop the run when ``limit`` steps in a row had a non-finite loss or gradient."""
    if worst.item() >= limit:
        raise QfluxError(
            f"stopped at step {step}: {limit} steps in a row had a non-finite loss or gradient (their updates "
            f"were skipped); the last checkpoint is {latest_checkpoint(out) or 'none'}. Lower optimizer.lr or "
            "check the data, then resume from that checkpoint"
        )


def _recent_mean(history: list[float], losses: list[torch.Tensor]) -> float:
    """The progress bar's loss: the mean of the last LOG_EVERY steps, earlier runs' included (the end
    summary's :func:`qflux.summary.mean_loss` of the same values); one host sync."""
    recent = torch.stack(losses[-LOG_EVERY:]).float()
    if len(recent) < LOG_EVERY and history:
        recent = torch.cat([torch.tensor(history[-(LOG_EVERY - len(recent)) :]).to(recent), recent])
    return float(recent.nanmean().item())


def quiet_unless(main: bool) -> contextlib.AbstractContextManager[Any]:
    """Ranks other than 0 print nothing (their progress bars are off too)."""
    return contextlib.nullcontext() if main else contextlib.redirect_stdout(io.StringIO())


def run(family: Family, cfg: Any) -> RunResult:
    """Train a LoRA as configured and write the outputs; returns the final state and losses.

    Checkpoints every ``train.checkpointing_steps``; SIGINT/SIGTERM save one and return early.
    Under torchrun with several ranks, trains data-parallel (``train.distributed``); rank 0 alone
    prints and writes files.
    """
    device = resolve_device(cfg.train.device, key="train.device")
    world = init_world(device.type)
    with quiet_unless(world.is_main):
        return _run(family, cfg, world, rank_device(world, device))


def _run(family: Family, cfg: Any, world: World, device: torch.device) -> RunResult:
    out, tr, opt, sch = Path(cfg.logging.output_dir), cfg.train, cfg.optimizer, cfg.lr_scheduler
    path = model_dir(family, cfg)
    samples = samples_of(family, cfg, path)
    mode = resolve_compile(tr.compile, device)
    if world.size > 1 and mode == "full":
        raise QfluxError("train.compile: true cannot run under torchrun (collectives in the graph); use regional")
    if tr.fp8_matmul:
        check_fp8_device(device)  # before any model loads
    if mode == "full" and cfg.model.quantize != "none":
        raise QfluxError(
            f"train.compile: true (one graph through torch.func) cannot differentiate the {cfg.model.quantize} "
            "layers of model.quantize; use train.compile: regional (or auto, or false)"
        )
    vset = None
    if cfg.validation.enabled:
        vset = validation_set(cfg.validation, cfg.data.dataset_path, cfg.data.max_pixels, multiple=image_multiple(path))
    resume_from = _checkpoint_to_resume(cfg)
    if resume_from is not None and (done := _finished(cfg, resume_from)) is not None:
        return done
    if world.is_main:
        if resume_from is None:
            _claim(cfg, out)
        for partial_dir in remove_partial(out):
            print(f"removed '{partial_dir}', left by a checkpoint write that was interrupted")
    inputs = _inputs(family, cfg, samples, path, device, vset.samples if vset else [], world)
    transformer = inputs.models.transformer
    if tr.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    lora0 = inject_lora(transformer, cfg.model.lora, seed=cfg.seed)
    if cfg.model.lora.pretrained_weight is not None:
        lora0 = lora_from_file(
            transformer,
            cfg.model.lora.pretrained_weight,
            lora0,
            naming=family.naming,
            pipeline_cls=family.pipeline_cls(),
        )
    if tr.lora_format != "diffusers":
        check_convertible([k.split(".lora_A.")[0] for k in lora0 if ".lora_A." in k], family.naming)
    prepare_frozen_base(transformer, fp8_matmul=tr.fp8_matmul, device=device, compile_mode=mode)
    sharded = world.size > 1 and tr.distributed == "fsdp"
    if sharded:
        blocks = shard_frozen_base(transformer, world)
        print(f"FSDP2: frozen base sharded across {world.size} ranks ({blocks} blocks); LoRA replicated")
    state, meta = _resume(cfg, init_train_state({k: v.to(device) for k, v in lora0.items()}, cfg.seed), resume_from)
    plan = RunPlan(
        pipeline=family.pipeline,
        model=str(path),
        dtype=cfg.model.dtype,
        quantize=cfg.model.quantize,
        layers=count_layers(transformer, cfg.model.quantize),
        devices={
            n: str(next(m.parameters()).device)
            for n in ("transformer", *family.encoders)
            if (m := getattr(inputs.models, n, None)) is not None
        },
        samples=samples,
        dataset=str(resolve_dataset_path(cfg.data.dataset_path)),
        micro_batch=cfg.data.batch_size,
        accumulation=tr.gradient_accumulation_steps,
        ranks=world.size,
        steps=tr.max_train_steps,
        start_step=state.step,
        compile_mode=mode,
        output=out,
    )
    print(start_block(plan))
    loss_fn = family.loss_fn(cfg, transformer)
    hp = StepHParams(opt.betas, opt.eps, opt.weight_decay, tr.max_grad_norm, grad_engine(mode))
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
        collate_fn=inputs.data.collate,
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
    tracker = open_tracker(cfg.logging.report_to if world.is_main else "none", out / cfg.logging.logging_dir)
    render = _renderer(family, cfg, path, inputs, world)
    validate = _validator(family, cfg, inputs, vset, loss_fn, device, tracker, world, render) if vset else None
    pending: list[dict[str, torch.Tensor]] = []  # metrics of the steps since the last log (device tensors)
    pipeline_cls = family.pipeline_cls()

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
            pipeline_cls=pipeline_cls,
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

    saved_at = -1
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
                cond = inputs.data.to_conditioning(raw)
                keys = (cfg.seed, state.step, m)
                prepared = prepare(cfg.data, tr, sched_cfg, cond, inputs.data.empty, keys, device, raw["offset"])
                micro.append(family.to_batch(prepared))
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
                recent = _recent_mean(history, losses)
                bar.set_postfix(loss=f"{recent:.4f}", lr=f"{lr:.2e}", skipped=int(skipped.item()))
                log_window()
            if validate is not None and (
                state.step % cfg.validation.validation_steps == 0 or state.step == tr.max_train_steps
            ):
                log_window()
                validate(state)
            if ckpt_due or stopped:
                saved = checkpoint()
                saved_at = state.step
                if stopped:
                    bar.write(
                        f"interrupted by {stopped[0]} at step {state.step}; saved {saved}. Resume with the same "
                        "command plus --resume_from_checkpoint=latest"
                    )
                    break
    log_window()
    tracker.close()
    if not stopped and saved_at != state.step:
        checkpoint()  # a larger train.max_train_steps resumes from the end
    loss_values = history + (torch.stack(losses).tolist() if losses else [])
    lora_path = out / LORA_WEIGHT_NAME
    if not stopped:
        written = _write_outputs(family, cfg, transformer, state.lora, loss_values) if world.is_main else []
        lora_path = written[0] if written else lora_path
        if cfg.logging.write_sample:  # every rank renders (a sharded base needs them all); rank 0 writes
            cond = inputs.data.to_conditioning(inputs.data.collate([inputs.dataset[0]]))
            before, after = render([cond, cond], [lora0, state.lora])
            if world.is_main:
                written.append(_save_sample(samples[0], before, after, out / "sample.png"))
        barrier(world)
        logs = out / cfg.logging.logging_dir if cfg.logging.report_to == "tensorboard" else None
        print(end_block(written, losses=loss_values, checkpoint=latest_checkpoint(out), logs=logs))
    return RunResult(cfg, state, lora0, loss_values, seconds, inputs.models, lora_path, interrupted=bool(stopped))


def _write_outputs(
    family: Family, cfg: Any, transformer: Any, lora: Mapping[str, torch.Tensor], losses: list[float]
) -> list[Path]:
    """The final LoRA (the diffusers file first: it is the one every tool reads), then its ComfyUI
    twin, the resolved config and the loss curve; returns the paths written, in that order."""
    out, dtype = Path(cfg.logging.output_dir), torch_dtype(cfg.train.save_dtype)
    written = []
    if cfg.train.lora_format in ("diffusers", "both"):
        written.append(save_lora(out, transformer, lora, dtype=dtype, pipeline_cls=family.pipeline_cls()))
    if cfg.train.lora_format in ("comfyui", "both"):
        written.append(save_lora_comfyui(out, transformer, lora, dtype=dtype, naming=family.naming))
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    return [*written, out / "config.yaml", save_loss_curve(losses, out / "loss.png")]


def _save_sample(sample: PairSample, before: np.ndarray, after: np.ndarray, path: Path) -> Path:
    """control image(s) | target | base model | with LoRA (same seed for both predictions)."""
    controls = [load_rgb(c) for c in sample.controls]
    labels = ["control"] if len(controls) == 1 else [f"control {i + 1}" for i in range(len(controls))]
    images = [*controls, load_rgb(sample.target), to_pil(before), to_pil(after)]
    return save_image_row(images, [*labels, "target", "before", "after"], path)


def _renderer(
    family: Family, cfg: Any, path: Path, inputs: Inputs, world: World
) -> Callable[[Sequence[Conditioning], Sequence[Mapping[str, torch.Tensor]]], list[np.ndarray]]:
    """Build ``render(conds, loras)``: each one-sample conditioning denoised with its LoRA at its
    target size (``validation.num_inference_steps``, the run's seed) and decoded to [H, W, 3] in [0, 1].

    Decoding needs the VAE: training from the cache loads it on ``predict.devices.vae`` for each
    call and frees it after, so rendering holds no memory between calls.
    """

    def render(conds: Sequence[Conditioning], loras: Sequence[Mapping[str, torch.Tensor]]) -> list[np.ndarray]:
        steps = cfg.validation.num_inference_steps
        latents = [family.preview(cfg, inputs.models, c, lora, steps) for c, lora in zip(conds, loras, strict=True)]
        vae = inputs.models.vae
        if vae is None:  # training from the cache: the VAE only for this decode
            device_vae = resolve_device(cfg.predict.devices.vae, key="predict.devices.vae")
            vae = family.load(path, torch_dtype(cfg.model.dtype), include=("vae",), devices={"vae": device_vae}).vae
        images = [to_image(family.decode(vae, z)) for z in latents]
        del vae
        return images

    return render


def _validator(
    family: Family,
    cfg: Any,
    inputs: Inputs,
    vset: ValidationSet,
    loss_fn: LossFn,
    device: torch.device,
    tracker: Tracker,
    world: World,
    render: Callable[[Sequence[Conditioning], Sequence[Mapping[str, torch.Tensor]]], list[np.ndarray]],
) -> Callable[[TrainState], None]:
    """Build ``validate(state)``: the validation loss (fixed σ and noise) and a grid of predictions.

    The samples' conditioning comes through the training data path (the cache when it is on) and is
    encoded once, here.
    """
    data = inputs.data
    dataset = data.make_dataset(vset.samples)
    conds = [data.to_conditioning(data.collate([dataset[i]])) for i in range(len(vset.samples))]
    sched_cfg = inputs.models.scheduler.config
    with_target = [c for c, t in zip(conds, vset.has_target, strict=True) if t]
    quiet = no_dropout(cfg.data)

    def assemble(cond: Conditioning, keys: tuple[int, ...]) -> Any:
        return family.to_batch(prepare(quiet, cfg.train, sched_cfg, cond, data.empty, keys, device))

    batches = shared_eval_batches(assemble, with_target, seed=cfg.seed)
    out = Path(cfg.logging.output_dir) / "validation"

    def validate(state: TrainState) -> None:
        values = {}
        if batches:
            values["val/loss"] = evaluate_loss(loss_fn, state.lora, batches).item()
        images = render(conds, [state.lora] * len(conds))
        if not world.is_main:  # every rank computed (a sharded base needs them all); rank 0 writes
            return
        grid = validation_grid(vset, images, out / f"step-{state.step:06d}.png")
        tracker.image(state.step, "val/grid", grid)
        if values:
            tracker.scalars(state.step, values)
            tqdm.write(f"step {state.step}: validation loss {values['val/loss']:.4f}")

    return validate


def fill(family: Family, cfg: Any) -> CacheReport:
    """Compute the cache entries the configured dataset needs; returns the computed/reused counts.

    Under torchrun, each rank computes every world-th sample (rank 0 reports its own share)."""
    world = init_world(resolve_device(cfg.cache.vae_encoder_device, key="cache.vae_encoder_device").type)
    with quiet_unless(world.is_main):
        path = model_dir(family, cfg)
        return _fill(family, cfg, samples_of(family, cfg, path), path, world)


def _fill(family: Family, cfg: Any, samples: list[PairSample], path: Path, world: World) -> CacheReport:
    cache = family.cached(cfg, path)
    places = devices(cfg.cache, "cache", _encoder_keys(family))
    models = family.load(
        path, torch_dtype(cfg.model.dtype), include=family.encoders, devices=places, quantize=quantize_plan(cfg)
    )
    mine = samples[world.rank :: world.size]

    def progress(jobs: list[Job]) -> Any:
        return tqdm(jobs, desc="cache", unit="entry", disable=not world.is_main)

    report = cache.fill(models, mine, progress)
    barrier(world)  # every entry exists before any rank reads one
    for reason in report.replaced:
        print(f"recomputed corrupt entry: {reason}")
    share = f" (rank 0's share of {world.size})" if world.size > 1 else ""
    print(f"cache '{cfg.cache.cache_dir}': {report.computed} entries computed, {report.reused} reused{share}")
    return report


def commands(family: Family, config_cls: type, predict: Callable[..., None]) -> dict[str, Callable[..., None]]:
    """The recipe's CLI verbs: ``train`` and ``cache`` (config file plus ``--section.key=value``
    overrides) and the model's own ``predict``."""
    from qflux.config_parse import load_config

    def train(config: str | None = None, **overrides: Any) -> None:
        """Train a LoRA: ``train [--config=recipes/configs/<model>_bf16.yaml] [--section.key=value ...]``."""
        run(family, load_config(config_cls, config, overrides))

    def cache(config: str | None = None, **overrides: Any) -> None:
        """Fill the embedding cache: ``cache [--config=...] [--cache.cache_dir=DIR] [--section.key=value ...]``."""
        fill(family, load_config(config_cls, config, overrides))

    return {"train": train, "cache": cache, "predict": predict}


HELP_FLAGS = ("--help", "-h")


def command_help(family: Family, config_cls: type, verb: str, predict: Callable[..., None]) -> str:
    """``<recipe> <verb> --help``: usage, examples and the config keys, generated from the schema."""
    prog, stem = f"python -m recipes.{family.name}", family.name.removesuffix("_lora")
    config = f"--config=recipes/configs/{stem}_bf16.yaml"
    text = {
        "train": (
            f"{prog} [train] [--config=FILE.yaml] [--section.key=value ...]",
            f"Train a {family.pipeline} LoRA on the (control, target, instruction) pairs of data.dataset_path. "
            "With no arguments: the built-in tiny model and synthetic dataset.",
            [prog, f"{prog} train {config} --data.dataset_path=my_pairs --logging.output_dir=outputs/my_lora",
             f"{prog} train {config} --resume_from_checkpoint=latest --train.max_train_steps=3000"],
        ),
        "cache": (
            f"{prog} cache [--config=FILE.yaml] [--section.key=value ...]",
            "Compute the encoders' outputs for the dataset once (content-keyed); train with --cache.use_cache=true "
            "then loads only the transformer.",
            [f"{prog} cache {config} --data.dataset_path=my_pairs",
             f"{prog} train {config} --data.dataset_path=my_pairs --cache.use_cache=true"],
        ),
        "predict": (
            f"{prog} predict --image=IN.png --prompt=TEXT [--out=OUT.png] [--lora=FILE] [--section.key=value ...]",
            "Edit an image with the model (and a LoRA file in any format qflux writes or reads).",
            [f'{prog} predict --image=cat.png --prompt="make the cat wear a red hat" '
             "--lora=outputs/my_lora/pytorch_lora_weights.safetensors --out=edited.png"],
        ),
    }[verb]  # fmt: skip
    options = function_options(predict) if verb == "predict" else []
    sections = ("model", "predict") if verb == "predict" else None
    return build_help(text[0], text[1], text[2], config_cls, options=options, sections=sections)


def main(
    family: Family, config_cls: type, commands: Mapping[str, Callable[..., Any]], argv: list[str] | None = None
) -> None:
    """A recipe's entry point: no arguments trains the built-in default; ``<verb> --help`` prints the
    verb's help; errors print one message and exit 2."""
    import fire

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or (args[0].startswith("-") and args[0] not in HELP_FLAGS):
        args = ["train", *args]  # options alone train: `python -m recipes.<recipe> --train.max_train_steps=10`
    if args[0] in HELP_FLAGS or (args[0] in commands and any(a in HELP_FLAGS for a in args[1:])):
        verb = args[0] if args[0] in commands else "train"
        print(command_help(family, config_cls, verb, commands["predict"]))
        if args[0] in HELP_FLAGS:
            print(f"\ncommands: {', '.join(commands)} (`<command> --help` for each)")
        return
    try:
        fire.Fire(dict(commands), command=args, name=family.name)
    except QfluxError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
